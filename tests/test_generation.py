"""End to end on tiny models: the run directory, the LoRA round trip through plain diffusers,
frozen weights, and a planted subject the loop must recover."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RESOLUTION
from helpers import (
    PROMPT,
    assert_planted_subject_recovered,
    plain_render,
    run_captured,
    tiny_config,
    weight_modules,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from siso.generation import prepare_generation, run_generation, start_generation
from siso.images import pil_to_tensor, tensor_to_pil
from siso.lora import KOHYA_WEIGHT_NAME


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def finished_run(request, sd_dir, sdxl_dir, dino_dir, ir_dir, subject_photo, tmp_path_factory):
    model_dir = {"sd": sd_dir, "sdxl": sdxl_dir}[request.param]
    config = tiny_config(model_dir, subject_photo, dino_dir, ir_model=str(ir_dir))  # default lora formats
    out = tmp_path_factory.mktemp(f"run-{request.param}") / "run"
    captured = run_captured(start_generation(config, out))
    return model_dir, captured.result, captured


@pytest.mark.fidelity("result.saved_image")
def test_run_directory_contract(finished_run):
    _, result, captured = finished_run
    out = result.run_dir
    record = json.loads((out / "run.json").read_text())
    steps = sorted(p.name for p in (out / "steps").iterdir())
    assert steps == [f"{i:04d}.png" for i in range(len(record["losses"]))]
    assert (out / "best.png").is_file() and (out / "losses.png").is_file()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "lora" / KOHYA_WEIGHT_NAME).is_file()
    totals = [entry["total"] for entry in record["losses"]]
    assert record["best_step"] == min(range(len(totals)), key=totals.__getitem__)
    assert record["stop_reason"] in ("max_steps", "early_stop")
    assert [entry["step"] for entry in record["losses"]] == list(range(len(totals)))
    for entry in record["losses"]:
        assert {"step", "total", "dino", "ir"} <= set(entry)
        assert entry["total"] == pytest.approx(entry["dino"] + entry["ir"], abs=1e-6)
    config = record["config"]
    assert config["seed"] == 42 and config["lora_rank"] == 4 and config["similarity"] == ["dino", "ir"]
    assert config["learning_rate"] == 5e-3 and config["denoise_steps"] == 1 and config["grad_steps"] == 1
    assert config["lora_format"] == ["diffusers", "kohya"]  # SD and SDXL write both files by default
    assert {"torch", "diffusers", "transformers", "peft"} <= set(record["versions"])
    assert record["timings"]["seconds_per_step"] > 0
    # best.png is the best iteration's image.
    best_png = pil_to_tensor(Image.open(out / "best.png"))
    assert torch.equal(best_png, pil_to_tensor(tensor_to_pil(captured.events[record["best_step"]].image)))
    assert len(captured.events) == len(totals)


@pytest.mark.fidelity("result.saved_lora")
def test_lora_round_trip_through_plain_diffusers(finished_run):
    model_dir, result, captured = finished_run
    best = captured.session.optimization.best_image
    assert result.best_step > 0, "the LoRA must have moved for this test to mean something"
    untouched = plain_render(model_dir)
    assert (untouched - best).abs().max().item() > 1e-3
    again = plain_render(model_dir, lora_dir=result.lora_dir)
    assert (again - best).abs().max().item() <= 1e-5


def test_kohya_file_loads_in_plain_diffusers(finished_run):
    model_dir, result, captured = finished_run
    with safe_open(result.lora_dir / KOHYA_WEIGHT_NAME, "pt") as file:
        keys, metadata = list(file.keys()), file.metadata()
    # SDXL trains its text encoders' LoRA by default (as the reference runs it).
    assert all(key.startswith(("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")) for key in keys)
    assert any(key.startswith("lora_unet_") for key in keys)
    assert any(key.endswith(".alpha") for key in keys)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"]
    again = plain_render(model_dir, lora_dir=result.lora_dir, weight_name=KOHYA_WEIGHT_NAME)
    assert (again - captured.session.optimization.best_image).abs().max().item() <= 1e-5


def test_gradients_reach_the_lora_only(sd_dir, dino_dir, subject_photo):
    session = prepare_generation(tiny_config(sd_dir, subject_photo, dino_dir, max_steps=3))
    lora_ids = {id(p) for p in session.optimization.parameters}
    frozen = {
        f"{name}.{key}": value.detach().clone()
        for name, module in weight_modules(session.backbone).items()
        for key, value in module.state_dict().items()
        if "lora_" not in key
    }
    frozen.update({f"loss.{k}": v.detach().clone() for k, v in session.loss.state_dict().items()})
    trainable = [
        p for module in [*weight_modules(session.backbone).values(), session.loss] for p in module.parameters()
        if p.requires_grad
    ]
    assert trainable and all(id(p) in lora_ids for p in trainable)
    assert all(p.dtype == torch.float32 for p in trainable)
    events = list(session)
    assert len(events) == 3
    assert all(p.grad is None or id(p) in lora_ids for p in session.loss.parameters())
    after = {
        f"{name}.{key}": value
        for name, module in weight_modules(session.backbone).items()
        for key, value in module.state_dict().items()
        if "lora_" not in key
    }
    after.update({f"loss.{k}": v for k, v in session.loss.state_dict().items()})
    assert frozen.keys() == after.keys()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)
    # ... while the LoRA did move.
    assert any(p.abs().sum() > 0 for p in session.optimization.parameters if p.shape[0] != 4)


# kohya prefixes: one text encoder (SD 1/2) is lora_te, SDXL's two are lora_te1 and lora_te2.
TEXT_ENCODER_PREFIXES = {
    "sd": ("lora_unet_", "lora_te_text_model_"),
    "sdxl": ("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_"),
}


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_text_encoder_lora_round_trip(name, sd_dir, sdxl_dir, dino_dir, subject_photo, tmp_path):
    """Both files, with text-encoder LoRA, give the run's image in plain diffusers (0.42, transformers 5:
    the files' ``text_model.`` level is stripped again for the flattened CLIPTextModel)."""
    model_dir = {"sd": sd_dir, "sdxl": sdxl_dir}[name]
    config = tiny_config(model_dir, subject_photo, dino_dir, train_text_encoder=True, max_steps=4)
    captured = run_captured(start_generation(config, tmp_path / "run"))
    result, best = captured.result, captured.session.optimization.best_image
    assert result.best_step > 0, "the LoRA must have moved for this test to mean something"
    state = load_file(result.lora_dir / "pytorch_lora_weights.safetensors")
    encoders = {"sd": {"text_encoder"}, "sdxl": {"text_encoder", "text_encoder_2"}}[name]
    assert {key.split(".")[0] for key in state} == {"unet"} | encoders
    assert all(key.split(".")[1] == "text_model" for key in state if not key.startswith("unet."))
    kohya = load_file(result.lora_dir / KOHYA_WEIGHT_NAME)
    assert all(key.startswith(TEXT_ENCODER_PREFIXES[name]) for key in kohya)
    assert {prefix for prefix in TEXT_ENCODER_PREFIXES[name] if any(k.startswith(prefix) for k in kohya)} == set(
        TEXT_ENCODER_PREFIXES[name])
    for weight_name in (None, KOHYA_WEIGHT_NAME):
        again = plain_render(model_dir, lora_dir=result.lora_dir, weight_name=weight_name)
        assert (again - best).abs().max().item() <= 1e-5, weight_name


