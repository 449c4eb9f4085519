"""ReNoise inversion (Garibi et al. 2024): map a photo to the latent an editing render starts from.

Inverting a sampler step means finding the noisier latent z_t whose step lands on the known,
less noisy z_{t-1}. Plain DDIM inversion guesses the noise prediction at z_{t-1} instead of at the
unknown z_t. ReNoise iterates the guess (predict at the current estimate of z_t, invert again),
averages the last estimates' predictions, and regularises them towards the statistics of a
forward-noised latent's prediction. For an ancestral sampler, whose steps add fixed noise, the
per-step noise is then nudged so the forward step lands where it should ("noise correction").

The samplers here are stateless (the step index comes from the timestep) and take their step noise
as an argument, so the edit's many renders through :func:`siso.backbones.sampling.render` all sample
the same trajectory. Numbers are ReNoise's defaults as the SISO reference runs them (method-facts).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

from ..backbones.base import Backbone, Conditioning
from ..backbones.sampling import StartPoint, scheduler_swapped
from ..errors import SisoError

SAMPLERS = ("ddim", "euler_ancestral")


@dataclass(frozen=True)
class ReNoiseSettings:
    """ReNoise's knobs; the defaults are those of the SISO reference (see method-facts)."""

    renoise_steps: int = 9
    #: at timesteps below ``first_step_max_timestep`` (the step next to the clean image) at most
    #: this many renoising iterations, averaged over ``first_step_average_range``.
    first_step_renoise_steps: int = 5
    first_step_max_timestep: int = 250
    average: bool = True
    average_range: tuple[int, int] = (8, 10)
    first_step_average_range: tuple[int, int] = (0, 5)
    lambda_kl: float = 0.065
    lambda_ac: float = 20.0
    regularization_steps: int = 4
    ac_rolls: int = 5
    #: ancestral samplers only: move each step's noise towards the noise that makes the forward
    #: step land on the known latent, by ``correction_iterations`` steps of length ``correction_step``.
    noise_correction: bool = True
    correction_iterations: int = 10
    correction_step: float = 1.8

    @classmethod
    def for_sampler(cls, sampler: str) -> ReNoiseSettings:
        """The reference's settings: DDIM (SD-Turbo) has no autocorrelation term and nothing to correct."""
        if sampler == "ddim":
            return cls(lambda_ac=0.0, noise_correction=False)
        return cls()

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


# -- samplers -----------------------------------------------------------------------------------


def _check_epsilon(config: Any) -> None:
    if config.prediction_type != "epsilon":
        raise SisoError(
            f"Editing inverts noise-predicting (epsilon) models; this one predicts {config.prediction_type!r}. "
            "Use stabilityai/sd-turbo or stabilityai/sdxl-turbo."
        )


