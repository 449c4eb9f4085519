"""Stable Diffusion 3 / 3.5 checkpoints (SD3.5 Large Turbo): an MM-DiT on 2x2 latent patches, flow matching.

Three text encoders: CLIP-L and CLIP-G give the pooled vector and the first part of the token sequence
(they may carry a LoRA), T5-XXL the rest (never trained; its output is computed once per prompt). Every
piece of the sampler is the pipeline's own: prompt encoding and how its parts are joined, latent
preparation, the (optionally resolution-shifted) flow-matching sigmas, the Euler step, the VAE's shift
and scale. Classifier-free guidance, when the preset asks for it, runs both prompts as one batch as
``StableDiffusion3Pipeline.__call__`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from ..presets import SD35_TURBO, BackbonePreset
from .base import Backbone, Conditioning


class StableDiffusion3Backbone(Backbone):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusion3Pipeline",)
    denoiser_name: ClassVar[str] = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # CLIP-L, CLIP-G
    frozen_text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder_3",)  # T5-XXL
    preset: ClassVar[BackbonePreset] = SD35_TURBO
    #: counted by benchmarks/count_memory.py: GiB at 512 px, bf16, DINO + IR, by denoiser size (billions)
    activation_gib_512: ClassVar[Mapping[float, Mapping[str, float]]] = {
        8.057: {"plain": 11.81, "checkpoint-vae": 10.74, "checkpoint-all": 3.24},
    }
    streams_when_short: ClassVar[bool] = True

    @property
    def resolution_multiple(self) -> int:
        # StableDiffusion3Pipeline.check_inputs: the VAE's factor times the transformer's patch size.
        return self.pipeline.vae_scale_factor * self.denoiser.config.patch_size

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.preset.guidance_scale > 1.0  # as StableDiffusion3Pipeline decides it

    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        embeds, pooled = self._encode(prompt)
        if self.do_classifier_free_guidance:
            negative, negative_pooled = self._encode("")
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """StableDiffusion3Pipeline.encode_prompt's joining of the three encoders' outputs, with T5's
        part computed once per prompt (it is frozen) and the CLIP parts each call (they may be trained)."""
        pipe = self.pipeline
        with self.text_encoders_on_device(*self.text_encoder_names):
            clip_l, pooled_l = pipe._get_clip_prompt_embeds(prompt=prompt, device=self.device, clip_model_index=0)
            clip_g, pooled_g = pipe._get_clip_prompt_embeds(prompt=prompt, device=self.device, clip_model_index=1)

        def t5() -> torch.Tensor:
            with self.text_encoders_on_device("text_encoder_3"):
                return pipe._get_t5_prompt_embeds(prompt=prompt, max_sequence_length=self.prompt_max_tokens,
                                                  device=self.device)

        t5_embeds = self.frozen_embedding("t5", prompt, t5)
        clip = torch.cat([clip_l, clip_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5_embeds.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5_embeds], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)

    def initial_latents(self, seed: int, resolution: int, cond: Conditioning) -> tuple[torch.Tensor, dict]:
        generator = torch.Generator(self.device).manual_seed(seed)
        latents = self.pipeline.prepare_latents(
            1, self.denoiser.config.in_channels, resolution, resolution, cond["prompt_embeds"].dtype, self.device,
            generator,
        )
        return latents, {}

    def set_timesteps(self, num_steps: int, resolution: int | None = None) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            if resolution is None:
                raise ValueError("this scheduler's sigma shift depends on the image size: pass resolution")
            side = resolution // self.pipeline.vae_scale_factor // self.denoiser.config.patch_size
            kwargs["mu"] = calculate_shift(
                side * side, scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device, **kwargs)
        scheduler.set_begin_index(0)
        return timesteps

    def denoise_step(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     step_kwargs: Mapping[str, Any]) -> torch.Tensor:
        model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
        noise_pred = self.denoiser(
            hidden_states=model_input, timestep=timestep.expand(model_input.shape[0]),
            encoder_hidden_states=cond["prompt_embeds"], pooled_projections=cond["pooled_prompt_embeds"],
            return_dict=False,
        )[0]
        if self.do_classifier_free_guidance:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.preset.guidance_scale * (text - uncond)
        return self.pipeline.scheduler.step(noise_pred, timestep, latents, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pt")
