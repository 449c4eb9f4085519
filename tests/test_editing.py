"""Editing end to end on tiny models: the run directory, the background loss at work, the automatic
labels and mask, SDXL's ancestral sampler, the CLI, and the CLI's answers to bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny
import torch
from conftest import RESOLUTION
from diffusers import DiffusionPipeline
from helpers import is_compiled, run_captured
from PIL import Image

from siso.config import EditConfig, GenerateConfig
from siso.editing import background_mse, run_edit, start_edit
from siso.editing.masks import square_crop
from siso.generation import start_generation
from siso.images import load_image, pil_to_tensor, tensor_to_pil
from siso.models import ModelCache


@pytest.fixture(scope="session")
def photos(subject_photo, scene_photo) -> dict:
    """``--subject`` and ``--input``: conftest's synthetic dog and cat scene."""
    return {"subject": subject_photo, "input": scene_photo}


@pytest.fixture(scope="session")
def scene_size(scene_photo) -> tuple[int, int]:
    return load_image(scene_photo).size


@pytest.fixture(scope="session")
def planted_mask(tmp_path_factory, scene_size):
    """A mask at the scene's size marking a box in the middle of what the edit sees."""
    width, height = scene_size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    array = np.zeros((height, width), np.uint8)
    array[top + side // 4: top + 3 * side // 4, left + side // 4: left + 3 * side // 4] = 255
    path = tmp_path_factory.mktemp("mask") / "mask.png"
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="session")
def labeller_dir(tmp_path_factory, subject_photo, scene_photo):
    from siso.images import working_copy

    planted = {"dog": working_copy(load_image(subject_photo)),
               "cat": square_crop(load_image(scene_photo), RESOLUTION)}
    return tiny.editing.clip_dir(tmp_path_factory.mktemp("tiny-clip"), planted)


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory):
    return tiny.editing.grounding_dino_dir(tmp_path_factory.mktemp("tiny-grounding-dino"))


@pytest.fixture(scope="session")
def segmenter_dir(tmp_path_factory):
    return tiny.editing.sam_dir(tmp_path_factory.mktemp("tiny-sam"))


def edit_config(photos, model_dir, dino_dir, **options) -> EditConfig:
    values = dict(**photos, model=str(model_dir), dino_model=str(dino_dir), resolution=RESOLUTION,
                  device="cpu", max_steps=3, learning_rate=5e-3)
    values.update(options)
    return EditConfig(**values)


@pytest.fixture(scope="module")
def planted_edit(photos, sd_dir, dino_dir, planted_mask, tmp_path_factory):
    """An SD edit with the user's classes and mask, a weighty background loss and a cached backbone."""
    cache = ModelCache()
    config = edit_config(photos, sd_dir, dino_dir, subject_class="dog", input_class="cat", mask=planted_mask,
                         max_steps=8, learning_rate=2e-2, early_stop_patience=8)
    captured = run_captured(start_edit(config, tmp_path_factory.mktemp("edit") / "run", cache=cache))
    return captured.result, captured, cache


def test_edit_run_directory(planted_edit, scene_photo):
    result, captured, _ = planted_edit
    out = result.run_dir
    record = json.loads((out / "run.json").read_text())
    assert {"input.png", "mask.png", "reconstruction.png", "best.png", "losses.png", "run.json", "steps",
            "lora"} <= {p.name for p in out.iterdir()}
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "lora" / "siso_lora_kohya.safetensors").is_file()  # SD's default: both files
    assert record["config"]["lora_format"] == ["diffusers", "kohya"]
    # input.png is the framed scene, mask.png the framed mask, reconstruction.png the inverted scene.
    scene = square_crop(load_image(scene_photo), RESOLUTION)
    assert np.array_equal(np.asarray(Image.open(out / "input.png")), np.asarray(scene))
    mask = np.asarray(Image.open(out / "mask.png")) > 127
    assert np.array_equal(mask, result.task.mask.mask[0, 0].numpy() > 0.5) and mask[8:24, 8:24].all()
    assert mask.sum() == 256
    assert torch.equal(pil_to_tensor(Image.open(out / "reconstruction.png")),
                       pil_to_tensor(tensor_to_pil(result.task.reconstruction)))
    assert record["task"] == "edit"
    assert record["labels"] == {"subject": {"text": "dog", "source": "user"},
                                "input": {"text": "cat", "source": "user"}}
    assert record["prompts"] == {"inversion": "a photo of a cat", "edit": "a photo of a dog"}
    assert record["mask"]["source"] == "user" and record["mask"]["object_fraction"] == 0.25
    inversion = record["inversion"]
    assert inversion["sampler"] == "ddim" and inversion["timesteps"] == [749, 499, 249]
    assert inversion["renoise"]["renoise_steps"] == 9 and inversion["renoise"]["lambda_ac"] == 0.0
    assert inversion["residual"] == pytest.approx(result.task.residual, abs=1e-6)
    assert record["config"]["bg_weight"] == 10.0 and record["config"]["strength"] == 0.75
    assert record["guidance_scale"] == 1.0
    for entry in record["losses"]:
        assert {"step", "dino", "bg", "total"} <= set(entry)
        assert entry["total"] == pytest.approx(entry["dino"] + 10.0 * entry["bg"], rel=1e-5)
    assert [e.losses for e in captured.events] == [{k: v for k, v in e.items() if k != "seconds"}
                                                   for e in record["losses"]]


