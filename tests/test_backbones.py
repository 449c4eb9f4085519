"""Our differentiable render against the plain diffusers pipeline, and the gradient-step truncation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RESOLUTION
from helpers import PROMPT, lora_parameters, plain_render

from siso.backbones import load_backbone, render
from siso.errors import SisoError
from siso.lora import attach_lora

CPU = torch.device("cpu")


@pytest.mark.parametrize("steps,grad_steps", [(1, 1), (3, 2)])
def test_zero_lora_render_equals_plain_pipeline(model_dir, steps, grad_steps):
    backbone = load_backbone(str(model_dir), CPU, torch.float32)
    attach_lora(backbone, rank=4, train_text_encoder=False, seed=0)  # B = 0: must change nothing
    cond = backbone.encode_prompt(PROMPT, RESOLUTION)
    ours = render(backbone, cond, seed=42, resolution=RESOLUTION, num_steps=steps, grad_steps=grad_steps)
    assert ours.requires_grad
    reference = plain_render(model_dir, steps)
    assert ours.shape == reference.shape == (1, 3, RESOLUTION, RESOLUTION)
    assert (ours.detach() - reference).abs().max().item() <= 1e-5
    # A different seed is a different image: the comparison above is not vacuous.
    other = plain_render(model_dir, steps, seed=7)
    assert (other - reference).abs().max().item() > 1e-2


def test_only_the_last_k_steps_are_differentiated(sd_dir):
    backbone = load_backbone(str(sd_dir), CPU, torch.float32)
    params = lora_parameters(attach_lora(backbone, rank=4, train_text_encoder=False, seed=0))
    with torch.no_grad():
        for p in params:  # a non-zero LoRA, so every step depends on the parameters
            p.add_(0.05 * torch.randn_like(p))
    grad_modes: list[bool] = []
    hook = backbone.denoiser.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    cond = backbone.encode_prompt(PROMPT, RESOLUTION)
    try:
        image = render(backbone, cond, seed=42, resolution=RESOLUTION, num_steps=4, grad_steps=1)
        assert grad_modes == [False, False, False, True]
        grad_modes.clear()
        image_k3 = render(backbone, cond, seed=42, resolution=RESOLUTION, num_steps=4, grad_steps=3)
        assert grad_modes == [False, True, True, True]
        grad_modes.clear()
        with torch.no_grad():
            reference = render(backbone, cond, seed=42, resolution=RESOLUTION, num_steps=4, grad_steps=4)
        assert grad_modes == [False] * 4
    finally:
        hook.remove()
    # Truncating the graph changes nothing in the forward pass.
    assert torch.equal(image.detach(), reference)
    assert torch.equal(image_k3.detach(), reference)
    image.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_adapter_is_chosen_from_model_index(sd_dir, sdxl_dir):
    assert type(load_backbone(str(sd_dir), CPU, torch.float32)).__name__ == "StableDiffusionBackbone"
    assert type(load_backbone(str(sdxl_dir), CPU, torch.float32)).__name__ == "StableDiffusionXLBackbone"


def test_unsupported_pipeline_is_refused(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(SisoError, match="KandinskyPipeline.*StableDiffusionPipeline"):
        load_backbone(str(tmp_path), CPU, torch.float32)


def test_directory_without_model_index_is_refused(tmp_path):
    with pytest.raises(SisoError, match="model_index.json"):
        load_backbone(str(tmp_path), CPU, torch.float32)


def test_resolution_must_fit_the_model(sd_dir):
    backbone = load_backbone(str(sd_dir), CPU, torch.float32)
    assert backbone.resolution_multiple == 4  # tiny VAE halves, tiny UNet downsamples once
    backbone.check_resolution(32)
    with pytest.raises(SisoError, match="multiple of 4.*try 32 or 36"):
        backbone.check_resolution(34)
