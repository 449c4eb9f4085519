"""ReNoise inversion on tiny models: its samplers invert exactly, it follows the reference's schedule,
and it is measured (not assumed) to invert better than plain inversion."""

from __future__ import annotations

import pytest
import tiny
import torch
from conftest import RESOLUTION
from helpers import lora_parameters
from PIL import Image

from siso.backbones import load_backbone
from siso.backbones.sampling import render
from siso.editing.inversion import (
    ReNoiseSettings,
    _autocorrelation,
    _patch_kl,
    denoise_latents,
    edit_timesteps,
    inversion_residual,
    invert,
    make_sampler,
    regularize,
)
from siso.editing.masks import square_crop
from siso.images import load_image, pil_to_tensor
from siso.lora import attach_lora

CPU = torch.device("cpu")
PROMPT = "a photo of a cat"

#: plain inversion, for comparison: one noise prediction per step, at the known latent; nothing else
PLAIN_INVERSION = ReNoiseSettings(renoise_steps=0, first_step_renoise_steps=0, average=False, regularization_steps=0,
                                  noise_correction=False)


@pytest.fixture(scope="session")
def scene(scene_photo) -> Image.Image:
    return square_crop(load_image(scene_photo), RESOLUTION)


@pytest.fixture(scope="session")
def unit_sd_dir(tmp_path_factory, scene):
    return tiny.editing.unit_latent_sd_dir(tmp_path_factory.mktemp("tiny-sd-unit"), scene)


@pytest.fixture(scope="session")
def unit_sd(unit_sd_dir):
    backbone = load_backbone(str(unit_sd_dir), CPU, torch.float32)
    with torch.no_grad():
        cond = backbone.encode_prompt(PROMPT, RESOLUTION)
    return backbone, cond


@pytest.mark.fidelity("edit.inversion_latents")
@pytest.mark.parametrize("name", ["ddim", "euler_ancestral"])
def test_inverse_step_undoes_step(sd_dir, name):
    backbone = load_backbone(str(sd_dir), CPU, torch.float32)
    sampler = make_sampler(name, backbone.pipeline.scheduler.config, 4, CPU)
    assert [int(t) for t in edit_timesteps(sampler, 0.75)] == [749, 499, 249]  # denoising_start 0.25
    generator = torch.Generator().manual_seed(0)
    previous, eps, noise = (torch.randn(1, 4, 8, 8, generator=generator, dtype=torch.float64).float()
                            for _ in range(3))
    for timestep in sampler.timesteps:
        latents = sampler.inverse_step(eps, timestep, previous, noise)
        (again,) = sampler.step(eps, timestep, latents, noise=noise)
        assert torch.allclose(again, previous, atol=1e-5), int(timestep)


@pytest.fixture(scope="session")
def inversions(unit_sd, scene):
    """Plain and ReNoise inversion of the scene with both samplers, with the denoiser's calls counted:
    ``{(sampler, "plain" | "renoise"): (timesteps predicted at, residual, reconstruction error)}``.

    The tiny VAE is random, so no inversion can give the photo back exactly: the reconstruction error
    is measured against the VAE's own image of the scene, decode(encode(scene)), which a perfect
    inversion reproduces.
    """
    backbone, cond = unit_sd
    image = pil_to_tensor(scene)
    calls: list[float] = []
    hook = backbone.denoiser.register_forward_pre_hook(lambda module, args: calls.append(float(args[1])))
    results = {}
    try:
        for sampler in ("ddim", "euler_ancestral"):
            for name, settings in (("plain", PLAIN_INVERSION),
                                   ("renoise", ReNoiseSettings.for_sampler(sampler))):
                calls.clear()
                inversion = invert(backbone, image, cond, sampler=sampler, settings=settings, seed=0)
                predicted = list(calls)
                with torch.no_grad():
                    reconstruction = render(backbone, cond, 0, RESOLUTION, 3, 0,
                                            start=inversion.start_point(torch.float32))
                    target = backbone.decode(inversion.encoded)
                results[sampler, name] = (predicted, inversion_residual(backbone, cond, inversion),
                                          float(((reconstruction - target) ** 2).mean()))
    finally:
        hook.remove()
    return results


