"""The paper's method by default: every value of docs/fidelity.md's siso column is what siso does.

A knob's row is checked three ways: against its declaration (``siso.config``, ``siso.presets``),
against the default the command line's ``--help`` shows, and against what a run that leaves the flag
out records in run.json. A behaviour's row has no value in the code: a test marked
``@pytest.mark.fidelity("row")`` checks it, and every such row must have one. Then the behaviours this
table promises that no other test covers: the edit's gradient through its last step only, FLUX's LoRA
targets and optimiser groups, the prompt length, the LoRA's initialisation and ``--ir-model auto``.
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
from siso.backbones.stable_diffusion_xl import StableDiffusionXLBackbone
from siso.config import EditConfig, GenerateConfig
from siso.knobs import knobs, show
from siso.presets import PRESETS, BackbonePreset

ROOT = Path(__file__).resolve().parents[1]
FIDELITY = ROOT / "docs" / "fidelity.md"
SCOPES = {"generate": GenerateConfig, "edit": EditConfig}
PRESET_FIELDS = {f.name for f in dataclasses.fields(BackbonePreset)}


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


def marked_tests() -> dict[str, list[str]]:
    """row -> the tests marked ``@pytest.mark.fidelity(row)`` whose body asserts something and that
    are not skipped (read from the test files, so it holds whichever tests a run selects)."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if any("mark.skip" in d for d in decorators):
                continue
            checks = any(isinstance(n, ast.Assert) or (isinstance(n, ast.Call) and "assert" in ast.unparse(n.func))
                         or (isinstance(n, ast.With) and "raises" in ast.unparse(n)) for n in ast.walk(node))
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("mark.fidelity")
                        and checks):
                    row = ast.literal_eval(decorator.args[0])
                    found.setdefault(row, []).append(f"{path.name}::{node.name}")
    return found


ROWS = fidelity_rows()
MARKED = marked_tests()


def is_knob_row(row: str) -> bool:
    scope, name = row.rsplit(".", 1)
    if scope in SCOPES:
        return name in knobs(SCOPES[scope])
    return scope in PRESETS and name in PRESET_FIELDS


def code_value(row: str):
    scope, name = row.rsplit(".", 1)
    if scope in SCOPES:
        return knobs(SCOPES[scope])[name].default
    return getattr(PRESETS[scope], name)


KNOB_ROWS = sorted(row for row in ROWS if is_knob_row(row))


def test_the_fidelity_table_is_read_whole():
    assert len(ROWS) > 80
    for family in PRESETS:
        assert f"{family}.learning_rate" in ROWS and f"{family}.train_text_encoder" in ROWS


def test_every_row_is_a_knob_or_a_marked_behaviour():
    for row in ROWS:
        assert is_knob_row(row) or MARKED.get(row), (
            f"{row}: a row is a knob of siso.config / siso.presets, or a behaviour with a marked test")
    assert set(MARKED) <= set(ROWS), f"tests marked for rows docs/fidelity.md does not have: {set(MARKED) - set(ROWS)}"


def test_the_marker_finder_needs_an_assertion(tmp_path):
    """What makes a marked test count: an assertion in its body, and no skip."""
    source = ('import pytest\n@pytest.mark.fidelity("a.b")\ndef test_x():\n    assert 1\n'
              '@pytest.mark.fidelity("c.d")\ndef test_y():\n    pass\n'
              '@pytest.mark.skip\n@pytest.mark.fidelity("e.f")\ndef test_z():\n    assert 1\n')
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef):
            names.append((node.name, any(isinstance(n, ast.Assert) for n in ast.walk(node)),
                          any("mark.skip" in ast.unparse(d) for d in node.decorator_list)))
    assert names == [("test_x", True, False), ("test_y", False, False), ("test_z", True, True)]


@pytest.mark.parametrize("row", KNOB_ROWS)
def test_every_declared_default_is_what_docs_fidelity_says(row):
    assert code_value(row) == ROWS[row], f"{row}: docs/fidelity.md and the declaration disagree"


def option_help(command: str) -> dict[str, str]:
    """option name (``--lr``) -> its help text, as ``siso COMMAND --help`` has it."""
    import typer

    from siso.cli import app

    click_command = typer.main.get_command(app).commands[command]
    return {opt: (p.help or "").replace("\\[", "[") for p in click_command.params for opt in p.opts}


