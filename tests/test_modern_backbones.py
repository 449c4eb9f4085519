"""The models people run now: SD3.5, Sana-Sprint, FLUX.2 [klein] and Z-Image, on tiny random models in
their real on-disk layouts (tests/tiny/flow.py), through the same loop as every other backbone.

For each family: step 0 with a zero LoRA is the plain diffusers pipeline called with the preset's own
settings; only the last k steps carry gradients; the frozen weights never change; plain diffusers plus
the saved LoRA reproduces best.png; a planted subject is recovered; the memory savers are exact; the
command line runs end to end. The classifier-free-guidance paths (a preset with guidance on) are checked
against the pipeline too, and the local Qwen3 and Gemma tokenizers against what the pipelines ask of them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import tiny
import torch
from conftest import RESOLUTION
from helpers import (
    PROMPT,
    assert_only_the_last_steps_carry_gradients,
    assert_planted_subject_recovered,
    assert_streams_exactly_when_the_gpu_is_too_small,
    lora_parameters,
    plain_render,
    run_captured,
    tiny_config,
    weight_modules,
)
from PIL import Image
from safetensors.torch import load_file

from siso.backbones import backbone_class_for, load_backbone, render
from siso.errors import SisoError
from siso.generation import prepare_generation, start_generation
from siso.images import pil_to_tensor
from siso.lora import attach_lora

CPU = torch.device("cpu")
FAMILIES = {
    "sd3.5": (tiny.flow.sd3_pipeline, "StableDiffusion3Backbone"),
    "sana-sprint": (tiny.flow.sana_sprint_pipeline, "SanaSprintBackbone"),
    "flux2-klein": (tiny.flow.flux2_klein_pipeline, "Flux2KleinBackbone"),
    "z-image": (tiny.flow.z_image_pipeline, "ZImageBackbone"),
}


@pytest.fixture(scope="session")
def modern_dirs(tmp_path_factory) -> dict[str, Path]:
    dirs = {}
    for name, (build, _) in FAMILIES.items():
        dirs[name] = tmp_path_factory.mktemp(f"tiny-{name}")
        build().save_pretrained(dirs[name])
    klein_base = tmp_path_factory.mktemp("tiny-flux2-klein-base")
    tiny.flow.flux2_klein_pipeline(distilled=False).save_pretrained(klein_base)
    dirs["flux2-klein-base"] = klein_base
    return dirs


def test_adapters_and_presets(modern_dirs):
    """Each family's adapter is chosen from its model_index.json, with siso's preset for it."""
    presets = {}
    for name, (_, adapter) in FAMILIES.items():
        cls = backbone_class_for(str(modern_dirs[name]))
        assert cls.__name__ == adapter
        presets[name] = cls.preset
    # Distilled models: one optimised step (Z-Image two: an 8-step model), the gradient through the last.
    assert {n: (p.denoise_steps, p.grad_steps) for n, p in presets.items()} == {
        "sd3.5": (1, 1), "sana-sprint": (1, 1), "flux2-klein": (1, 1), "z-image": (2, 1)}
    assert {n: p.render_steps for n, p in presets.items()} == {"sd3.5": 4, "sana-sprint": 2, "flux2-klein": 4,
                                                               "z-image": 9}
    assert {n: p.guidance_scale for n, p in presets.items()} == {"sd3.5": 0.0, "sana-sprint": 4.5,
                                                                 "flux2-klein": 1.0, "z-image": 0.0}
    # Text-encoder LoRA only on CLIP (SD3.5's two, in their own AdamW group as FLUX.1's); Qwen3 and Gemma frozen.
    assert presets["sd3.5"].train_text_encoder and presets["sd3.5"].text_encoder_learning_rate == 5e-6
    assert all(not presets[n].train_text_encoder and presets[n].text_encoder_lora_targets == ()
               for n in ("sana-sprint", "flux2-klein", "z-image"))


# -- equivalence with the plain pipelines -----------------------------------------------------------


def zero_lora_render(model_dir: Path, steps: int, grad_steps: int, train_text_encoder: bool = False):
    backbone = load_backbone(str(model_dir), CPU, torch.float32)
    attach_lora(backbone, rank=4, train_text_encoder=train_text_encoder, seed=0)  # B = 0: must change nothing
    cond = backbone.encode_prompt(PROMPT, RESOLUTION)
    return render(backbone, cond, seed=42, resolution=RESOLUTION, num_steps=steps, grad_steps=grad_steps)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_zero_lora_render_equals_the_plain_pipeline_with_the_presets_settings(modern_dirs, name):
    cls = backbone_class_for(str(modern_dirs[name]))
    preset = cls.preset
    ours = zero_lora_render(modern_dirs[name], preset.denoise_steps, preset.grad_steps,
                            train_text_encoder=preset.train_text_encoder)
    assert ours.requires_grad
    reference = plain_render(modern_dirs[name], preset.denoise_steps)  # guidance: the preset's
    assert ours.shape == reference.shape == (1, 3, RESOLUTION, RESOLUTION)
    assert (ours.detach() - reference).abs().max().item() <= 1e-5
    other = plain_render(modern_dirs[name], preset.denoise_steps, seed=7)
    assert (other - reference).abs().max().item() > 1e-2  # the comparison is not vacuous


@pytest.mark.parametrize("name,steps,grad_steps", [("sd3.5", 3, 2), ("sana-sprint", 2, 1), ("sana-sprint", 4, 4),
                                                   ("flux2-klein", 4, 1), ("z-image", 9, 3)])
def test_more_steps_equal_the_plain_pipeline(modern_dirs, name, steps, grad_steps):
    ours = zero_lora_render(modern_dirs[name], steps, grad_steps)
    assert (ours.detach() - plain_render(modern_dirs[name], steps)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,guidance", [("sd3.5", 4.0), ("flux2-klein-base", 4.0), ("z-image", 3.0)])
def test_classifier_free_guidance_as_the_pipeline_runs_it(modern_dirs, monkeypatch, name, guidance):
    """A preset with guidance on (a non-distilled SD3.5 or klein base, a Z-Image run with guidance):
    the negative prompt's pass and the mix are the pipeline's."""
    cls = backbone_class_for(str(modern_dirs[name]))
    monkeypatch.setattr(cls, "preset", dataclasses.replace(cls.preset, guidance_scale=guidance))
    ours = zero_lora_render(modern_dirs[name], 2, 1)
    reference = plain_render(modern_dirs[name], 2)
    assert (ours.detach() - reference).abs().max().item() <= 1e-5
    monkeypatch.setattr(cls, "preset", dataclasses.replace(cls.preset, guidance_scale=0.0))
    assert (plain_render(modern_dirs[name], 2) - reference).abs().max().item() > 1e-3  # guidance mattered


def test_the_distilled_klein_ignores_guidance_as_its_pipeline_does(modern_dirs, monkeypatch):
    cls = backbone_class_for(str(modern_dirs["flux2-klein"]))
    monkeypatch.setattr(cls, "preset", dataclasses.replace(cls.preset, guidance_scale=4.0))
    backbone = load_backbone(str(modern_dirs["flux2-klein"]), CPU, torch.float32)
    assert not backbone.do_classifier_free_guidance  # is_distilled: no second pass, as the pipeline


@pytest.mark.parametrize("name,steps,grad_steps", [("sd3.5", 3, 1), ("sana-sprint", 3, 2), ("flux2-klein", 3, 1),
                                                   ("z-image", 4, 2)])
def test_only_the_last_k_steps_are_differentiated(modern_dirs, name, steps, grad_steps):
    backbone = load_backbone(str(modern_dirs[name]), CPU, torch.float32)
    params = assert_only_the_last_steps_carry_gradients(backbone, steps, grad_steps)
    assert sum(1 for p in params if p.grad is not None and p.grad.abs().sum() > 0) > len(params) // 2


# -- the loop end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(FAMILIES))
def finished_run(request, modern_dirs, dino_dir, ir_dir, subject_photo, tmp_path_factory):
    name = request.param
    config = tiny_config(modern_dirs[name], subject_photo, dino_dir, ir_model=str(ir_dir), max_steps=4,
                         early_stop_patience=10)
    captured = run_captured(start_generation(config, tmp_path_factory.mktemp(f"run-{name}") / "run"))
    return name, captured


def test_lora_round_trip_through_plain_diffusers(finished_run, modern_dirs):
    """The saved diffusers file, loaded by the family's own load_lora_weights, renders best.png again."""
    name, captured = finished_run
    result, session = captured.result, captured.session
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["backbone"] == FAMILIES[name][1] and record["config"]["lora_format"] == ["diffusers"]
    state = load_file(result.lora_dir / "pytorch_lora_weights.safetensors")
    components = {key.split(".")[0] for key in state}
    assert components == ({"transformer", "text_encoder", "text_encoder_2"} if name == "sd3.5" else {"transformer"})
    if name == "flux2-klein":  # the single blocks' projections are adapted too, by their per-block names
        assert any("single_transformer_blocks.0.attn.to_out." in key for key in state)
        assert any("to_qkv_mlp_proj" in key for key in state)
    if name == "z-image":
        assert any(".feed_forward.w2." in key for key in state)
    assert result.best_step > 0, "the LoRA must have moved for this test to mean something"
    best = pil_to_tensor(Image.open(result.run_dir / "best.png"))
    steps = session.config.denoise_steps
    assert (plain_render(modern_dirs[name], steps) - best).abs().max().item() > 1e-3
    again = plain_render(modern_dirs[name], steps, lora_dir=result.lora_dir)
    assert (again - session.optimization.best_image).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradients_reach_the_lora_only_and_frozen_weights_stay(modern_dirs, dino_dir, subject_photo, name):
    session = prepare_generation(tiny_config(modern_dirs[name], subject_photo, dino_dir, max_steps=3))
    modules = weight_modules(session.backbone)
    frozen = {f"{n}.{k}": v.detach().clone() for n, m in modules.items() for k, v in m.state_dict().items()
              if "lora_" not in k}
    lora_ids = {id(p) for p in session.optimization.parameters}
    trainable = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    assert trainable and all(id(p) in lora_ids for p in trainable) and all(p.dtype == torch.float32 for p in trainable)
    assert len(list(session)) == 3
    after = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items() if "lora_" not in k}
    assert frozen.keys() == after.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert any(p.abs().sum() > 0 for p in session.optimization.parameters if p.shape[0] != 4)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_planted_subject_is_recovered(name, modern_dirs, dino_dir, ir_dir, subject_photo, tmp_path):
    """The subject photo is the model's own image under a hidden random LoRA; the loop must find it."""
    assert_planted_subject_recovered(tiny_config(modern_dirs[name], subject_photo, dino_dir, ir_model=str(ir_dir),
                                                 max_steps=20, learning_rate=2e-2, early_stop_patience=20), tmp_path)


