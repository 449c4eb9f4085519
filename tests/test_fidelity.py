"""The paper's method by default: every value of docs/fidelity.md's siso column is what the code does.

Config and preset values are compared with the code directly; the rows that describe behaviour name
the tests that check it. Then the behaviours this table promises that no other test covers: the
edit's gradient through its last step only, FLUX's LoRA targets and optimiser groups, the prompt
length, and ``--ir-model auto``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import RESOLUTION

from siso.backbones import load_backbone
from siso.backbones.flux import FluxBackbone
from siso.backbones.sana import SanaBackbone
from siso.backbones.stable_diffusion import StableDiffusionBackbone
from siso.backbones.stable_diffusion_xl import StableDiffusionXLBackbone
from siso.config import BackbonePreset, EditConfig, GenerateConfig

ROOT = Path(__file__).resolve().parents[1]
FIDELITY = ROOT / "docs" / "fidelity.md"
BACKBONES = {"sd-turbo": StableDiffusionBackbone, "sdxl-turbo": StableDiffusionXLBackbone,
             "flux-schnell": FluxBackbone, "sana": SanaBackbone}
#: rows that describe behaviour rather than a config value, and the tests that check that behaviour
BEHAVIOUR_TESTS = {
    "loop.reported_loss": ("test_similarity.py", "test_loss_is_the_weighted_sum_of_mean_cosine_distances"),
    "loop.early_stopping_loss": ("test_optimize.py", "test_early_stopping_stops_exactly_where_the_reference_stops"),
    "loop.early_stopping_rule": ("test_optimize.py", "test_early_stopping_is_the_reference_rule_step_by_step"),
    "edit.mask_rule": ("test_masks_labels.py",
                       "test_the_mask_is_the_union_of_sams_candidates_with_the_largest_region_filled"),
    "result.saved_image": ("test_generation.py", "test_run_directory_contract"),
    "result.saved_lora": ("test_generation.py", "test_lora_round_trip_through_plain_diffusers"),
    "preprocess.antialias": ("test_similarity.py", "test_preprocessing_follows_the_eval_recipe"),
    "edit.inversion_latents": ("test_inversion.py", "test_inverse_step_undoes_step"),
    "edit.ancestral_noise": ("test_editing.py", "test_sdxl_edit_inverts_with_euler_ancestral"),
}


def fidelity_rows() -> dict[str, object]:
    """knob -> siso's value (a Python literal) from every table row of docs/fidelity.md."""
    rows = {}
    for line in FIDELITY.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`([\w.-]+)`", cells[0]) if len(cells) >= 4 else None
        if not match:
            continue
        siso = next(c for c in reversed(cells[:-1]) if c.startswith("`"))  # the siso column: last literal
        rows[match.group(1)] = ast.literal_eval(siso.strip("`"))
    return rows


def field_default(config_class, name: str):
    field = {f.name: f for f in dataclasses.fields(config_class)}[name]
    return field.default


def code_value(knob: str):
    scope, name = knob.split(".", 1)
    if scope == "generate":
        return field_default(GenerateConfig, name)
    if scope == "edit":
        return field_default(EditConfig, name)
    backbone = BACKBONES[scope]
    if name in {f.name for f in dataclasses.fields(BackbonePreset)}:
        return getattr(backbone.preset, name)
    return getattr(backbone, name)


def test_the_fidelity_table_is_read_whole():
    rows = fidelity_rows()
    assert len(rows) > 80
    for backbone in BACKBONES:
        assert f"{backbone}.learning_rate" in rows and f"{backbone}.train_text_encoder" in rows


@pytest.mark.parametrize("knob", [k for k in fidelity_rows() if k not in BEHAVIOUR_TESTS
                                  and k.split(".")[0] in ("generate", "edit", *BACKBONES)])
def test_every_default_is_what_docs_fidelity_says(knob):
    assert code_value(knob) == fidelity_rows()[knob], f"{knob}: docs/fidelity.md and the code disagree"


@pytest.mark.parametrize("knob", sorted(BEHAVIOUR_TESTS))
def test_every_described_behaviour_has_its_test(knob):
    assert knob in fidelity_rows()
    file, name = BEHAVIOUR_TESTS[knob]
    assert re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(), re.MULTILINE), f"{file}::{name}"


def test_no_row_is_left_unchecked():
    checked = set(BEHAVIOUR_TESTS) | {k for k in fidelity_rows() if k.split(".")[0] in ("generate", "edit", *BACKBONES)}
    assert set(fidelity_rows()) <= checked


