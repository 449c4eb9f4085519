"""Sana-Sprint checkpoints: Sana's linear-attention DiT distilled to 1-4 steps with the SCM sampler
("TrigFlow" timesteps), the guidance embedded in the transformer rather than a second pass.

Every piece is ``SanaSprintPipeline.__call__``'s: the latents scaled by the sampler's ``sigma_data``, the
trigonometric timestep and the input/output transforms around the transformer, the sampler's step (whose
noise for the next step comes from the render's seeded generator), and the final latents (at the last
timestep, 0, the step's sample is its clean estimate exactly) divided by ``sigma_data`` before the VAE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers.pipelines.sana.pipeline_sana_sprint import retrieve_timesteps

from ..presets import SANA_SPRINT, BackbonePreset
from .base import Conditioning
from .sana import SanaBackbone


class SanaSprintBackbone(SanaBackbone):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("SanaSprintPipeline",)
    preset: ClassVar[BackbonePreset] = SANA_SPRINT
    #: counted by benchmarks/count_memory.py: GiB at 512 px, bf16, DINO + IR, by denoiser size (billions)
    activation_gib_512: ClassVar[Mapping[float, Mapping[str, float]]] = {
        1.61: {"plain": 6.03, "checkpoint-vae": 6.03, "checkpoint-all": 4.8},
        0.594: {"plain": 5.66, "checkpoint-vae": 5.66, "checkpoint-all": 4.75},
    }
    text_encoder_lora_refusal: ClassVar[str] = (
        "Sana-Sprint's text encoder is Gemma-2, a 2.6B-parameter language model that SISO keeps frozen "
        "(SanaSprintPipeline loads no text-encoder LoRA)."
    )

    @property
    def do_classifier_free_guidance(self) -> bool:
        return False  # the guidance is an input of the transformer, not a second pass

    @classmethod
    def plain_pipeline_kwargs(cls, steps: int) -> dict[str, Any]:
        kwargs = super().plain_pipeline_kwargs(steps)
        if steps != 2:  # SCMScheduler takes an intermediate timestep for two steps only
            kwargs["intermediate_timesteps"] = None
        return kwargs

    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        with self.text_encoders_on_device(*self.frozen_text_encoder_names):
            embeds, mask = self.pipeline.encode_prompt(
                prompt, num_images_per_prompt=1, device=self.device,
                clean_caption=self._call_default("clean_caption"), max_sequence_length=self.prompt_max_tokens,
                complex_human_instruction=self._call_default("complex_human_instruction"),
            )
        return {"prompt_embeds": embeds, "prompt_attention_mask": mask}

    def initial_latents(self, seed: int, resolution: int, cond: Conditioning) -> tuple[torch.Tensor, dict]:
        pipe = self.pipeline
        generator = torch.Generator(self.device).manual_seed(seed)
        latents = pipe.prepare_latents(
            1, self.denoiser.config.in_channels, resolution, resolution, torch.float32, self.device, generator,
        ) * pipe.scheduler.config.sigma_data
        guidance = torch.full([1], self.preset.guidance_scale, device=self.device, dtype=torch.float32)
        guidance = guidance.expand(latents.shape[0]).to(cond["prompt_embeds"].dtype)
        guidance = guidance * self.denoiser.config.guidance_embeds_scale
        step_kwargs = pipe.prepare_extra_step_kwargs(generator, self._call_default("eta"))
        return latents, {"scheduler": step_kwargs, "guidance": guidance}

    def set_timesteps(self, num_steps: int, resolution: int | None = None) -> torch.Tensor:
        scheduler = self.pipeline.scheduler
        intermediate = self._call_default("intermediate_timesteps") if num_steps == 2 else None
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device, None, sigmas=None,
                                          max_timesteps=self._call_default("max_timesteps"),
                                          intermediate_timesteps=intermediate)
        scheduler.set_begin_index(0)
        return timesteps[:-1]  # the last is where the sampler lands, not a step to run

    def denoise_step(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     step_kwargs: Mapping[str, Any]) -> torch.Tensor:
        transformer = self.denoiser
        sigma_data = self.pipeline.scheduler.config.sigma_data
        timestep = timestep.expand(latents.shape[0])
        scm = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        scm_expanded = scm.view(-1, 1, 1, 1)
        norm = torch.sqrt(scm_expanded**2 + (1 - scm_expanded) ** 2)
        model_input = latents / sigma_data * norm
        prediction = transformer(
            model_input.to(dtype=transformer.dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype=transformer.dtype),
            encoder_attention_mask=cond["prompt_attention_mask"], guidance=step_kwargs["guidance"], timestep=scm,
            return_dict=False,
        )[0]
        prediction = ((1 - 2 * scm_expanded) * model_input
                      + (1 - 2 * scm_expanded + 2 * scm_expanded**2) * prediction) / norm
        prediction = prediction.float() * sigma_data
        return self.pipeline.scheduler.step(prediction, timestep, latents, **step_kwargs["scheduler"],
                                            return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return super().decode(latents / self.pipeline.scheduler.config.sigma_data)
