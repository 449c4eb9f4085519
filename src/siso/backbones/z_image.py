"""Z-Image checkpoints (Z-Image-Turbo): a single-stream DiT over the image and the prompt's tokens,
conditioned on the second-to-last hidden layer of a Qwen3 language model (never trained; encoded once).

Every piece is ``ZImagePipeline.__call__``'s: the chat-templated prompt (its tokens without padding),
fp32 latents, the default sigmas shifted by the image's token count, the transformer's list-of-images
input and reversed timestep, the negated prediction, the Euler step, the VAE's scale and shift.
Classifier-free guidance, when the preset asks for it (a guidance above 0), runs as the pipeline's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers.pipelines.z_image.pipeline_z_image import (
    calculate_shift,
    get_default_z_image_sigmas,
    retrieve_timesteps,
)

from ..presets import Z_IMAGE_TURBO, BackbonePreset
from .base import Backbone, Conditioning


class ZImageBackbone(Backbone):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("ZImagePipeline",)
    denoiser_name: ClassVar[str] = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]] = ()
    frozen_text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)  # Qwen3
    text_encoder_lora_refusal: ClassVar[str] = (
        "Z-Image's text encoder is Qwen3, a 4B-parameter language model that SISO keeps frozen."
    )
    preset: ClassVar[BackbonePreset] = Z_IMAGE_TURBO
    #: counted by benchmarks/count_memory.py: GiB at 512 px, bf16, DINO + IR, by denoiser size (billions)
    activation_gib_512: ClassVar[Mapping[float, Mapping[str, float]]] = {
        6.155: {"plain": 15.67, "checkpoint-vae": 14.6, "checkpoint-all": 3.43},
    }
    streams_when_short: ClassVar[bool] = True

    @property
    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor * 2  # ZImagePipeline.__call__'s check

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.preset.guidance_scale > 0  # as ZImagePipeline decides it

    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        def qwen3() -> list[torch.Tensor]:
            with self.text_encoders_on_device("text_encoder"):
                return self.pipeline.encode_prompt(prompt, device=self.device, do_classifier_free_guidance=False,
                                                   max_sequence_length=self.prompt_max_tokens)[0]

        cond = {"prompt_embeds": self.frozen_embedding("qwen3", prompt, qwen3)}
        if self.do_classifier_free_guidance:
            cond["negative_prompt_embeds"] = self.frozen_embedding("qwen3-negative", "", lambda: (
                self.pipeline.encode_prompt("", device=self.device, do_classifier_free_guidance=False,
                                            max_sequence_length=self.prompt_max_tokens)[0]))
        return cond

    def initial_latents(self, seed: int, resolution: int, cond: Conditioning) -> tuple[torch.Tensor, dict]:
        generator = torch.Generator(self.device).manual_seed(seed)
        latents = self.pipeline.prepare_latents(1, self.denoiser.in_channels, resolution, resolution, torch.float32,
                                                self.device, generator)
        return latents, {}

    def set_timesteps(self, num_steps: int, resolution: int | None = None) -> torch.Tensor:
        if resolution is None:
            raise ValueError("Z-Image's sigma shift depends on the image size: pass resolution")
        scheduler = self.pipeline.scheduler
        side = resolution // self.resolution_multiple
        mu = calculate_shift(side * side, scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                             scheduler.config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device,
                                          sigmas=get_default_z_image_sigmas(num_steps), mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def denoise_step(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     step_kwargs: Mapping[str, Any]) -> torch.Tensor:
        model_timestep = (1000 - timestep.expand(latents.shape[0])) / 1000
        embeds = list(cond["prompt_embeds"])
        images = latents.to(self.denoiser.dtype)
        if self.do_classifier_free_guidance:
            embeds += list(cond["negative_prompt_embeds"])
            images, model_timestep = images.repeat(2, 1, 1, 1), model_timestep.repeat(2)
        outputs = self.denoiser(list(images.unsqueeze(2).unbind(dim=0)), model_timestep, embeds, return_dict=False)[0]
        outputs = [output.float() for output in outputs]
        if self.do_classifier_free_guidance:
            positive, negative = torch.stack(outputs[: len(latents)]), torch.stack(outputs[len(latents):])
            noise_pred = positive + self.preset.guidance_scale * (positive - negative)
        else:
            noise_pred = torch.stack(outputs)
        noise_pred = -noise_pred.squeeze(2)
        return self.pipeline.scheduler.step(noise_pred.to(torch.float32), timestep, latents, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pt")