# -- memory --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd3.5", "flux2-klein", "z-image"])
def test_checkpointing_and_streaming_change_nothing(modern_dirs, name):
    """The large families' savers (what fits them on a 24 GB card) are exact: same image, same gradients."""
    results = {}
    for saver in ("none", "checkpointing", "streaming"):
        backbone = load_backbone(str(modern_dirs[name]), CPU, torch.float32)
        if saver == "checkpointing":
            backbone.enable_gradient_checkpointing()
        elif saver == "streaming":
            assert backbone.stream_denoiser_blocks() > 0
        params = lora_parameters(attach_lora(backbone, rank=4, train_text_encoder=False, seed=0))
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        image = render(backbone, backbone.encode_prompt(PROMPT, RESOLUTION), 42, RESOLUTION, 2, 1)
        image.mean().backward()
        results[saver] = (image.detach(), [p.grad.clone() if p.grad is not None else None for p in params])
    image, grads = results["none"]
    for saver in ("checkpointing", "streaming"):
        assert torch.equal(results[saver][0], image)
        for a, b in zip(results[saver][1], grads, strict=True):
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("name", ["sd3.5", "flux2-klein", "z-image"])
def test_the_large_families_stream_exactly_when_the_gpu_is_too_small(monkeypatch, modern_dirs, name):
    assert_streams_exactly_when_the_gpu_is_too_small(monkeypatch, modern_dirs[name])