def test_kohya_alpha_comes_from_the_adapter_config(sd_dir, tmp_path):
    """A LoRA with lora_alpha = 2 x rank: the kohya file carries that alpha, so plain diffusers scales
    each layer as the live adapter did (an alpha written as the rank would halve the LoRA)."""
    from peft import LoraConfig, inject_adapter_in_model

    from siso.backbones import load_backbone
    from siso.lora import ADAPTER_NAME, save_lora, snapshot_lora

    backbone = load_backbone(str(sd_dir), torch.device("cpu"), torch.float32)
    for name in ("unet", "text_encoder"):
        model = getattr(backbone.pipeline, name)
        targets = list(backbone.preset.lora_targets if name == "unet" else backbone.preset.text_encoder_lora_targets)
        config = LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in [*backbone.pipeline.unet.named_parameters(),
                            *backbone.pipeline.text_encoder.named_parameters()]:
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        pipe = backbone.pipeline
        expected = pipe(PROMPT, num_inference_steps=1, guidance_scale=0.0, height=RESOLUTION, width=RESOLUTION,
                        generator=torch.Generator("cpu").manual_seed(42), output_type="pt").images
    save_lora(backbone, snapshot_lora(backbone), tmp_path / "lora", ("diffusers", "kohya"))
    assert (expected - plain_render(sd_dir)).abs().max().item() > 1e-3, "the LoRA must change the image"
    again = plain_render(sd_dir, lora_dir=tmp_path / "lora", weight_name=KOHYA_WEIGHT_NAME)
    assert (again - expected).abs().max().item() <= 1e-5
    with safe_open(tmp_path / "lora" / KOHYA_WEIGHT_NAME, "pt") as file:
        keys = file.keys()
        alphas = {file.get_tensor(key).item() for key in keys if key.endswith(".alpha")}
        metadata = file.metadata()
    assert alphas == {4.0} and metadata["ss_network_alpha"] == "4.0" and metadata["ss_network_dim"] == "2"


