"""The one interface a backbone adapter offers the loop, and the one differentiable sampler.

An adapter wraps an ordinary diffusers pipeline and reuses its own methods (prompt encoding,
latent preparation, scheduler) so that, with a zero LoRA, our render is the pipeline's render.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from ..config import BackbonePreset
from ..errors import SisoError

Conditioning = Mapping[str, Any]


class Backbone(ABC):
    """A text-to-image model seen as: prompt -> conditioning; noise -> denoised latents -> image.

    Subclasses name the diffusers pipeline classes they serve and the trainable components.
    """

    #: model_index.json ``_class_name`` values this adapter serves.
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: the component that gets the LoRA, and the text encoders that optionally do.
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    preset: ClassVar[BackbonePreset] = BackbonePreset()

    def __init__(self, pipeline: DiffusionPipeline, model_id: str) -> None:
        self.pipeline = pipeline
        self.model_id = model_id

    # -- components -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def text_encoders(self) -> dict[str, torch.nn.Module]:
        return {name: getattr(self.pipeline, name) for name in self.text_encoder_names}

    @property
    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Every weight-holding component, for freezing and for checking nothing frozen moved."""
        modules = {name: getattr(self.pipeline, name) for name in self.pipeline.components}
        return {name: m for name, m in modules.items() if isinstance(m, torch.nn.Module)}

    # -- the pieces of a render -------------------------------------------------------------
    @property
    @abstractmethod
    def resolution_multiple(self) -> int:
        """Image sides must be a multiple of this (VAE factor times the denoiser's downsampling)."""

    @abstractmethod
    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        """Prompt (and output size, which SDXL conditions on) -> what the denoiser is conditioned on.

        Differentiable when text-encoder LoRA is on.
        """

    @abstractmethod
    def denoise_step(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     step_kwargs: Mapping[str, Any]) -> torch.Tensor:
        """One sampler step: model prediction, then the scheduler's update."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, H, W) image in [0, 1], differentiable."""

    def initial_latents(self, seed: int, resolution: int, cond: Conditioning) -> tuple[torch.Tensor, dict]:
        """The noise the plain pipeline draws for ``torch.Generator(device).manual_seed(seed)``.

        Returns the latents and the scheduler step kwargs; the same generator object goes into
        both, as in the pipeline, so ancestral samplers draw the same step noise too.
        """
        generator = torch.Generator(self.device).manual_seed(seed)
        latents = self.pipeline.prepare_latents(
            1, self.denoiser.config.in_channels, resolution, resolution,
            cond["prompt_embeds"].dtype, self.device, generator,
        )
        return latents, self.pipeline.prepare_extra_step_kwargs(generator, 0.0)

    def set_timesteps(self, num_steps: int) -> torch.Tensor:
        timesteps, _ = retrieve_timesteps(self.pipeline.scheduler, num_steps, self.device)
        if hasattr(self.pipeline.scheduler, "set_begin_index"):
            self.pipeline.scheduler.set_begin_index(0)
        return timesteps

    def check_resolution(self, resolution: int) -> None:
        multiple = self.resolution_multiple
        if resolution % multiple:
            lower = max(multiple, resolution - resolution % multiple)
            raise SisoError(
                f"--resolution {resolution} is not a multiple of {multiple}, which {self.model_id} needs "
                f"(its VAE and denoiser downsample by that much); try {lower} or {lower + multiple}."
            )

    # -- LoRA files -------------------------------------------------------------------------
    def save_lora_weights(self, directory: str, layers: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Write diffusers-format LoRA files with the pipeline class's own saver.

        ``layers`` maps a component name (``unet``, ``text_encoder``, ...) to its diffusers-format
        LoRA state dict.
        """
        kwargs = {f"{name}_lora_layers": dict(state) for name, state in layers.items() if state}
        type(self.pipeline).save_lora_weights(directory, safe_serialization=True, **kwargs)


def render(backbone: Backbone, cond: Conditioning, seed: int, resolution: int,
           num_steps: int, grad_steps: int) -> torch.Tensor:
    """Sample an image from the seed's fixed noise; only the last ``grad_steps`` steps carry autograd.

    This is the only place in siso that decides which denoising steps are differentiated: the
    earlier steps run under ``no_grad`` (their LoRA effect is real, but not optimised through),
    and nothing is differentiated at all when the caller disabled gradients.
    """
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [0, {num_steps}], got {grad_steps}")
    latents, step_kwargs = backbone.initial_latents(seed, resolution, cond)
    timesteps = backbone.set_timesteps(num_steps)
    first_grad_step = len(timesteps) - grad_steps
    want_grad = torch.is_grad_enabled()
    for index, timestep in enumerate(timesteps):
        with torch.set_grad_enabled(want_grad and index >= first_grad_step):
            latents = backbone.denoise_step(latents, timestep, cond, step_kwargs)
    with torch.set_grad_enabled(want_grad and grad_steps > 0):
        return backbone.decode(latents)
