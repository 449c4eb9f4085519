"""The same loop on transformer backbones: FLUX (schnell, and a dev-like variant with a guidance
embedding and resolution-shifted sigmas) and Sana, on tiny models in their real layouts.

Equivalence with the plain pipelines, the LoRA round trip through plain diffusers, gradient-step
truncation, the memory savers (exact by test), a planted subject the loop must recover, the
refusals, and the command line end to end.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RESOLUTION
from helpers import (
    PROMPT,
    assert_only_the_last_steps_carry_gradients,
    assert_planted_subject_recovered,
    assert_streams_exactly_when_the_gpu_is_too_small,
    lora_parameters,
    optimisation_pipeline_kwargs,
    plain_render,
    run_captured,
    tiny_config,
)
from PIL import Image
from safetensors.torch import load_file

from siso.backbones import load_backbone, render
from siso.errors import SisoError
from siso.generation import prepare_generation, run_generation, start_generation
from siso.images import pil_to_tensor
from siso.lora import attach_lora, save_lora, snapshot_lora

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def transformer_dirs(flux_dir, flux_dev_dir, sana_dir):
    return {"flux": flux_dir, "flux-dev": flux_dev_dir, "sana": sana_dir}


# -- the adapters ------------------------------------------------------------------------------


def test_adapters_are_chosen_from_model_index(flux_dir, sana_dir):
    flux = load_backbone(str(flux_dir), CPU, torch.float32)
    sana = load_backbone(str(sana_dir), CPU, torch.float32)
    assert type(flux).__name__ == "FluxBackbone" and flux.denoiser_name == "transformer"
    assert type(sana).__name__ == "SanaBackbone" and sana.denoiser_name == "transformer"
    # The method's numbers: FLUX.1-schnell one step without guidance, Sana 20 steps with 3 differentiated.
    assert (flux.preset.denoise_steps, flux.preset.grad_steps, flux.preset.guidance_scale) == (1, 1, 0.0)
    assert (flux.preset.learning_rate, flux.preset.render_steps) == (2e-4, 4)
    assert (sana.preset.denoise_steps, sana.preset.grad_steps, sana.preset.guidance_scale) == (20, 3, 4.5)
    assert (sana.preset.learning_rate, sana.preset.early_stop_patience, sana.preset.render_steps) == (8e-4, 5, 20)
    # Tiny VAEs halve; FLUX packs 2x2 latent patches, Sana's pipeline wants multiples of 32.
    assert flux.resolution_multiple == 4 and sana.resolution_multiple == 32
    with pytest.raises(SisoError, match="multiple of 32.*try 32 or 64"):
        sana.check_resolution(48)


@pytest.mark.parametrize("name", ["flux", "sana"])
def test_encode_is_the_inverse_layout_of_decode(transformer_dirs, name):
    """``encode`` (editing's entry) undoes decode's latent normalisation (and FLUX's packing): the
    round trip through siso equals the bare VAE's round trip."""
    backbone = load_backbone(str(transformer_dirs[name]), CPU, torch.float32)
    images = torch.rand(1, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    latents = backbone.encode(images)
    assert latents.shape == backbone.initial_latents(0, RESOLUTION, backbone.encode_prompt(PROMPT, RESOLUTION))[0].shape
    vae = backbone.pipeline.vae
    with torch.no_grad():
        encoded = vae.encode(images * 2 - 1)
        raw = encoded.latent_dist.mode() if name == "flux" else encoded.latent
        bare = (vae.decode(raw).sample / 2 + 0.5).clamp(0, 1)
        assert (backbone.decode(latents) - bare).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name,steps,grad_steps", [
    ("flux", 1, 1), ("flux", 4, 2), ("flux-dev", 1, 1), ("flux-dev", 3, 3), ("sana", 20, 3), ("sana", 5, 5),
])
def test_zero_lora_render_equals_plain_pipeline(transformer_dirs, name, steps, grad_steps):
    model_dir = transformer_dirs[name]
    backbone = load_backbone(str(model_dir), CPU, torch.float32)
    attach_lora(backbone, rank=4, train_text_encoder=name.startswith("flux"), seed=0)  # B = 0: changes nothing
    cond = backbone.encode_prompt(PROMPT, RESOLUTION)
    ours = render(backbone, cond, seed=42, resolution=RESOLUTION, num_steps=steps, grad_steps=grad_steps)
    assert ours.requires_grad
    reference = plain_render(model_dir, steps)
    assert ours.shape == reference.shape == (1, 3, RESOLUTION, RESOLUTION)
    assert (ours.detach() - reference).abs().max().item() <= 1e-5
    if steps <= 5:  # the comparison above is not vacuous (checked where it is cheap)
        other = plain_render(model_dir, steps, seed=7)
        assert (other - reference).abs().max().item() > 1e-2


@pytest.mark.parametrize("name,steps,grad_steps", [("flux", 4, 1), ("sana", 6, 3)])
def test_only_the_last_k_steps_are_differentiated(transformer_dirs, name, steps, grad_steps):
    backbone = load_backbone(str(transformer_dirs[name]), CPU, torch.float32)
    params = assert_only_the_last_steps_carry_gradients(backbone, steps, grad_steps)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize("name", ["flux", "sana"])
def test_memory_savers_change_nothing(transformer_dirs, name, tmp_path):
    """Gradient checkpointing and streaming the denoiser's block weights from CPU memory (what fits
    FLUX's transformer on smaller GPUs) are exact: same image, same gradients."""
    steps, grad_steps = (1, 1) if name == "flux" else (4, 2)
    results = {}
    for saver in ("none", "checkpointing", "streaming"):
        backbone = load_backbone(str(transformer_dirs[name]), CPU, torch.float32)
        resident = sum(p.numel() for p in backbone.denoiser.parameters())
        if saver == "checkpointing":
            backbone.enable_gradient_checkpointing()
        elif saver == "streaming":
            kept = backbone.stream_denoiser_blocks()
            assert backbone.denoiser.gradient_checkpointing
            assert kept > 0 and sum(p.numel() for p in backbone.denoiser.parameters()) == resident - kept // 4
        params = lora_parameters(attach_lora(backbone, rank=4, train_text_encoder=False, seed=0))
        assert all(p.requires_grad and p.numel() > 0 for p in params)  # LoRA weights are never streamed
        with torch.no_grad():
            for p in params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        image = render(backbone, backbone.encode_prompt(PROMPT, RESOLUTION), 42, RESOLUTION, steps, grad_steps)
        image.mean().backward()
        results[saver] = (image.detach(), [p.grad.clone() for p in params])
        if saver == "streaming":  # the plain pipeline and its LoRA loader (siso render, the web app) work on it
            save_lora(backbone, snapshot_lora(backbone), tmp_path / "lora")
            backbone.reset()
            backbone.pipeline.load_lora_weights(tmp_path / "lora")
            with torch.no_grad():
                plain = backbone.pipeline(
                    PROMPT, num_inference_steps=steps, guidance_scale=backbone.preset.guidance_scale,
                    height=RESOLUTION, width=RESOLUTION, generator=torch.Generator().manual_seed(42),
                    output_type="pt", **optimisation_pipeline_kwargs(type(backbone), steps),
                ).images
            assert (plain - image).abs().max().item() <= 1e-5
    image, grads = results["none"]
    for saver in ("checkpointing", "streaming"):
        assert torch.equal(results[saver][0], image)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[saver][1], grads, strict=True))