def test_the_presets_resolve_into_the_run_config():
    """What a run records is the preset's value where the user gave none, the user's where given."""
    flux = GenerateConfig(subjects=("a.jpg",), prompt="p").resolved(FluxBackbone.preset)
    assert (flux.learning_rate, flux.adam_weight_decay, flux.train_text_encoder) == (2e-4, 1e-4, True)
    assert (flux.text_encoder_learning_rate, flux.text_encoder_weight_decay) == (5e-6, 1e-3)
    sdxl = GenerateConfig(subjects=("a.jpg",), prompt="p").resolved(StableDiffusionXLBackbone.preset)
    assert sdxl.train_text_encoder and (sdxl.text_encoder_learning_rate, sdxl.text_encoder_weight_decay) == (2e-4, 1e-2)
    own = GenerateConfig(subjects=("a.jpg",), prompt="p", learning_rate=1e-3, train_text_encoder=False,
                         adam_weight_decay=0.0).resolved(StableDiffusionXLBackbone.preset)
    assert (own.learning_rate, own.train_text_encoder, own.adam_weight_decay) == (1e-3, False, 0.0)
    assert own.text_encoder_learning_rate == 1e-3  # follows the user's --lr where no preset value exists
    sana = GenerateConfig(subjects=("a.jpg",), prompt="p").resolved(SanaBackbone.preset)
    assert (sana.learning_rate, sana.adam_weight_decay, sana.denoise_steps, sana.grad_steps) == (8e-4, 1e-4, 20, 3)
    assert sana.early_stop_patience == 5 and not sana.train_text_encoder


# -- behaviour --------------------------------------------------------------------------------------


def test_an_edit_differentiates_its_last_step_only(sd_dir, dino_dir, subject_photo, tmp_path):
    """The edit re-runs 3 steps with the LoRA; only the last one is in autograd (the reference's
    ``set_grad_enabled(i == last)``), and the earlier steps' outputs carry no graph."""
    from PIL import Image

    from siso.editing import prepare_edit

    scene = tmp_path / "scene.png"
    Image.open(subject_photo).convert("RGB").rotate(90).resize((128, 128)).save(scene)
    mask = tmp_path / "mask.png"
    picture = Image.new("L", (128, 128), 0)
    picture.paste(255, (32, 32, 96, 96))
    picture.save(mask)
    session = prepare_edit(EditConfig(subject=subject_photo, input=scene, subject_class="dog", input_class="cat",
                                      mask=mask, model=str(sd_dir), dino_model=str(dino_dir), resolution=RESOLUTION,
                                      device="cpu", max_steps=2))
    outputs: list[torch.Tensor] = []
    hook = session.backbone.denoiser.register_forward_hook(lambda module, args, out: outputs.append(out[0]))
    try:
        image = session.optimization.render()
    finally:
        hook.remove()
    assert len(outputs) == 3
    assert [o.grad_fn is not None for o in outputs] == [False, False, True]
    assert image.grad_fn is not None
    assert session.config.grad_steps == 1


def test_flux_trains_its_feed_forward_layers_and_its_text_encoder_in_its_own_group(flux_dir, dino_dir, subject_photo):
    from siso.generation import prepare_generation

    session = prepare_generation(GenerateConfig(subjects=(subject_photo,), prompt="a photo of a dog",
                                                model=str(flux_dir), dino_model=str(dino_dir), resolution=RESOLUTION,
                                                device="cpu", max_steps=2))
    transformer = session.backbone.denoiser
    adapted = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    for suffix in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "attn.to_add_out"):
        assert any(name.endswith(suffix) for name in adapted), suffix
    groups = session.optimization.params
    assert [len(g["params"]) > 0 for g in groups] == [True, True]
    denoiser_group, text_group = groups
    assert "lr" not in denoiser_group and "weight_decay" not in denoiser_group  # the optimiser's: 2e-4, 1e-4
    assert (text_group["lr"], text_group["weight_decay"]) == (5e-6, 1e-3)
    text_ids = {id(p) for p in session.backbone.pipeline.text_encoder.parameters() if p.requires_grad}
    assert {id(p) for p in text_group["params"]} == text_ids
    list(session)
    optimizer = session.optimization._optimizer
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(2e-4, 1e-4), (5e-6, 1e-3)]


def test_flux_optimises_with_256_t5_tokens(flux_dir):
    backbone = load_backbone(str(flux_dir), torch.device("cpu"), torch.float32)
    seen = []
    backbone.pipeline.text_encoder_2.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    backbone._t5_cache = None
    backbone.encode_prompt("a photo of a dog", RESOLUTION)
    assert seen == [256]
    assert FluxBackbone.optimisation_pipeline_kwargs() == {"max_sequence_length": 256}


def test_sana_optimises_with_256_gemma_tokens(sana_dir):
    backbone = load_backbone(str(sana_dir), torch.device("cpu"), torch.float32)
    cond = backbone.encode_prompt("a photo of a dog", RESOLUTION)
    instruction = backbone._call_default("complex_human_instruction")  # what SanaPipeline.__call__ prepends

    def plain(tokens):
        return backbone.pipeline.encode_prompt("a photo of a dog", True, device=torch.device("cpu"),
                                               complex_human_instruction=instruction, max_sequence_length=tokens)[0]

    assert torch.equal(cond["prompt_embeds"][1:], plain(256))
    assert plain(300).shape[1] == plain(256).shape[1] + 44  # the pipeline's default is longer


