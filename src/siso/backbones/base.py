"""The one interface a backbone adapter offers the loop.

An adapter wraps an ordinary diffusers pipeline and reuses its own methods (prompt encoding,
latent preparation, scheduler) so that, with a zero LoRA, our render is the pipeline's render. The
sampler that strings the pieces together is ``sampling.render``; the memory savers are ``memory``'s.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from ..errors import SisoError
from ..lora_layouts import BaseModel
from ..presets import BackbonePreset
from .memory import MemoryPlan, MemorySavers

Conditioning = Mapping[str, Any]


class Backbone(MemorySavers, ABC):
    """A text-to-image model seen as: prompt -> conditioning; noise -> denoised latents -> image.

    Subclasses name the diffusers pipeline classes they serve and the trainable components.
    """

    #: model_index.json ``_class_name`` values this adapter serves.
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    #: the component that gets the LoRA, and the text encoders that optionally do
    #: (``--train-text-encoder``); an empty tuple means the family's text encoder is never trained.
    denoiser_name: ClassVar[str] = "unet"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    #: text encoders siso only ever runs frozen (FLUX's T5, Sana's Gemma).
    frozen_text_encoder_names: ClassVar[tuple[str, ...]] = ()
    #: why ``text_encoder_names`` is empty, for the error a user sees when asking to train it.
    text_encoder_lora_refusal: ClassVar[str] = ""
    #: the family's method numbers and file layouts (``siso.presets``): LoRA targets, formats, the
    #: defaults of every knob left to "the backbone's"
    preset: ClassVar[BackbonePreset]

    def __init__(self, pipeline: DiffusionPipeline, model_id: str, weights_variant: str | None = None) -> None:
        self.pipeline = pipeline
        self.model_id = model_id
        #: "fp16" when the Hub's (or directory's) fp16 weight files were loaded instead of the full ones
        self.weights_variant = weights_variant
        self._frozen_embeddings: dict[str, tuple[str, torch.Tensor]] = {}
        self._init_memory()

    @classmethod
    def check_options(cls, model: str, train_text_encoder: bool, lora_formats: tuple[str, ...] | None = ()) -> None:
        """Refuse, before anything is loaded, options this model family cannot honour.

        ``lora_formats`` None means the family's defaults, which it always honours.
        """
        if train_text_encoder and not cls.text_encoder_names:
            raise SisoError(
                f"--train-text-encoder does not apply to {model}: {cls.text_encoder_lora_refusal} "
                "Drop --train-text-encoder; the LoRA on the denoiser is what SISO optimises."
            )
        available = cls.preset.lora_formats
        unsupported = [fmt for fmt in lora_formats or () if fmt not in available]
        if unsupported:
            raise SisoError(
                f"--lora-format {unsupported[0]} is not available for {model} ({', '.join(cls.pipeline_classes)}): "
                f"siso writes only {', '.join(available)} files for it, which "
                f"{cls.pipeline_classes[0]}.load_lora_weights loads. Drop --lora-format {unsupported[0]}."
            )

    # -- components -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.denoiser_name)

    def _call_default(self, parameter: str) -> Any:
        """The default of a parameter of the pipeline's ``__call__``, so we encode as it does."""
        return inspect.signature(type(self.pipeline).__call__).parameters[parameter].default

    @property
    def prompt_max_tokens(self) -> int:
        """Prompt tokens while optimising: the preset's, else the pipeline's own default."""
        if self.preset.prompt_max_tokens is not None:
            return self.preset.prompt_max_tokens
        return self._call_default("max_sequence_length")

    def prompt_cuts(self, prompt: str) -> list[tuple[str, int, int]]:
        """(tokenizer, the prompt's tokens, tokens its encoder reads) for every tokenizer of the pipeline
        that cuts ``prompt`` short: CLIP reads 77 tokens, the T5/Gemma/Qwen encoders
        :attr:`prompt_max_tokens`. Both counts include the special tokens."""
        from transformers import CLIPTokenizer, CLIPTokenizerFast

        cuts = []
        for name, tokenizer in self.pipeline.components.items():
            if not name.startswith("tokenizer") or tokenizer is None:
                continue
            clip = isinstance(tokenizer, (CLIPTokenizer, CLIPTokenizerFast))
            kept = tokenizer.model_max_length if clip else self.prompt_max_tokens
            tokens = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
            if tokens > kept:
                cuts.append((type(tokenizer).__name__.removesuffix("Fast"), tokens, kept))
        return cuts

    @classmethod
    def plain_pipeline_kwargs(cls, steps: int) -> dict[str, Any]:
        """Extra arguments for a plain ``pipeline(...)`` call of ``steps`` steps so that it samples what
        ``render`` does (``siso render`` uses them)."""
        return {}

    def compiled_modules(self) -> dict[str, torch.nn.Module]:
        """What ``--compile`` compiles: the modules that run forward and backward every iteration.

        A streamed denoiser is left eager: its weights come from CPU memory on each call, which
        neither inductor nor CUDA graphs can keep static.
        """
        modules = {} if self.streams_denoiser else {"denoiser": self.denoiser}
        vae = getattr(self.pipeline, "vae", None)
        if vae is not None:
            modules["vae_decoder"] = vae.decoder
        return modules

    def place_on(self, device: torch.device) -> None:
        """Move the loaded (frozen, CPU) pipeline to ``device``, streaming the denoiser's block weights from
        CPU memory where the GPU is too small for them (:meth:`needs_streaming`): set up before the move, so
        a transformer larger than the GPU never lands on it whole. Checkpointing is chosen per run
        (:meth:`choose_memory_plan`), except that a streamed denoiser is always checkpointed."""
        if self.needs_streaming(device):
            self.stream_denoiser_blocks()
            self.load_time_tier = "checkpoint-all"  # what --low-memory auto keeps for this backbone
        self.pipeline.to(device)

    def frozen_embedding(self, key: str, prompt: str, compute) -> torch.Tensor:
        """``compute()`` (a frozen encoder's output for ``prompt``) once per prompt: even when a trained
        CLIP LoRA makes the prompt be encoded every iteration, a frozen T5 or Qwen3 runs once."""
        cached = self._frozen_embeddings.get(key)
        if cached is not None and cached[0] == prompt:
            return cached[1]
        with torch.no_grad():
            embedding = compute()
        if not torch.is_inference_mode_enabled():  # an inference tensor must not reach a later autograd run
            self._frozen_embeddings[key] = (prompt, embedding)
        return embedding

    def reset(self) -> None:
        """Put the backbone back as it was loaded, whatever a run did to it: every LoRA adapter removed
        (siso's own and any loaded with ``load_lora_weights``), parked text encoders back on the device,
        the memory savers of the load-time tier. What :meth:`siso.models.ModelCache.lease` calls when a
        backbone is handed back, so no caller cleans up by hand. Compiled modules stay compiled (the
        same numbers; dynamo recompiles what a new adapter changes)."""
        for module in self.lora_modules().values():
            remove_adapters(module)
        self.restore_text_encoders()
        self.apply_memory_plan(MemoryPlan(self.load_time_tier, "reset"))

    def lora_target_modules(self) -> tuple[str, ...]:
        """peft ``target_modules`` of the denoiser's LoRA: the preset's (adapters whose targets depend on
        the checkpoint's depth add theirs)."""
        return self.preset.lora_targets

    def lora_modules(self) -> dict[str, torch.nn.Module]:
        """The components a LoRA can sit on: the denoiser and the trainable text encoders."""
        names = (self.denoiser_name, *self.text_encoder_names)
        return {name: module for name in names if isinstance(module := getattr(self.pipeline, name, None),
                                                              torch.nn.Module)}

    # -- the pieces of a render -------------------------------------------------------------
    @property
    @abstractmethod
    def resolution_multiple(self) -> int:
        """Image sides must be a multiple of this (VAE factor times the denoiser's downsampling)."""

    @abstractmethod
    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        """Prompt (and output size, which SDXL conditions on) -> what the denoiser is conditioned on.

        Differentiable when text-encoder LoRA is on. Implementations run their text encoders inside
        ``self.text_encoders_on_device(...)`` so that parked encoders still work.
        """

    @abstractmethod
    def denoise_step(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                     step_kwargs: Mapping[str, Any]) -> torch.Tensor:
        """One sampler step: model prediction, then the scheduler's update."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B, 3, H, W) image in [0, 1], differentiable."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> the latents ``decode`` maps back to them (editing starts here).

        The VAE posterior's mean, not a sample: inversion wants the photo, not a noisy draw of it.
        Covers the plain and the mean/std-normalised (SDXL-style) latent spaces; other families override.
        """
        vae = self.pipeline.vae
        pixels = (images.to(self.device, vae.dtype) * 2.0 - 1.0)
        latents = vae.encode(pixels).latent_dist.mode()
        config = vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return (latents - mean) * config.scaling_factor / std
        return latents * config.scaling_factor

    def initial_latents(self, seed: int, resolution: int, cond: Conditioning) -> tuple[torch.Tensor, dict]:
        """The noise the plain pipeline draws for ``torch.Generator(device).manual_seed(seed)``.

        Returns the latents and the per-render state that each ``denoise_step`` receives as
        ``step_kwargs``: here the scheduler step kwargs (the same generator object goes into both,
        as in the pipeline, so ancestral samplers draw the same step noise too); adapters may add
        what their denoiser needs per render (FLUX: image position ids, guidance).
        """
        generator = torch.Generator(self.device).manual_seed(seed)
        latents = self.pipeline.prepare_latents(
            1, self.denoiser.config.in_channels, resolution, resolution,
            cond["prompt_embeds"].dtype, self.device, generator,
        )
        return latents, self.pipeline.prepare_extra_step_kwargs(generator, 0.0)

    def set_timesteps(self, num_steps: int, resolution: int | None = None) -> torch.Tensor:
        """Reset the scheduler for a fresh ``num_steps`` sampling; return the timesteps.

        ``resolution`` (the image side) is for schedules that depend on the image size, such as
        FLUX's resolution-shifted sigmas; UNet schedulers ignore it.
        """
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
    def base_model(self) -> BaseModel | None:
        """The family a kohya file names in its metadata; None where siso writes no kohya file."""
        return None

    def diffusers_lora_layers(self, layers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One component's peft-layout LoRA state dict in the key layout its diffusers loader reads.

        Transformer families keep peft's ``lora_A``/``lora_B`` keys, as diffusers' own DreamBooth
        scripts for FLUX, SD3, Sana, FLUX.2 and Z-Image save them (diffusers' conversion would rename
        ``to_q`` and friends to the UNet-era ``lora.down``, which the SD3 loader does not read).
        """
        return dict(layers)

    def save_lora_weights(self, directory: str, layers: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Write diffusers-format LoRA files with the pipeline class's own saver.

        ``layers`` maps a component name (``unet``, ``text_encoder``, ...) to its LoRA state dict
        in peft's layout (``lora_layouts.canonical_layers``).
        """
        kwargs = {f"{name}_lora_layers": self.diffusers_lora_layers(state) for name, state in layers.items() if state}
        type(self.pipeline).save_lora_weights(directory, safe_serialization=True, **kwargs)


def remove_adapters(module: torch.nn.Module) -> None:
    """Delete every peft adapter of ``module`` (siso's, and those ``load_lora_weights`` added): the
    model then computes exactly what it did before any was attached. The empty LoRA wrappers stay
    (their base layer is what they run), as diffusers' own ``delete_adapters`` leaves them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    configs = getattr(module, "peft_config", None) or {}
    for name in list(configs):
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer) and name in layer.lora_A:
                layer.delete_adapter(name)
        del configs[name]
    if hasattr(module, "peft_config") and not module.peft_config:
        del module.peft_config
        if getattr(module, "_hf_peft_config_loaded", False):
            module._hf_peft_config_loaded = None  # transformers' and diffusers' flag: no adapters loaded