def test_flux_streams_its_blocks_exactly_when_the_gpu_is_too_small(monkeypatch, flux_dir):
    from siso.backbones import memory

    assert_streams_exactly_when_the_gpu_is_too_small(monkeypatch, flux_dir)
    # Only the repeated blocks stream; the embedders and the output projection stay resident.
    monkeypatch.setattr(memory, "cuda_memory_gib", lambda device: 0.5)
    backbone = load_backbone(str(flux_dir), CPU, torch.float32)
    assert backbone.streams_denoiser and not torch.nn.utils.parametrize.is_parametrized(backbone.denoiser.x_embedder)
    assert backbone.device == CPU


def test_frozen_text_encoders_leave_the_gpu_and_t5_runs_once(flux_dir, sana_dir, dino_dir, subject_photo):
    t5_calls = []
    session = prepare_generation(tiny_config(flux_dir, subject_photo, dino_dir, train_text_encoder=True, max_steps=2))
    backbone = session.backbone
    # CLIP carries a trained LoRA and stays; T5 is frozen, its embedding cached, so it is parked.
    assert backbone._offloaded == {"text_encoder_2"}
    backbone.pipeline.text_encoder_2.register_forward_pre_hook(lambda module, args: t5_calls.append(1))
    assert len(list(session)) == 2 and len(t5_calls) == 1  # the first iteration's encoding, then the cache
    assert backbone.offload_text_encoders() == ()  # nothing else may go: CLIP is being trained

    frozen = prepare_generation(tiny_config(flux_dir, subject_photo, dino_dir, max_steps=1,
                                            train_text_encoder=False)).backbone
    assert frozen._offloaded == {"text_encoder", "text_encoder_2"}
    before = frozen.encode_prompt(PROMPT, RESOLUTION)  # parked encoders still encode (they visit the GPU)
    frozen.restore_text_encoders()
    assert not frozen._offloaded
    assert torch.equal(before["pooled_prompt_embeds"], frozen.encode_prompt(PROMPT, RESOLUTION)["pooled_prompt_embeds"])

    sana = prepare_generation(tiny_config(sana_dir, subject_photo, dino_dir, max_steps=1)).backbone
    assert sana._offloaded == {"text_encoder"}