# -- refusals, tokenizers, the command line -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["sana-sprint", "flux2-klein", "z-image"])
def test_language_model_text_encoders_are_never_trained(modern_dirs, dino_dir, subject_photo, tmp_path, name):
    with pytest.raises(SisoError, match="--train-text-encoder does not apply.*Drop --train-text-encoder"):
        prepare_generation(tiny_config(modern_dirs[name], subject_photo, dino_dir, train_text_encoder=True))


def test_the_local_qwen3_tokenizer_does_what_the_pipelines_ask(tmp_path):
    """A byte-level vocabulary with no merges encodes any text; the chat template knows enable_thinking; it
    saves and loads back in the real layout."""
    from transformers import AutoTokenizer

    tokenizer = tiny.flow.qwen_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "a photo of a dog, \u00e9t\u00e9 \u2014 ok"}]
    off = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") and on.endswith("<|im_start|>assistant\n")
    ids = loaded(off)["input_ids"]
    assert loaded.decode(ids) == off  # every byte is a token: nothing is lost
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert loaded.convert_tokens_to_ids(special) in ids
    padded = loaded(off, padding="max_length", max_length=len(ids) + 5)
    assert sum(padded["attention_mask"]) == len(ids) and padded["input_ids"][-1] == loaded.pad_token_id