def test_background_loss_brings_the_background_back(planted_edit):
    """With the background weighted, the optimised image keeps the scene's background better than the
    first image did; the record's ``bg`` says so and the images agree."""
    result, captured, _ = planted_edit
    record = json.loads((result.run_dir / "run.json").read_text())
    bg = [entry["bg"] for entry in record["losses"]]
    assert record["best_step"] > 0 and bg[record["best_step"]] < 0.98 * bg[0], bg
    scene = pil_to_tensor(Image.open(result.run_dir / "input.png"))
    background = 1 - result.task.mask.mask

    def error(path):
        return float(background_mse(pil_to_tensor(Image.open(path)), scene, background))

    first, best = error(result.run_dir / "steps" / "0000.png"), error(result.run_dir / "best.png")
    assert best < 0.98 * first
    assert first == pytest.approx(bg[0], abs=2e-3) and best == pytest.approx(bg[record["best_step"]], abs=2e-3)


def test_a_cached_backbone_comes_out_of_an_edit_untouched(planted_edit, sd_dir, dino_dir, subject_photo, tmp_path):
    """Editing swaps in its own sampler for each render; a later generation on the same cached model
    must still sample exactly what the plain pipeline does."""
    _, _, cache = planted_edit
    config = GenerateConfig(subjects=(subject_photo,), prompt="a photo of a dog", model=str(sd_dir),
                            dino_model=str(dino_dir), resolution=RESOLUTION, device="cpu", max_steps=1)
    captured = run_captured(start_generation(config, tmp_path / "run", cache=cache))
    pipe = DiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a photo of a dog", num_inference_steps=1, guidance_scale=0.0, height=RESOLUTION, width=RESOLUTION,
                 generator=torch.Generator("cpu").manual_seed(42), output_type="pt").images
    assert (captured.events[0].image - plain).abs().max().item() <= 1e-5


@pytest.mark.fidelity("edit.ancestral_noise")
def test_sdxl_edit_inverts_with_euler_ancestral(photos, sdxl_dir, dino_dir, planted_mask, tmp_path):
    config = edit_config(photos, sdxl_dir, dino_dir, subject_class="dog", input_class="cat", mask=planted_mask,
                         max_steps=2)
    result = run_edit(config, tmp_path / "run")
    inversion = result.record["inversion"]
    assert inversion["sampler"] == "euler_ancestral" and inversion["renoise"]["noise_correction"] is True
    assert inversion["renoise"]["lambda_ac"] == 20.0 and inversion["timesteps"] == [749, 499, 249]
    assert len(result.history) == 2 and result.record["backbone"] == "StableDiffusionXLBackbone"


# -- the command line -------------------------------------------------------------------------------


@pytest.fixture
def siso(run_siso):
    """``siso(*argv) -> (exit code, output)``: conftest's ``run_siso``."""
    return run_siso


def edit_args(out, model_dir, dino_dir, *extra, **options):
    """``--subject`` and ``--input`` come in ``options``."""
    values = {"out": out, "model": model_dir, "dino_model": dino_dir,
              "resolution": RESOLUTION, "device": "cpu", "max_steps": 1, **options}
    argv = ["edit"]
    for name, value in values.items():
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", value]
    return [*argv, *extra]


def test_edit_then_render_on_the_command_line(siso, tmp_path, photos, sd_dir, dino_dir, labeller_dir, detector_dir,
                                              segmenter_dir):
    """Everything automatic: CLIP names both objects, Grounding DINO + SAM find the cat; then the
    LoRA renders any prompt."""
    out = tmp_path / "run"
    code, output = siso(*edit_args(out, sd_dir, dino_dir, max_steps=2, lr=5e-3, label_model=labeller_dir,
                                   detector_model=detector_dir, segmenter_model=segmenter_dir, **photos))
    assert code == 0, output
    assert "Subject: dog (recognised by CLIP, confidence" in output and "Replacing: cat (recognised by CLIP" in output
    assert "Grounding DINO + SAM" in output and "Best iteration" in output and str(out / "mask.png") in output
    assert "Device: cpu, dtype fp32" in output
    assert ("Settings: lr 5.0e-3, early stop 3 % / 7 iterations, inversion steps 4, strength 0.75, grad steps 1, "
            "weight decay 0.01, max steps 2, "
            f"LoRA rank 4, seed 42, resolution {RESOLUTION}, device cpu, dtype fp32") in output
    assert {"input.png", "mask.png", "reconstruction.png", "best.png"} <= {p.name for p in out.iterdir()}
    record = json.loads((out / "run.json").read_text())
    for role, word in (("subject", "dog"), ("input", "cat")):
        label = record["labels"][role]
        assert (label["text"], label["source"], label["model"]) == (word, "auto", str(labeller_dir))
        assert 0 < label["confidence"] <= 1
    assert record["prompts"] == {"inversion": "a photo of a cat", "edit": "a photo of a dog"}
    assert record["mask"]["source"] == "grounding_dino+sam" and record["mask"]["phrase"] == "a cat."
    assert 0 < record["mask"]["object_fraction"] < 1 and len(record["losses"]) == 2
    image = tmp_path / "dog.png"
    code, output = siso("render", "--model", sd_dir, "--lora", out / "lora", "--prompt", "a dog on the beach",
                        "--out", image, "--resolution", RESOLUTION, "--device", "cpu")
    assert code == 0, output
    assert Image.open(image).size == (RESOLUTION, RESOLUTION)


