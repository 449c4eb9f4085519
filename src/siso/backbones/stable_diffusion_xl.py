"""SDXL checkpoints (SDXL-Turbo): two text encoders, pooled text and size conditioning."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from ..lora_layouts import SDXL_BASE, BaseModel
from ..presets import SDXL_TURBO, BackbonePreset
from .base import Conditioning
from .stable_diffusion import StableDiffusionBackbone


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionXLPipeline",)
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    preset: ClassVar[BackbonePreset] = SDXL_TURBO
    #: counted by benchmarks/count_memory.py: GiB at 512 px, bf16, DINO + IR, by denoiser size (billions)
    activation_gib_512: ClassVar[Mapping[float, Mapping[str, float]]] = {
        2.567: {"plain": 5.79, "checkpoint-vae": 4.72, "checkpoint-all": 3.5},
    }

    def base_model(self) -> BaseModel:
        return SDXL_BASE  # SDXL-Turbo is distilled from SDXL 1.0 base and keeps its architecture

    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        pipe = self.pipeline
        with self.text_encoders_on_device(*self.text_encoder_names):
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=prompt, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
        if pipe.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = pipe.text_encoder_2.config.projection_dim
        # SDXL is also conditioned on the image size; the pipeline's defaults are the output size.
        size = (resolution, resolution)
        time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=prompt_embeds.dtype, text_encoder_projection_dim=projection_dim
        ).to(self.device)
        return {
            "prompt_embeds": prompt_embeds,
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
        }

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        config = vae.config
        latents = latents.to(vae.dtype)
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pt")