def test_renoise_follows_the_reference_schedule(inversions):
    """9 renoising iterations (10 predictions), at most 5 below t=250, one reference prediction per step
    for the regularisation, and one more per noisy ancestral step for the noise correction."""
    ddim, ancestral = inversions["ddim", "renoise"][0], inversions["euler_ancestral", "renoise"][0]
    assert [ddim.count(t) for t in (249, 499, 749)] == [1 + 6, 1 + 10, 1 + 10]
    assert [ancestral.count(t) for t in (249, 499, 749)] == [1 + 6, 1 + 10 + 1, 1 + 10 + 1]
    assert inversions["ddim", "plain"][0] == [249, 499, 749]


def test_regularisation_pulls_noise_towards_noise_statistics():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(1, 4, 16, 16, generator=generator)
    # A prediction too large and spatially correlated (each value shared with its neighbours).
    base = torch.randn(1, 4, 16, 16, generator=generator)
    eps = base + base.roll(1, -1) + base.roll(1, -2) + base.roll((1, 1), (-1, -2))
    eps = 1.5 * eps / eps.std()
    regularised = regularize(eps, reference, ReNoiseSettings(), torch.Generator().manual_seed(1))
    assert _patch_kl(regularised, reference) < 0.5 * _patch_kl(eps, reference)
    assert (_autocorrelation(regularised, torch.Generator().manual_seed(2))
            < 0.2 * _autocorrelation(eps, torch.Generator().manual_seed(2)))
    assert torch.equal(regularize(eps, reference, PLAIN_INVERSION, generator), eps)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral"])
def test_renoise_inverts_better_than_plain_inversion(inversions, sampler, record_property):
    """Measured with the method's settings: the residual (re-denoising the inverted latent vs the encoded
    scene, relative) and the reconstruction's error (see ``inversions``)."""
    (_, plain_residual, plain_error), (_, renoise_residual, renoise_error) = (
        inversions[sampler, "plain"], inversions[sampler, "renoise"])
    figures = {"plain": (plain_residual, plain_error), "renoise": (renoise_residual, renoise_error)}
    record_property("inversion", figures)
    print(sampler, figures)
    assert renoise_residual < 0.7 * plain_residual, figures
    assert renoise_error < 0.7 * plain_error, figures


def test_edit_render_differentiates_every_step_and_restores_the_scheduler(sd_dir, scene):
    backbone = load_backbone(str(sd_dir), CPU, torch.float32)
    params = lora_parameters(attach_lora(backbone, rank=4, train_text_encoder=False, seed=0))
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    cond = backbone.encode_prompt(PROMPT, RESOLUTION)
    inversion = invert(backbone, pil_to_tensor(scene), cond, settings=PLAIN_INVERSION)
    start = inversion.start_point(torch.float32)
    scheduler, config = backbone.pipeline.scheduler, dict(backbone.pipeline.config)
    modes: list[bool] = []
    hook = backbone.denoiser.register_forward_pre_hook(lambda module, args: modes.append(torch.is_grad_enabled()))
    try:
        image = render(backbone, cond, 0, RESOLUTION, 3, 3, start=start)
    finally:
        hook.remove()
    assert modes == [True, True, True]
    assert backbone.pipeline.scheduler is scheduler and dict(backbone.pipeline.config) == config
    with torch.no_grad():
        assert torch.allclose(image.detach(), backbone.decode(denoise_latents(backbone, cond, start)), atol=1e-6)
    image.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with pytest.raises(ValueError, match="start point"):
        render(backbone, cond, 0, RESOLUTION, 4, 1, start=start)
