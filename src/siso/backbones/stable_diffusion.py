"""Stable Diffusion 1.x/2.x checkpoints (SD-Turbo): one CLIP text encoder, a UNet, a VAE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers.utils import convert_state_dict_to_diffusers

from ..lora_layouts import SD1, SD2_512, SD2_768_V, BaseModel
from ..presets import SD_TURBO, BackbonePreset
from .base import Backbone, Conditioning

#: The text encoder's width tells SD 2.x (OpenCLIP ViT-H/14) from SD 1.x (CLIP ViT-L/14, 768).
OPENCLIP_VIT_H_WIDTH = 1024


class StableDiffusionBackbone(Backbone):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("StableDiffusionPipeline",)
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    preset: ClassVar[BackbonePreset] = SD_TURBO
    #: counted by benchmarks/count_memory.py: GiB at 512 px, bf16, DINO + IR, by denoiser size (billions)
    activation_gib_512: ClassVar[Mapping[float, Mapping[str, float]]] = {
        0.866: {"plain": 4.8, "checkpoint-vae": 3.74, "checkpoint-all": 3.15},
    }

    def base_model(self) -> BaseModel:
        """SD 1.x or 2.x from the architecture, not the model id: SD-Turbo is SD 2.1 (512 px, epsilon).

        Widths other than OpenCLIP-H's (CLIP-L's 768, test models) count as SD 1.x, the classic layout.
        """
        if self.pipeline.text_encoder.config.hidden_size != OPENCLIP_VIT_H_WIDTH:
            return SD1
        v_prediction = self.pipeline.scheduler.config.get("prediction_type") == "v_prediction"
        return SD2_768_V if v_prediction else SD2_512

    def diffusers_lora_layers(self, layers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """diffusers' UNet layout (``lora.down``/``lora_linear_layer``), as its SD and SDXL scripts save."""
        return convert_state_dict_to_diffusers(dict(layers))

    @property
    def resolution_multiple(self) -> int:
        downsamplings = len(self.denoiser.config.block_out_channels) - 1
        return self.pipeline.vae_scale_factor * 2**downsamplings

    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        with self.text_encoders_on_device(*self.text_encoder_names):
            prompt_embeds, _ = self.pipeline.encode_prompt(prompt, self.device, 1, False)
        return {"prompt_embeds": prompt_embeds}

    def denoise_step(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     step_kwargs: Mapping[str, Any]) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        model_input = scheduler.scale_model_input(latents, timestep)
        noise_pred = self.denoiser(
            model_input, timestep, encoder_hidden_states=cond["prompt_embeds"],
            added_cond_kwargs=cond.get("added_cond_kwargs"), return_dict=False,
        )[0]
        return scheduler.step(noise_pred, timestep, latents, **step_kwargs, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pt")
