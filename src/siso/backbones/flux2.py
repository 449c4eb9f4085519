"""FLUX.2 [klein] checkpoints: a flow-matching MM-DiT on packed 2x2 latent patches, conditioned on the
stacked hidden states of a Qwen3 language model (never trained; encoded once per prompt).

Every piece is ``Flux2KleinPipeline.__call__``'s: the chat-templated prompt and the hidden layers it
stacks, text and latent position ids, the sigma shift that depends on both the token count and the step
count, the Euler step, and the unpacking, batch-norm denormalisation and unpatchifying before the VAE.
Classifier-free guidance runs, as in the pipeline, only for a non-distilled checkpoint asked for a
guidance above 1 (the distilled klein models take 1.0: none).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

from ..presets import FLUX2_KLEIN, BackbonePreset
from .base import Backbone, Conditioning


class Flux2KleinBackbone(Backbone):
    pipeline_classes: ClassVar[tuple[str, ...]] = ("Flux2KleinPipeline",)
    denoiser_name: ClassVar[str] = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]] = ()
    frozen_text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)  # Qwen3
    text_encoder_lora_refusal: ClassVar[str] = (
        "FLUX.2 [klein]'s text encoder is Qwen3, a language model of 4B parameters or more that SISO keeps frozen."
    )
    preset: ClassVar[BackbonePreset] = FLUX2_KLEIN
    #: counted by benchmarks/count_memory.py: GiB at 512 px, bf16, DINO + IR, by denoiser size (billions)
    activation_gib_512: ClassVar[Mapping[float, Mapping[str, float]]] = {
        3.876: {"plain": 10.69, "checkpoint-vae": 9.62, "checkpoint-all": 3.36},
        9.079: {"plain": 15.61, "checkpoint-vae": 14.54, "checkpoint-all": 3.64},
    }
    streams_when_short: ClassVar[bool] = True

    def lora_target_modules(self) -> tuple[str, ...]:
        # The single blocks' output projection is named per block: a bare "to_out" would also match the
        # double blocks' to_out ModuleList.
        blocks = len(self.denoiser.single_transformer_blocks)
        return (*self.preset.lora_targets, *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(blocks)))

    @property
    def resolution_multiple(self) -> int:
        return self.pipeline.vae_scale_factor * 2  # the VAE's factor, times 2 for the 2x2 patches

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self.preset.guidance_scale > 1 and not self.pipeline.config.is_distilled  # as the pipeline

    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        cond = dict(zip(("prompt_embeds", "text_ids"), self._encode(prompt), strict=True))
        if self.do_classifier_free_guidance:
            cond["negative_prompt_embeds"], cond["negative_text_ids"] = self._encode("")
        return cond

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        def qwen3() -> torch.Tensor:
            with self.text_encoders_on_device("text_encoder"):
                return self.pipeline.encode_prompt(
                    prompt=prompt, device=self.device, max_sequence_length=self.prompt_max_tokens,
                    text_encoder_out_layers=self._call_default("text_encoder_out_layers"),
                )[0]

        embeds = self.frozen_embedding("qwen3", prompt, qwen3)
        return embeds, self.pipeline._prepare_text_ids(embeds).to(self.device)

    def initial_latents(self, seed: int, resolution: int, cond: Conditioning) -> tuple[torch.Tensor, dict]:
        generator = torch.Generator(self.device).manual_seed(seed)
        latents, latent_ids = self.pipeline.prepare_latents(
            batch_size=1, num_latents_channels=self.denoiser.config.in_channels // 4, height=resolution,
            width=resolution, dtype=cond["prompt_embeds"].dtype, device=self.device, generator=generator,
        )
        return latents, {"latent_ids": latent_ids}

    def set_timesteps(self, num_steps: int, resolution: int | None = None) -> torch.Tensor:
        if resolution is None:
            raise ValueError("FLUX.2's sigma schedule depends on the image size: pass resolution")
        scheduler = self.pipeline.scheduler
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        tokens = (resolution // self.resolution_multiple) ** 2
        mu = compute_empirical_mu(image_seq_len=tokens, num_steps=num_steps)
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def denoise_step(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     step_kwargs: Mapping[str, Any]) -> torch.Tensor:
        model_timestep = timestep.expand(latents.shape[0]).to(latents.dtype) / 1000
        model_input = latents.to(self.denoiser.dtype)

        def predict(embeds: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
            return self.denoiser(
                hidden_states=model_input, timestep=model_timestep, guidance=None, encoder_hidden_states=embeds,
                txt_ids=text_ids, img_ids=step_kwargs["latent_ids"], return_dict=False,
            )[0][:, : latents.size(1)]

        noise_pred = predict(cond["prompt_embeds"], cond["text_ids"])
        if self.do_classifier_free_guidance:
            negative = predict(cond["negative_prompt_embeds"], cond["negative_text_ids"])
            noise_pred = negative + self.preset.guidance_scale * (noise_pred - negative)
        return self.pipeline.scheduler.step(noise_pred, timestep, latents, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        pipe = self.pipeline
        vae = pipe.vae
        side = int(latents.shape[1] ** 0.5)  # square images: (side / 16)^2 packed patches
        ids = pipe._prepare_latent_ids(latents.new_empty(latents.shape[0], 1, side, side)).to(latents.device)
        latents = pipe._unpack_latents_with_ids(latents, ids, side, side)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                                latents.dtype)
        latents = pipe._unpatchify_latents(latents * std + mean)
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pt")