def refused(siso, out, *words, **options) -> str:
    """Exit code 2, one ``Error:`` line holding ``words``, and no run directory left behind."""
    code, output = siso(*edit_args(out, options.pop("model"), options.pop("dino_model"), **options))
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0], lines[0]
    assert not out.exists()
    return lines[0]


@pytest.fixture
def refuse(siso, tmp_path, photos, sd_dir, dino_dir):
    def run(*words, **options):
        options = {**photos, "subject_class": "dog", "input_class": "cat", "model": sd_dir, "dino_model": dino_dir,
                   **options}
        return refused(siso, tmp_path / "run", *words, **options)

    return run


def test_mask_of_the_wrong_size(refuse, tmp_path, scene_size):
    path = tmp_path / "small.png"
    Image.new("L", (100, 80), 255).save(path)
    refuse(str(path), "100x80 pixels", f"{scene_size[0]}x{scene_size[1]}", mask=path)


@pytest.mark.parametrize("value,words", [(0, "empty (all background)"), (255, "covers the whole image")])
def test_all_black_or_all_white_mask(refuse, tmp_path, scene_size, value, words):
    path = tmp_path / "mask.png"
    Image.new("L", scene_size, value).save(path)
    refuse(str(path), words, mask=path)


def test_unreadable_scene(refuse, tmp_path):
    fake = tmp_path / "scene.jpg"
    fake.write_text("not a photo\n")
    refuse("scene photo", str(fake), "not an image format", input=fake)


def test_missing_subject(refuse, tmp_path):
    refuse("subject photo", "does not exist", subject=tmp_path / "no-dog.jpg")


def test_nothing_found(refuse, detector_dir, segmenter_dir):
    refuse('no "cat"', "--box-threshold 0.6", "--input-class", "--mask", detector_model=detector_dir,
           segmenter_model=segmenter_dir, box_threshold=0.6)


@pytest.mark.parametrize("flag,value,words", [
    ("strength", 0.2, "leaves no denoising step"), ("bg_weight", -1, "--bg-weight must be >= 0"),
    ("subject_class", " ", "--subject-class is empty"), ("box_threshold", 1.5, "--box-threshold must be in [0, 1]"),
])
def test_bad_numbers_and_words(refuse, flag, value, words):
    refuse(words, **{flag: value})


def test_editing_refuses_a_transformer_backbone(refuse, tmp_path):
    folder = tmp_path / "flux"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                         "_diffusers_version": "0.42.1"}))
    refuse("Editing runs on Stable Diffusion and SDXL", "FluxPipeline", "stabilityai/sd-turbo", model=folder)


def test_an_edit_takes_the_speed_settings(photos, sd_dir, dino_dir, planted_mask):
    """--low-memory and --compile reach the edit's loop and its record; the inversion before them is unaffected
    (nothing is compiled until the loop's first render, so this compiles nothing)."""
    from siso import speed
    from siso.editing import prepare_edit

    config = edit_config(photos, sd_dir, dino_dir, subject_class="dog", input_class="cat", mask=planted_mask)
    plain = prepare_edit(config)
    assert plain.memory.tier == "plain" and not plain.compiled.enabled
    session = prepare_edit(edit_config(photos, sd_dir, dino_dir, subject_class="dog", input_class="cat",
                                       mask=planted_mask, low_memory=True, compile=True))
    assert session.memory.tier == "checkpoint-all" and session.backbone.denoiser.is_gradient_checkpointing
    assert session.compiled.enabled and session.compiled.modules == ("denoiser", "vae_decoder", "dino")
    modules = speed.iteration_modules(session.backbone, session.loss.similarity)
    assert all(is_compiled(m) for m in modules.values())
    record = session.record()
    assert record["memory"]["reason"] == "--low-memory" and record["compile"]["enabled"] is True
    assert torch.equal(session.task.reconstruction, plain.task.reconstruction)