def shown_default(help_text: str) -> str:
    match = re.search(r"\[default: (.*)\]\s*$", help_text)
    assert match, help_text
    return match.group(1)


def per_family_defaults(help_text: str) -> dict[str, str]:
    """``the backbone's: SD-Turbo, SDXL-Turbo 2e-4; Sana 8e-4`` -> {title: value}."""
    text = shown_default(help_text)
    assert text.startswith("the backbone's: "), text
    titles = {preset.title for preset in PRESETS.values()}
    values = {}
    for group in text.removeprefix("the backbone's: ").split("; "):
        named = []
        while True:
            # the longest title that matches: "Sana-Sprint" must not be read as "Sana" and "-Sprint"
            title = max((t for t in titles if group.startswith(t)), key=len, default=None)
            if title is None:
                break
            named.append(title)
            group = group[len(title):].removeprefix(",").lstrip()
        values.update({title: group for title in named})
    return values


@pytest.mark.parametrize("row", [row for row in KNOB_ROWS if row.rsplit(".", 1)[0] in SCOPES])
def test_the_help_shows_the_documented_default(row):
    scope, name = row.rsplit(".", 1)
    spec = knobs(SCOPES[scope])[name]
    if not spec.cli:
        return
    help_text = option_help(scope)[spec.option]
    expected = "unset" if ROWS[row] is None and spec.preset is None else show(ROWS[row])
    if ROWS[row] is None and spec.preset is not None:
        return  # the per-family rows below check what "the backbone's" says
    assert shown_default(help_text) == expected


@pytest.mark.parametrize("row", [row for row in KNOB_ROWS if row.rsplit(".", 1)[0] in PRESETS])
def test_the_help_shows_each_familys_documented_default(row):
    family, name = row.rsplit(".", 1)
    specs = [spec for spec in knobs(GenerateConfig).values() if spec.preset == name and spec.cli]
    if not specs:
        return  # a preset value no knob takes (guidance, LoRA targets): only the declaration check applies
    help_text = option_help("generate")[specs[0].option]
    shown = per_family_defaults(help_text)[PRESETS[family].title]
    if ROWS[row] is None and specs[0].fallback:
        assert shown.startswith("as --")
    else:
        assert shown == show(ROWS[row])


def test_a_run_without_flags_records_the_documented_defaults(run_siso, sd_dir, dino_dir, subject_photo, scene_photo,
                                                             tmp_path):
    """What `siso generate` and `siso edit` record when every knob is left out but the ones a tiny run
    on this machine needs: each documented default, and for SD-Turbo's family its preset's values."""
    from PIL import Image

    needed = {"model": sd_dir, "dino_model": dino_dir, "resolution": RESOLUTION, "device": "cpu"}
    flags = [item for name, value in needed.items() for item in (f"--{name.replace('_', '-')}", value)]
    code, text = run_siso("generate", "--subject", subject_photo, "--prompt", "a photo of a dog",
                          "--out", tmp_path / "gen", *flags)
    assert code == 0, text
    generated = json.loads((tmp_path / "gen" / "run.json").read_text())
    mask = tmp_path / "mask.png"
    width, height = Image.open(scene_photo).size
    picture = Image.new("L", (width, height), 0)
    picture.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    picture.save(mask)
    code, text = run_siso("edit", "--subject", subject_photo, "--input", scene_photo, "--subject-class", "dog",
                          "--input-class", "cat", "--mask", mask, "--out", tmp_path / "edit", *flags)
    assert code == 0, text
    edited = json.loads((tmp_path / "edit" / "run.json").read_text())
    resolved_at_run = {"ir_model", "similarity"}  # "auto" and None become what was found: see the IR tests
    records = {"generate": generated, "edit": edited}
    checked = 0
    for row in KNOB_ROWS:
        scope, name = row.rsplit(".", 1)
        if scope in SCOPES and name not in needed and name not in resolved_at_run:
            spec = knobs(SCOPES[scope])[name]
            if spec.preset is None:
                recorded = records[scope]["config"][name]
                assert recorded == (list(ROWS[row]) if isinstance(ROWS[row], tuple) else ROWS[row]), row
                checked += 1
        elif scope == "sd-turbo":
            value = list(ROWS[row]) if isinstance(ROWS[row], tuple) else ROWS[row]
            assert generated["preset"][name] == value, row
            for spec in knobs(GenerateConfig).values():
                if spec.preset == name and value is not None:
                    assert generated["config"][spec.name] == value, (row, spec.name)
            checked += 1
    assert checked > 30  # the documented defaults are what runs, not a handful of them