# -- the IR loss one command away --------------------------------------------------------------------


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SISO_CACHE_DIR", str(tmp_path / "siso-cache"))
    return tmp_path / "siso-cache"


def test_auto_without_a_cached_ir_model_is_dino_only_and_says_so(run_siso, cache_dir, sd_dir, dino_dir,
                                                                 subject_photo, tmp_path):
    code, text = run_siso("generate", "--subject", subject_photo, "--prompt", "a photo of a dog", "--out",
                          tmp_path / "run", "--model", sd_dir, "--dino-model", dino_dir, "--resolution", RESOLUTION,
                          "--device", "cpu", "--max-steps", "1")
    assert code == 0, text
    assert text.count("DINO only, not the paper's DINO + IR loss") == 1 and "siso convert-ir --download" in text
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["similarity"] == ["dino"] and record["config"]["ir_model"] is None
    assert record["similarity_models"] == {"dino": str(dino_dir)}


def test_auto_with_a_cached_ir_model_runs_dino_and_ir(run_siso, cache_dir, ir_dir, sd_dir, dino_dir, subject_photo,
                                                     tmp_path):
    import shutil

    from siso.ir_cache import default_ir_dir

    shutil.copytree(ir_dir, default_ir_dir())
    code, text = run_siso("generate", "--subject", subject_photo, "--prompt", "a photo of a dog", "--out",
                          tmp_path / "run", "--model", sd_dir, "--dino-model", dino_dir, "--resolution", RESOLUTION,
                          "--device", "cpu", "--max-steps", "1")
    assert code == 0, text
    assert "DINO only" not in text
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["config"]["similarity"] == ["dino", "ir"]
    assert record["similarity_models"] == {"dino": str(dino_dir), "ir": str(default_ir_dir())}
    assert {"dino", "ir", "total"} <= set(record["losses"][0])
    # --ir-model none turns it off again; --similarity ir without any IR model is refused clearly.
    code, text = run_siso("generate", "--subject", subject_photo, "--prompt", "a photo of a dog", "--out",
                          tmp_path / "run2", "--model", sd_dir, "--dino-model", dino_dir, "--resolution", RESOLUTION,
                          "--device", "cpu", "--max-steps", "1", "--ir-model", "none")
    assert code == 0, text
    assert json.loads((tmp_path / "run2" / "run.json").read_text())["config"]["similarity"] == ["dino"]
    shutil.rmtree(default_ir_dir())
    code, text = run_siso("generate", "--subject", subject_photo, "--prompt", "a photo of a dog", "--out",
                          tmp_path / "run3", "--model", sd_dir, "--dino-model", dino_dir, "--similarity", "dino,ir")
    assert code == 2 and "siso convert-ir --download" in text and not (tmp_path / "run3").exists()


def tiny_ir_checkpoint(path: Path) -> Path:
    """A checkpoint in the published layout (module.backbone.*, module.fc1), tiny: the IR tests' own."""
    from test_ir import make_reference, save_checkpoint

    return save_checkpoint(make_reference(), path)


def test_convert_ir_download_converts_into_the_cache(run_siso, cache_dir, monkeypatch, tmp_path):
    from siso.ir_cache import KAGGLE_DATASET, default_ir_dir, resolve_ir_model

    download = tmp_path / "kaggle" / "guieweights0732"
    download.mkdir(parents=True)
    tiny_ir_checkpoint(download / "guie_weights.pth")
    asked = []
    fake = types.ModuleType("kagglehub")
    fake.dataset_download = lambda handle: asked.append(handle) or str(download)
    monkeypatch.setitem(sys.modules, "kagglehub", fake)
    assert resolve_ir_model("auto") is None
    code, text = run_siso("convert-ir", "--download")
    assert code == 0, text
    assert asked == [KAGGLE_DATASET]
    assert resolve_ir_model("auto") == str(default_ir_dir())
    assert (default_ir_dir() / "model.safetensors").is_file() and "--ir-model auto" in text


def test_convert_ir_download_without_kagglehub_says_how_to_install_it(run_siso, cache_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # import fails as if it were not installed
    code, text = run_siso("convert-ir", "--download")
    assert code == 2 and "pip install 'siso[ir]'" in text and "kagglehub" in text


def test_convert_ir_wants_a_checkpoint_or_download(run_siso, cache_dir, tmp_path):
    code, text = run_siso("convert-ir")
    assert code == 2 and "--download" in text
    code, text = run_siso("convert-ir", tmp_path / "x.pth", "--download")
    assert code == 2 and "not both" in text
