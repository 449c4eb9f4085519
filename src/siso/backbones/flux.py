"""FLUX.1 checkpoints (FLUX.1-schnell): a 12B MM-DiT on packed 2x2 latent patches, flow matching.

Conditioning comes from two encoders: CLIP gives the pooled vector (and may carry a LoRA), T5-XXL
the token sequence (never trained; its output is computed once per prompt). Every piece of the
sampler is the pipeline's own: prompt encoding, latent packing and position ids, the
resolution-dependent sigma shift, the Euler step, unpacking before the VAE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from ..presets import FLUX_SCHNELL, BackbonePreset
from .base import Backbone, Conditioning


class FluxBackbone(Backbone):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("FluxPipeline",)
    denoiser_name: ClassVar[str] = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)  # CLIP
    frozen_text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder_2",)  # T5-XXL
    preset: ClassVar[BackbonePreset] = FLUX_SCHNELL
    #: counted by benchmarks/count_memory.py: GiB at 512 px, bf16, DINO + IR, by denoiser size (billions)
    activation_gib_512: ClassVar[Mapping[float, Mapping[str, float]]] = {
        11.891: {"plain": 13.63, "checkpoint-vae": 12.56, "checkpoint-all": 3.52},
    }
    streams_when_short: ClassVar[bool] = True

    @property
    def resolution_multiple(self) -> int:
        # The VAE's factor, times 2 for the 2x2 packing of latent patches.
        return self.pipeline.vae_scale_factor * 2

    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        pipe = self.pipeline
        with self.text_encoders_on_device("text_encoder"):
            pooled = pipe._get_clip_prompt_embeds(prompt=prompt, device=self.device, num_images_per_prompt=1)
        prompt_embeds = self._t5_embeds(prompt)
        # As FluxPipeline.encode_prompt: text position ids are zeros.
        dtype = pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.transformer.dtype
        text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(device=self.device, dtype=dtype)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled, "text_ids": text_ids}

    def _t5_embeds(self, prompt: str) -> torch.Tensor:
        """T5 is frozen: its sequence embedding is computed once per prompt (:meth:`frozen_embedding`)."""
        def compute() -> torch.Tensor:
            with self.text_encoders_on_device("text_encoder_2"):
                return self.pipeline._get_t5_prompt_embeds(prompt=prompt, num_images_per_prompt=1,
                                                           max_sequence_length=self.prompt_max_tokens,
                                                           device=self.device)

        return self.frozen_embedding("t5", prompt, compute)

    def initial_latents(self, seed: int, resolution: int, cond: Conditioning) -> tuple[torch.Tensor, dict]:
        generator = torch.Generator(self.device).manual_seed(seed)
        latents, image_ids = self.pipeline.prepare_latents(
            1, self.denoiser.config.in_channels // 4, resolution, resolution, cond["prompt_embeds"].dtype,
            self.device, generator,
        )
        if self.denoiser.config.guidance_embeds:  # FLUX.1-dev: guidance is an input, not a second pass
            guidance = torch.full([1], self.preset.guidance_scale, device=self.device, dtype=torch.float32)
            guidance = guidance.expand(latents.shape[0])
        else:
            guidance = None
        return latents, {"img_ids": image_ids, "guidance": guidance}

    def set_timesteps(self, num_steps: int, resolution: int | None = None) -> torch.Tensor:
        if resolution is None:
            raise ValueError("FLUX's sigma schedule depends on the image size: pass resolution")
        scheduler = self.pipeline.scheduler
        # FluxPipeline.__call__'s schedule: linear sigmas, shifted by mu for the image's token count.
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        image_seq_len = (resolution // self.resolution_multiple) ** 2
        mu = calculate_shift(
            image_seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def denoise_step(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     step_kwargs: Mapping[str, Any]) -> torch.Tensor:
        model_timestep = timestep.expand(latents.shape[0]).to(latents.dtype)
        noise_pred = self.denoiser(
            hidden_states=latents,
            timestep=model_timestep / 1000,
            guidance=step_kwargs["guidance"],
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=cond["text_ids"],
            img_ids=step_kwargs["img_ids"],
            joint_attention_kwargs={},
            return_dict=False,
        )[0]
        return self.pipeline.scheduler.step(noise_pred, timestep, latents, return_dict=False)[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> packed latents, as FluxImg2ImgPipeline prepares them (posterior mean)."""
        vae = self.pipeline.vae
        latents = vae.encode(images.to(self.device, vae.dtype) * 2.0 - 1.0).latent_dist.mode()
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        return self.pipeline._pack_latents(latents, *latents.shape)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pipe = self.pipeline
        vae = pipe.vae
        # Images are square: the packed sequence is (side / 16)^2 patches long.
        patches_per_side = math.isqrt(latents.shape[1])
        side = patches_per_side * self.resolution_multiple
        latents = pipe._unpack_latents(latents, side, side, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")