# -- the loop end to end ---------------------------------------------------------------------------


# FLUX with the CLIP text-encoder LoRA (as the reference runs it); Sana with guidance, 6 steps, 3 differentiated.
RUNS = {
    "flux": dict(train_text_encoder=True, max_steps=4),
    "sana": dict(denoise_steps=6, grad_steps=3, max_steps=4),
}


@pytest.fixture(scope="module", params=sorted(RUNS))
def finished_run(request, flux_dir, sana_dir, dino_dir, ir_dir, subject_photo, tmp_path_factory):
    model_dir = {"flux": flux_dir, "sana": sana_dir}[request.param]
    config = tiny_config(model_dir, subject_photo, dino_dir, ir_model=str(ir_dir), **RUNS[request.param])
    captured = run_captured(start_generation(config, tmp_path_factory.mktemp(f"run-{request.param}") / "run"))
    return request.param, model_dir, captured.result, captured.session


def test_lora_round_trip_through_plain_diffusers(finished_run):
    name, model_dir, result, session = finished_run
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["backbone"] == {"flux": "FluxBackbone", "sana": "SanaBackbone"}[name]
    assert record["config"]["lora_format"] == ["diffusers"]  # their default: no kohya file
    # the weights, plus the model card and its picture that diffusers' loader never reads
    files = sorted(p.name for p in result.lora_dir.iterdir())
    assert files == ["README.md", "best.png", "pytorch_lora_weights.safetensors"]
    state = load_file(result.lora_dir / "pytorch_lora_weights.safetensors")
    components = {key.split(".")[0] for key in state}
    assert components == ({"transformer", "text_encoder"} if name == "flux" else {"transformer"})
    if name == "flux":  # the image and the text stream of the double blocks both carry LoRA
        assert any(".attn.add_q_proj." in key for key in state) and any(".attn.to_add_out." in key for key in state)
    best = session.optimization.best_image
    assert result.best_step > 0, "the LoRA must have moved for this test to mean something"
    steps = session.config.denoise_steps
    assert (plain_render(model_dir, steps) - best).abs().max().item() > 1e-3
    again = plain_render(model_dir, steps, lora_dir=result.lora_dir)
    assert (again - best).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["flux", "sana"])
def test_planted_subject_is_recovered(name, flux_dir, sana_dir, dino_dir, ir_dir, subject_photo, tmp_path):
    """The subject photo is the model's own image under a hidden random LoRA; the loop must find it."""
    model_dir = {"flux": flux_dir, "sana": sana_dir}[name]
    options = dict(ir_model=str(ir_dir), max_steps=20, learning_rate=5e-2, early_stop_patience=20)
    if name == "sana":
        options.update(denoise_steps=4, grad_steps=2)
    assert_planted_subject_recovered(tiny_config(model_dir, subject_photo, dino_dir, **options), tmp_path)


# -- refusals ------------------------------------------------------------------------------------