def test_planted_subject_is_recovered(sd_dir, dino_dir, ir_dir, subject_photo, tmp_path):
    """The subject photo is the model's own image under a hidden random LoRA; the loop must find it."""
    assert_planted_subject_recovered(tiny_config(sd_dir, subject_photo, dino_dir, ir_model=str(ir_dir), max_steps=30,
                                                 learning_rate=2e-2, early_stop_patience=30), tmp_path)


def test_several_subject_photos_average_the_distance(sd_dir, dino_dir, dreambench):
    photos = (dreambench / "dog" / "00.jpg", dreambench / "dog" / "01.jpg")
    session = prepare_generation(tiny_config(sd_dir, photos[0], dino_dir, subjects=photos))
    singles = [prepare_generation(tiny_config(sd_dir, p, dino_dir)) for p in photos]
    with torch.no_grad():
        image = session.optimization.render()
        both = session.loss(image)["dino"]
        each = [s.loss(image)["dino"] for s in singles]
    assert both.item() == pytest.approx((each[0].item() + each[1].item()) / 2, abs=1e-6)


def test_a_cached_backbone_starts_each_run_from_the_untouched_model(sd_dir, dino_dir, subject_photo, tmp_path):
    """The web app and benchmark workers reuse loaded models; a second run must not inherit the first's LoRA."""
    from siso.models import ModelCache

    cache = ModelCache()
    first = run_generation(tiny_config(sd_dir, subject_photo, dino_dir, max_steps=3, train_text_encoder=True),
                           tmp_path / "first", cache=cache)
    assert first.best_step > 0
    captured = run_captured(start_generation(tiny_config(sd_dir, subject_photo, dino_dir, max_steps=2, lora_rank=2),
                                             tmp_path / "second", cache=cache))
    second = captured.result
    # Step 0 of the second run is the untouched model's image again, with only the new LoRA attached.
    assert (captured.events[0].image - plain_render(sd_dir)).abs().max().item() <= 1e-5
    state = load_file(second.lora_dir / "pytorch_lora_weights.safetensors")
    assert {key.split(".")[0] for key in state} == {"unet"}
    assert all(v.shape[0] == 2 or v.shape[1] == 2 for v in state.values())


def test_low_memory_mode_is_exact(sd_dir, dino_dir, subject_photo):
    """Checkpointing recomputes activations in backward: same images, same gradients, same losses."""
    runs = []
    for low_memory in (False, True):
        session = prepare_generation(tiny_config(sd_dir, subject_photo, dino_dir, max_steps=3, low_memory=low_memory))
        backbone = session.backbone
        assert backbone.denoiser.is_gradient_checkpointing == low_memory
        assert backbone.pipeline.vae.decoder.gradient_checkpointing == low_memory
        events = list(session)
        runs.append(([e.image for e in events], [e.losses["total"] for e in events]))
    (images_a, losses_a), (images_b, losses_b) = runs
    assert losses_a == pytest.approx(losses_b, abs=1e-6)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(images_a, images_b, strict=True))
    assert (images_a[-1] - images_a[0]).abs().max() > 1e-4, "the LoRA must move for the comparison to mean much"