def test_the_local_gemma_tokenizer_spells_any_text_in_bytes(tmp_path):
    """Sana-Sprint's Gemma-2 tokenizer: byte fallback spells characters outside the vocabulary, Gemma's
    special tokens sit where Gemma has them, and it saves and loads back in the real layout."""
    from transformers import AutoTokenizer

    tokenizer = tiny.transformer.gemma_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a photo of a dog, \u00e9t\u00e9 \u2014 ok"
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id == 2 and loaded.pad_token_id == 0 and loaded.eos_token_id == 1
    assert loaded.unk_token_id not in ids
    assert loaded.convert_tokens_to_ids("<0xC3>") in ids  # the first byte of "\u00e9"
    assert loaded.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("name", list(FAMILIES))
def test_cli_generate_then_render(run_siso, tmp_path, modern_dirs, dino_dir, subject_photo, name):
    """siso generate on the family, then siso render with the preset's render steps and with the
    optimisation's own steps (which gives its best image again)."""
    out = tmp_path / "run"
    code, text = run_siso("generate", "--subject", subject_photo, "--prompt", PROMPT, "--out", out,
                          "--model", modern_dirs[name], "--dino-model", dino_dir, "--resolution", RESOLUTION,
                          "--device", "cpu", "--max-steps", "3", "--lr", "5e-3")
    assert code == 0, text
    record = json.loads((out / "run.json").read_text())
    assert record["backbone"] == FAMILIES[name][1] and len(record["losses"]) == 3
    steps = record["config"]["denoise_steps"]
    again = tmp_path / "again.png"
    code, text = run_siso("render", "--model", modern_dirs[name], "--lora", out / "lora", "--prompt", PROMPT,
                          "--out", again, "--steps", steps, "--resolution", RESOLUTION, "--device", "cpu")
    assert code == 0, text
    assert torch.equal(pil_to_tensor(Image.open(again)), pil_to_tensor(Image.open(out / "best.png")))
    beach = tmp_path / "beach.png"
    code, text = run_siso("render", "--model", modern_dirs[name], "--lora", out / "lora", "--prompt",
                          "a dog on the beach", "--out", beach, "--resolution", RESOLUTION, "--device", "cpu")
    assert code == 0, text
    assert Image.open(beach).size == (RESOLUTION, RESOLUTION)


@pytest.fixture(scope="module")
def eval_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench-models")
    return {"clip": tiny.metrics.clip_dir(root / "clip"),
            "detector": tiny.metrics.grounding_dino_dir(root / "detector")}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_siso_bench_and_the_app_run_the_family(run_siso, tmp_path, modern_dirs, dino_dir, subject_photo, eval_dirs,
                                               name):
    """The benchmark (one subject, one prompt, against the plain model) and the web app's generate and render
    handlers, on each family: the same loop, no special case."""
    from types import SimpleNamespace

    from siso.app import AppSettings, SisoApp
    from siso.eval.runner import read_results

    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"id": "dog", "class": "dog", "images": [str(subject_photo)],
                                    "prompts": ["a dog on the beach"]}) + "\n")
    out = tmp_path / "bench"
    code, text = run_siso("bench", manifest, "--out", out, "--model", modern_dirs[name], "--dino-model", dino_dir,
                          "--clip-model", eval_dirs["clip"], "--cmmd-model", eval_dirs["clip"], "--crop-model",
                          eval_dirs["detector"], "--fid-features", "dino", "--baseline", "plain", "--max-steps", "1",
                          "--resolution", RESOLUTION, "--device", "cpu")
    assert code == 0, text
    [record] = read_results(out)
    assert record["status"] == "done" and {image["method"] for image in record["images"]} == {"siso", "plain"}

    app = SisoApp(AppSettings(model=str(modern_dirs[name]), dino_model=str(dino_dir), resolution=RESOLUTION,
                              max_steps=2, device="cpu", runs_dir=tmp_path / "runs"))
    request = SimpleNamespace(session_hash="tab")
    list(app.start(request, [str(subject_photo)], PROMPT, str(modern_dirs[name]), 42, RESOLUTION, 2, 5e-3, None))
    run = app.session(request).run
    assert len(run.session.optimization.history) == 2 and (run.out_dir / "lora").is_dir()
    image_path, _ = app.render(request, str(modern_dirs[name]), None, True, "a dog on the beach", None, 42, RESOLUTION)
    assert Image.open(image_path).size == (RESOLUTION, RESOLUTION)