def test_sana_refuses_text_encoder_lora(sana_dir, dino_dir, subject_photo, tmp_path):
    with pytest.raises(SisoError, match="--train-text-encoder does not apply.*Gemma-2.*Drop --train-text-encoder"):
        run_generation(tiny_config(sana_dir, subject_photo, dino_dir, train_text_encoder=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    backbone = load_backbone(str(sana_dir), CPU, torch.float32)
    with pytest.raises(SisoError, match="--train-text-encoder does not apply"):
        attach_lora(backbone, rank=4, train_text_encoder=True, seed=0)


@pytest.mark.parametrize("name", ["flux", "sana"])
def test_kohya_files_are_refused(name, flux_dir, sana_dir, dino_dir, subject_photo, tmp_path):
    model_dir = {"flux": flux_dir, "sana": sana_dir}[name]
    with pytest.raises(SisoError, match="--lora-format kohya is not available.*load_lora_weights"):
        run_generation(tiny_config(model_dir, subject_photo, dino_dir, lora_format=("diffusers", "kohya")),
                       tmp_path / "run")


# -- the command line ------------------------------------------------------------------------------




def test_cli_generate_then_render_with_flux(run_siso, monkeypatch, tmp_path, flux_dir, dino_dir, subject_photo):
    out = tmp_path / "run"
    code, text = run_siso("generate", "--subject", str(subject_photo), "--prompt", PROMPT,
                         "--out", str(out), "--model", str(flux_dir), "--dino-model", str(dino_dir),
                         "--resolution", str(RESOLUTION), "--device", "cpu", "--max-steps", "3", "--lr", "5e-3",
                         "--train-text-encoder")
    assert code == 0, text
    record = json.loads((out / "run.json").read_text())
    assert record["backbone"] == "FluxBackbone" and len(record["losses"]) == 3
    assert record["config"]["denoise_steps"] == 1 and record["config"]["learning_rate"] == 5e-3

    # The same seed, one step and the optimisation's 256 T5 tokens: exactly the best image again, through
    # the plain pipeline. Its default 512 tokens (what the reference renders with) give a different image.
    images = {}
    for tokens in ("256", None):
        again = tmp_path / f"again-{tokens}.png"
        code, text = run_siso("render", "--model", str(flux_dir), "--lora", str(out / "lora"), "--prompt", PROMPT,
                             "--out", str(again), "--steps", "1", "--resolution", str(RESOLUTION), "--device", "cpu",
                             *(["--prompt-tokens", tokens] if tokens else []))
        assert code == 0, text
        images[tokens] = pil_to_tensor(Image.open(again))
    assert torch.equal(images["256"], pil_to_tensor(Image.open(out / "best.png")))
    assert not torch.equal(images[None], images["256"])

    # Any prompt with the preset's 4 steps.
    beach = tmp_path / "beach.png"
    code, text = run_siso("render", "--model", str(flux_dir), "--lora", str(out / "lora"),
                         "--prompt", "a dog on the beach", "--out", str(beach), "--resolution", str(RESOLUTION),
                         "--device", "cpu")
    assert code == 0, text
    assert Image.open(beach).size == (RESOLUTION, RESOLUTION)


def test_cli_render_with_sana_uses_guidance_and_the_requested_size(run_siso, monkeypatch, tmp_path, sana_dir):
    out = tmp_path / "sana.png"
    code, text = run_siso("render", "--model", str(sana_dir), "--prompt", PROMPT,
                         "--out", str(out), "--steps", "3", "--resolution", str(RESOLUTION), "--device", "cpu")
    assert code == 0, text
    rendered = pil_to_tensor(Image.open(out))
    expected = plain_render(sana_dir, 3)  # guidance 4.5, no aspect-ratio binning
    assert rendered.shape == expected.shape and (rendered - expected).abs().max().item() <= 1 / 255 + 1e-6


def test_cli_refuses_text_encoder_lora_for_sana(run_siso, monkeypatch, tmp_path, sana_dir, dino_dir, subject_photo):
    code, text = run_siso("generate", "--subject", str(subject_photo), "--prompt", PROMPT,
                         "--out", str(tmp_path / "run"), "--model", str(sana_dir), "--dino-model", str(dino_dir),
                         "--resolution", str(RESOLUTION), "--device", "cpu", "--train-text-encoder")
    assert code == 2, text
    assert "--train-text-encoder does not apply" in text and "Traceback" not in text
    assert not (tmp_path / "run").exists()