def test_the_presets_resolve_into_the_run_config():
    """What a run records is the preset's value where the user gave none, the user's where given."""
    flux = GenerateConfig(subjects=("a.jpg",), prompt="p", ir_model=None).resolved(FluxBackbone.preset)
    assert (flux.learning_rate, flux.adam_weight_decay, flux.train_text_encoder) == (2e-4, 1e-4, True)
    assert (flux.text_encoder_learning_rate, flux.text_encoder_weight_decay) == (5e-6, 1e-3)
    sdxl = GenerateConfig(subjects=("a.jpg",), prompt="p", ir_model=None).resolved(StableDiffusionXLBackbone.preset)
    assert sdxl.train_text_encoder and (sdxl.text_encoder_learning_rate, sdxl.text_encoder_weight_decay) == (2e-4, 1e-2)
    own = GenerateConfig(subjects=("a.jpg",), prompt="p", learning_rate=1e-3, train_text_encoder=False,
                         adam_weight_decay=0.0, ir_model=None).resolved(StableDiffusionXLBackbone.preset)
    assert (own.learning_rate, own.train_text_encoder, own.adam_weight_decay) == (1e-3, False, 0.0)
    assert own.text_encoder_learning_rate == 1e-3  # follows the user's --lr where no preset value exists
    sana = GenerateConfig(subjects=("a.jpg",), prompt="p", ir_model=None).resolved(SanaBackbone.preset)
    assert (sana.learning_rate, sana.adam_weight_decay, sana.denoise_steps, sana.grad_steps) == (8e-4, 1e-4, 20, 3)
    assert sana.early_stop_patience == 5 and not sana.train_text_encoder


# -- behaviour --------------------------------------------------------------------------------------


@pytest.mark.fidelity("generate.lora_init")
def test_the_lora_starts_from_the_seed_whatever_ran_before(sd_dir):
    """A is drawn from --seed without touching the global RNG (so what ran before cannot change it, and
    it cannot change what runs after); B starts at zero, so the first render is the untouched model's."""
    from siso.lora import attach_lora

    def first_a(seed: int, noise_before: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone = load_backbone(str(sd_dir), torch.device("cpu"), torch.float32)
        torch.manual_seed(1234)
        torch.randn(noise_before)  # whatever else used the global RNG first
        state = torch.random.get_rng_state()
        adapter = attach_lora(backbone, rank=4, train_text_encoder=False, seed=seed)
        assert torch.equal(torch.random.get_rng_state(), state), "attaching the LoRA moved the global RNG"
        pair = next(iter(adapter.parameters["unet"].values()))
        return pair["A"].detach().clone(), pair["B"].detach().clone(), state

    a, b, _ = first_a(42, noise_before=3)
    again, _, _ = first_a(42, noise_before=1000)
    other, _, _ = first_a(7, noise_before=3)
    assert torch.equal(a, again) and not torch.equal(a, other)
    assert torch.count_nonzero(b) == 0 and a.std() > 0


@pytest.mark.fidelity("edit.grad_steps")
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


@pytest.mark.fidelity("loop.clipped_parameters")
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
    # Nothing outside the optimiser trains (the reference also sets CLIP's embedding tables trainable,
    # never stepping them), so what the loop clips is the LoRA only.
    trainable = {id(p) for module in (transformer, session.backbone.pipeline.text_encoder)
                 for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in session.optimization.parameters}
    embeddings = session.backbone.pipeline.text_encoder.get_input_embeddings()
    assert not embeddings.weight.requires_grad
    list(session)
    optimizer = session.optimization._optimizer
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(2e-4, 1e-4), (5e-6, 1e-3)]


def test_flux_optimises_with_256_t5_tokens(flux_dir):
    backbone = load_backbone(str(flux_dir), torch.device("cpu"), torch.float32)
    seen = []
    backbone.pipeline.text_encoder_2.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    backbone._frozen_embeddings.clear()
    backbone.encode_prompt("a photo of a dog", RESOLUTION)
    assert seen == [256]
    assert FluxBackbone.preset.prompt_max_tokens == 256


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
