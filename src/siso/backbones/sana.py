"""Sana checkpoints (Sana_1600M_512px): a linear-attention DiT on a 32x deep-compression VAE,
conditioned on Gemma-2 hidden states, sampled with the flow DPM-Solver and classifier-free guidance.

SISO runs it with 20 denoising steps per iteration, gradients through the last 3, guidance 4.5.
Guidance happens here, inside ``denoise_step``, as in ``SanaPipeline.__call__``: the negative
("") and positive prompts go through the transformer as one batch of two. Both embeddings come
from one ``encode_prompt`` call, so the negative one is computed once per run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..presets import SANA, BackbonePreset
from .base import Backbone, Conditioning


class SanaBackbone(Backbone):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("SanaPipeline",)
    denoiser_name: ClassVar[str] = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]] = ()
    frozen_text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    text_encoder_lora_refusal: ClassVar[str] = (
        "Sana's text encoder is Gemma-2, a 2.6B-parameter language model that SISO keeps frozen "
        "(its reference runs Sana without a text-encoder LoRA, and SanaPipeline loads none)."
    )
    preset: ClassVar[BackbonePreset] = SANA
    #: counted by benchmarks/count_memory.py: GiB at 512 px, bf16, DINO + IR, by denoiser size (billions)
    activation_gib_512: ClassVar[Mapping[float, Mapping[str, float]]] = {
        1.604: {"plain": 7.86, "checkpoint-vae": 7.86, "checkpoint-all": 4.98},
    }
    #: SanaPipeline's check_inputs: image sides must be multiples of 32.
    pipeline_multiple: ClassVar[int] = 32

    @property
    def resolution_multiple(self) -> int:
        denoiser_multiple = self.pipeline.vae_scale_factor * self.denoiser.config.patch_size
        return math.lcm(denoiser_multiple, self.pipeline_multiple)

    @property
    def guidance_scale(self) -> float:
        return self.preset.guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.guidance_scale > 1.0  # as SanaPipeline decides it

    @classmethod
    def plain_pipeline_kwargs(cls, steps: int) -> dict[str, Any]:
        # SanaPipeline otherwise snaps the size to the nearest aspect-ratio bin of the model's training
        # resolution, samples there and resizes; siso samples the requested size directly (the same
        # thing at the 512 px the method uses with the 512 px model).
        return {"use_resolution_binning": False}

    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        with self.text_encoders_on_device(*self.frozen_text_encoder_names):
            embeds, mask, negative_embeds, negative_mask = self.pipeline.encode_prompt(
                prompt,
                self.do_classifier_free_guidance,
                negative_prompt=self._call_default("negative_prompt"),
                num_images_per_prompt=1,
                device=self.device,
                clean_caption=self._call_default("clean_caption"),
                max_sequence_length=self.prompt_max_tokens,
                complex_human_instruction=self._call_default("complex_human_instruction"),
            )
        if self.do_classifier_free_guidance:
            embeds = torch.cat([negative_embeds, embeds], dim=0)
            mask = torch.cat([negative_mask, mask], dim=0)
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def initial_latents(self, seed: int, resolution: int, cond: Conditioning) -> tuple[torch.Tensor, dict]:
        generator = torch.Generator(self.device).manual_seed(seed)
        # SanaPipeline keeps its latents in fp32 whatever the weights' dtype.
        latents = self.pipeline.prepare_latents(
            1, self.denoiser.config.in_channels, resolution, resolution, torch.float32, self.device, generator,
        )
        return latents, self.pipeline.prepare_extra_step_kwargs(generator, self._call_default("eta"))

    def denoise_step(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     step_kwargs: Mapping[str, Any]) -> torch.Tensor:
        transformer = self.denoiser
        dtype = transformer.dtype
        model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
        model_timestep = timestep.expand(model_input.shape[0]) * transformer.config.timestep_scale
        noise_pred = transformer(
            model_input.to(dtype=dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype=dtype),
            encoder_attention_mask=cond["prompt_attention_mask"],
            timestep=model_timestep,
            return_dict=False,
            attention_kwargs=None,
        )[0].float()
        if self.do_classifier_free_guidance:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + self.guidance_scale * (text - uncond)
        if transformer.config.out_channels // 2 == transformer.config.in_channels:  # learned sigma
            noise_pred = noise_pred.chunk(2, dim=1)[0]
        return self.pipeline.scheduler.step(noise_pred, timestep, latents, **step_kwargs, return_dict=False)[0]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents; the deep-compression VAE is deterministic (no posterior)."""
        vae = self.pipeline.vae
        latents = vae.encode(images.to(self.device, vae.dtype) * 2.0 - 1.0).latent
        return (latents * vae.config.scaling_factor).float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pt")