class DDIMSampler(DDIMScheduler):
    """Deterministic DDIM (eta 0), which ReNoise uses for SD-Turbo; each step is an affine map, so
    it is exactly invertible given the noise prediction."""

    name = "ddim"
    needs_noise = False

    def _alphas(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = int(timestep)
        previous = t - self.config.num_train_timesteps // self.num_inference_steps
        alpha = self.alphas_cumprod[t]
        alpha_prev = self.alphas_cumprod[previous] if previous >= 0 else self.final_alpha_cumprod
        return alpha.double(), alpha_prev.double()

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
             noise: torch.Tensor | None = None, return_dict: bool = False) -> tuple[torch.Tensor]:
        """z_t -> z_{t-1} (the clean-image estimate is not clipped: SD-Turbo's config does not clip)."""
        alpha, alpha_prev = self._alphas(timestep)
        eps = model_output.float()
        clean = (sample.float() - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
        previous = math.sqrt(alpha_prev) * clean + math.sqrt(1 - alpha_prev) * eps
        return (previous.to(model_output.dtype),)

    def inverse_step(self, model_output: torch.Tensor, timestep: torch.Tensor, previous: torch.Tensor,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        """The z_t whose ``step`` with this noise prediction gives ``previous`` (= z_{t-1})."""
        alpha, alpha_prev = self._alphas(timestep)
        eps = model_output.float()
        clean = (previous.float() - math.sqrt(1 - alpha_prev) * eps) / math.sqrt(alpha_prev)
        return math.sqrt(alpha) * clean + math.sqrt(1 - alpha) * eps

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        alpha, _ = self._alphas(timestep)
        return math.sqrt(alpha) * clean + math.sqrt(1 - alpha) * noise


class AncestralSampler(EulerAncestralDiscreteScheduler):
    """Euler ancestral (SDXL-Turbo's own sampler) whose step noise is given, not drawn, and whose
    step index comes from the timestep, so repeated renders are identical and invertible."""

    name = "euler_ancestral"
    needs_noise = True

    def _sigmas(self, timestep: torch.Tensor) -> tuple[float, float, float]:
        index = self.index_for_timestep(timestep)
        sigma, sigma_to = float(self.sigmas[index]), float(self.sigmas[index + 1])
        sigma_up = math.sqrt(sigma_to**2 * (sigma**2 - sigma_to**2) / sigma**2)
        sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
        return sigma, sigma_down, sigma_up

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        sigma = float(self.sigmas[self.index_for_timestep(timestep)])
        return sample / math.sqrt(sigma**2 + 1)

    def step(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
             noise: torch.Tensor | None = None, return_dict: bool = False) -> tuple[torch.Tensor]:
        sigma, sigma_down, sigma_up = self._sigmas(timestep)
        previous = sample.float() + model_output.float() * (sigma_down - sigma)
        if sigma_up > 0:
            if noise is None:
                raise ValueError("an ancestral step needs its noise")
            previous = previous + noise.float() * sigma_up
        return (previous.to(model_output.dtype),)

    def inverse_step(self, model_output: torch.Tensor, timestep: torch.Tensor, previous: torch.Tensor,
                     noise: torch.Tensor | None = None) -> torch.Tensor:
        sigma, sigma_down, sigma_up = self._sigmas(timestep)
        sample = previous.float() - model_output.float() * (sigma_down - sigma)
        if sigma_up > 0:
            sample = sample - noise.float() * sigma_up
        return sample

    def adds_noise(self, timestep: torch.Tensor) -> bool:
        return self._sigmas(timestep)[2] > 0

    def required_noise(self, model_output: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor,
                       previous: torch.Tensor) -> torch.Tensor:
        """The step noise that makes ``step`` from ``sample`` land exactly on ``previous``."""
        sigma, sigma_down, sigma_up = self._sigmas(timestep)
        return (previous.float() - sample.float() - model_output.float() * (sigma_down - sigma)) / sigma_up

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sigma, _, _ = self._sigmas(timestep)
        return clean + sigma * noise


Sampler = DDIMSampler | AncestralSampler


def make_sampler(name: str, scheduler_config: Any, num_steps: int, device: torch.device) -> Sampler:
    """The editing sampler ``name``, built from the pipeline's scheduler config, set to ``num_steps``."""
    _check_epsilon(scheduler_config)
    classes = {"ddim": DDIMSampler, "euler_ancestral": AncestralSampler}
    if name not in classes:
        raise SisoError(f"Unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}.")
    sampler = classes[name].from_config(scheduler_config)
    sampler.set_timesteps(num_steps, device=device)
    return sampler


def edit_timesteps(sampler: Sampler, strength: float) -> torch.Tensor:
    """The last ``strength`` fraction of the sampler's steps (diffusers' img2img rule): 0.75 of 4
    steps leaves 3, starting at t=749 (``denoising_start`` 0.25)."""
    total = len(sampler.timesteps)
    count = min(int(total * strength + 1e-6), total)
    if count < 1:
        raise SisoError(
            f"--strength {strength} of {total} inversion steps leaves no step to edit; "
            f"use --strength of at least {1 / total:.2f} or more --inversion-steps."
        )
    return sampler.timesteps[total - count:]


# -- noise regularisation (pix2pix-zero's terms, as ReNoise adapts them) ---------------------------


def _patch_kl(eps: torch.Tensor, reference: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Sum over 4x4 patches (all channels) of |KL| between per-channel Gaussian fits of the two noises."""

    def patches(x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        x = x.unfold(2, patch, patch).unfold(3, patch, patch)  # B, C, h, w, p, p
        return x.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels, patch * patch)

    a, b = patches(eps), patches(reference)
    mean_a, mean_b = a.mean(-1), b.mean(-1)
    var_a, var_b = a.var(-1), b.var(-1)
    tiny = 1e-6
    kl = torch.log((var_b + tiny) / (var_a + tiny)) + (var_a + (mean_a - mean_b) ** 2) / (var_b + tiny) - 1
    return kl.abs().sum()


def _autocorrelation(eps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Squared mean products of each channel with a random shift of itself (down, and right), over a
    2x pyramid down to 8 pixels. One shift per channel and level, as the reference draws them."""
    x = eps[0]  # C, H, W
    loss = eps.new_zeros(())
    while True:
        channels, height, width = x.shape
        shifts = torch.randint(0, max(1, height // 2), (channels, 1), generator=generator).to(x.device)
        rows = (torch.arange(height, device=x.device) - shifts) % height  # torch.roll, per channel
        cols = (torch.arange(width, device=x.device) - shifts) % width
        down = x.gather(1, rows[:, :, None].expand(-1, -1, width))
        right = x.gather(2, cols[:, None, :].expand(-1, height, -1))
        loss = loss + ((x * down).mean(dim=(1, 2)) ** 2).sum() + ((x * right).mean(dim=(1, 2)) ** 2).sum()
        if height <= 8:
            return loss
        height, width = height // 2 * 2, width // 2 * 2  # 2x2 average pooling, as avg_pool2d
        x = x[:, :height, :width].reshape(channels, height // 2, 2, width // 2, 2).mean(dim=(2, 4))


def regularize(eps: torch.Tensor, reference: torch.Tensor | None, settings: ReNoiseSettings,
               generator: torch.Generator) -> torch.Tensor:
    """Gradient steps that pull the predicted noise towards noise-like statistics."""
    if reference is None or settings.regularization_steps == 0:
        return eps
    eps = eps.detach().float()
    with torch.enable_grad():
        for _ in range(settings.regularization_steps):
            if settings.lambda_kl > 0:
                leaf = eps.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(_patch_kl(leaf, reference), leaf)
                eps = eps - settings.lambda_kl * grad.clamp(-100, 100)
            if settings.lambda_ac > 0:
                for _ in range(settings.ac_rolls):
                    leaf = eps.clone().requires_grad_(True)
                    (grad,) = torch.autograd.grad(_autocorrelation(leaf, generator), leaf)
                    eps = eps - settings.lambda_ac * grad / settings.ac_rolls
    return eps.detach()


# -- inversion ------------------------------------------------------------------------------------


class _NoisePrediction:
    """Stands in for the scheduler inside ``Backbone.denoise_step`` so that the "step" returns the
    model's noise prediction itself: inversion needs predictions, not steps, and this keeps the
    adapter's own way of calling its denoiser (conditioning, SDXL's extra inputs)."""

    def __init__(self, sampler: Sampler, dtype: torch.dtype) -> None:
        self.sampler = sampler
        self.dtype = dtype

    def scale_model_input(self, sample: torch.Tensor, timestep: Any) -> torch.Tensor:
        return self.sampler.scale_model_input(sample, timestep).to(self.dtype)

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, **_: Any) -> tuple[torch.Tensor]:
        return (model_output,)


Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def noise_predictor(backbone: Backbone, cond: Conditioning, sampler: Sampler) -> Predict:
    """``predict(latents, t)`` -> the denoiser's noise prediction in float32, without gradients."""
    stand_in = _NoisePrediction(sampler, cond["prompt_embeds"].dtype)  # the frozen weights' dtype

    @torch.no_grad()
    def predict(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        with scheduler_swapped(backbone, stand_in):
            return backbone.denoise_step(latents, timestep, cond, {}).float()

    return predict


@dataclass
class Inversion:
    """An inverted photo: the latent the edit starts from, and how to sample on from it."""

    latents: torch.Tensor  # float32, at ``timesteps[0]``
    encoded: torch.Tensor  # the photo's VAE latents (z_0)
    sampler: Sampler
    timesteps: torch.Tensor  # the edit's steps, noisiest first
    step_noise: tuple[torch.Tensor, ...] | None  # per edit step (ancestral samplers), after correction
    settings: ReNoiseSettings
    trajectory: list[torch.Tensor]  # z_0 and each inverted latent, least noisy first

    def start_point(self, dtype: torch.dtype) -> StartPoint:
        kwargs = tuple({"noise": n} for n in self.step_noise) if self.step_noise is not None else ()
        return StartPoint(latents=self.latents.to(dtype), timesteps=self.timesteps, scheduler=self.sampler,
                          step_kwargs=kwargs)


def invert(backbone: Backbone, image: torch.Tensor, cond: Conditioning, *, sampler: str = "ddim",
           num_steps: int = 4, strength: float = 0.75, settings: ReNoiseSettings | None = None,
           seed: int = 0) -> Inversion:
    """Invert ``image`` ((1, 3, H, W) in [0, 1]) with ReNoise under the prompt conditioning ``cond``.

    ``num_steps`` sampler steps span the whole schedule; the last ``strength`` of them are inverted
    (and later re-run by the edit). ``seed`` draws the ancestral step noise, the forward noise of the
    regularisation's reference and the autocorrelation shifts.
    """
    settings = settings or ReNoiseSettings.for_sampler(sampler)
    steps = make_sampler(sampler, backbone.pipeline.scheduler.config, num_steps, backbone.device)
    timesteps = edit_timesteps(steps, strength)
    predict = noise_predictor(backbone, cond, steps)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        encoded = backbone.encode(image).float()
    shape = encoded.shape
    # One noise per sampler step (indexed like the schedule), drawn on the CPU so a seed means the same
    # everywhere; the regularisation's forward noise is one more draw.
    schedule_noise = [torch.randn(shape, generator=generator).to(encoded.device) for _ in steps.timesteps]
    forward_noise = torch.randn(shape, generator=generator).to(encoded.device)
    index_of = {float(t): i for i, t in enumerate(steps.timesteps)}
    latents, trajectory = encoded, [encoded]
    for timestep in reversed(timesteps):
        index = index_of[float(timestep)]
        noise = schedule_noise[index] if steps.needs_noise else None
        latents = _renoise_step(predict, steps, latents, timestep, encoded, noise, forward_noise, settings,
                                generator)
        if steps.needs_noise and settings.noise_correction:
            schedule_noise[index] = _corrected_noise(predict, steps, latents, timestep, trajectory[-1],
                                                     schedule_noise[index], settings)
        trajectory.append(latents)
    step_noise = tuple(schedule_noise[index_of[float(t)]] for t in timesteps) if steps.needs_noise else None
    return Inversion(latents=latents, encoded=encoded, sampler=steps, timesteps=timesteps, step_noise=step_noise,
                     settings=settings, trajectory=trajectory)


def _renoise_step(predict: Predict, sampler: Sampler, previous: torch.Tensor, timestep: torch.Tensor,
                  encoded: torch.Tensor, noise: torch.Tensor | None, forward_noise: torch.Tensor,
                  settings: ReNoiseSettings, generator: torch.Generator) -> torch.Tensor:
    """One inverted step: from the known z_{t-1} (``previous``) to an estimate of z_t."""
    first = float(timestep) < settings.first_step_max_timestep
    if first:
        iterations = min(settings.first_step_renoise_steps, settings.renoise_steps)
        low, high = settings.first_step_average_range
    else:
        iterations = settings.renoise_steps
        low, high = settings.average_range
    reference = None
    if settings.regularization_steps > 0 and (settings.lambda_kl > 0 or settings.lambda_ac > 0):
        # What the model predicts at a truly forward-noised latent: the statistics to pull towards.
        reference = predict(sampler.noised(encoded, forward_noise, timestep), timestep)
    estimate, average, averaged = previous, None, 0
    for i in range(iterations + 1):  # iteration 0 is plain inversion; 1.. are the renoising ones
        eps = predict(estimate, timestep)
        if settings.average and low <= i < high:
            average = eps if average is None else average + (eps - average) / (averaged + 1)
            averaged += 1
        if i >= low or (not settings.average and i > 0):
            eps = regularize(eps, reference, settings, generator)
        estimate = sampler.inverse_step(eps, timestep, previous, noise)
    if average is not None:
        estimate = sampler.inverse_step(regularize(average, reference, settings, generator), timestep, previous, noise)
    return estimate


def _corrected_noise(predict: Predict, sampler: AncestralSampler, latents: torch.Tensor, timestep: torch.Tensor,
                     previous: torch.Tensor, noise: torch.Tensor, settings: ReNoiseSettings) -> torch.Tensor:
    """Move the step noise towards the noise that makes the forward step from ``latents`` land on
    ``previous``: fixed-length steps along the difference, as the reference's optimiser moves it."""
    if not sampler.adds_noise(timestep):  # the last step lands on the clean latent without noise
        return noise
    required = sampler.required_noise(predict(latents, timestep), timestep, latents, previous)
    noise = noise.float()
    for _ in range(settings.correction_iterations):
        difference = noise - required
        distance = difference.norm()
        if distance == 0:
            break
        noise = noise - settings.correction_step * difference / distance
    return noise


@torch.no_grad()
def denoise_latents(backbone: Backbone, cond: Conditioning, start: StartPoint) -> torch.Tensor:
    """Run ``start`` to the end and return the final latents (a measurement; the edit itself renders
    through :func:`siso.backbones.sampling.render`)."""
    latents = start.latents
    kwargs = start.step_kwargs or [{}] * len(start.timesteps)
    with scheduler_swapped(backbone, start.scheduler):
        for timestep, step_kwargs in zip(start.timesteps, kwargs, strict=True):
            latents = backbone.denoise_step(latents, timestep, cond, step_kwargs)
    return latents.float()


def inversion_residual(backbone: Backbone, cond: Conditioning, inversion: Inversion) -> float:
    """How far re-denoising the inverted latent lands from the encoded photo: ||z_0' - z_0|| / ||z_0||."""
    landed = denoise_latents(backbone, cond, inversion.start_point(cond["prompt_embeds"].dtype))
    return float((landed - inversion.encoded).norm() / inversion.encoded.norm())
