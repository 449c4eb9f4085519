"""The one interface a backbone adapter offers the loop, and the one differentiable sampler.

An adapter wraps an ordinary diffusers pipeline and reuses its own methods (prompt encoding,
latent preparation, scheduler) so that, with a zero LoRA, our render is the pipeline's render.
"""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from torch.nn.utils import parametrize

from ..config import LORA_FORMATS, LORA_TARGETS, TEXT_ENCODER_LORA_TARGETS, BackbonePreset
from ..errors import SisoError
from ..lora_layouts import BaseModel

Conditioning = Mapping[str, Any]


class Backbone(ABC):
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
    #: peft ``target_modules`` of the denoiser's and the text encoders' LoRA, in the layout the
    #: pipeline's own LoRA loader and diffusers' training scripts use for this family.
    lora_targets: ClassVar[tuple[str, ...]] = LORA_TARGETS
    text_encoder_lora_targets: ClassVar[tuple[str, ...]] = TEXT_ENCODER_LORA_TARGETS
    #: LoRA file layouts (``--lora-format``) that load back into this family, and those written
    #: when the user names none.
    lora_formats: ClassVar[tuple[str, ...]] = LORA_FORMATS
    default_lora_formats: ClassVar[tuple[str, ...]] = ("diffusers",)
    preset: ClassVar[BackbonePreset] = BackbonePreset()
    #: Activation memory (GiB) one iteration keeps for backward beyond the resident weights, at
    #: 512 px, bf16, DINO + IR, per memory tier (:data:`MEMORY_TIERS`): what ``--low-memory`` auto
    #: compares with the GPU's free memory. None: no estimate, so auto keeps the choice made at load time
    #: (FLUX picks its savers from the GPU's size in ``place_on``).
    activation_gib_512: ClassVar[Mapping[str, float] | None] = None
    #: kept free on top of the estimate: the allocator's fragmentation and the backward's transients
    memory_margin_gib: ClassVar[float] = 1.0

    def __init__(self, pipeline: DiffusionPipeline, model_id: str) -> None:
        self.pipeline = pipeline
        self.model_id = model_id
        self._offloaded: set[str] = set()  # text encoders parked on the CPU by offload_text_encoders
        #: the memory tier ``place_on`` chose for the GPU (auto keeps it where there is no estimate)
        self.load_time_tier = "plain"
        self.streams_denoiser = False  # set by stream_denoiser_blocks
        #: "fp16" when the Hub's (or directory's) fp16 weight files were loaded instead of the full ones
        self.weights_variant: str | None = None

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
        unsupported = [fmt for fmt in lora_formats or () if fmt not in cls.lora_formats]
        if unsupported:
            raise SisoError(
                f"--lora-format {unsupported[0]} is not available for {model} ({', '.join(cls.pipeline_classes)}): "
                f"siso writes only {', '.join(cls.lora_formats)} files for it, which "
                f"{cls.pipeline_classes[0]}.load_lora_weights loads. Drop --lora-format {unsupported[0]}."
            )

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

    def _call_default(self, parameter: str) -> Any:
        """The default of a parameter of the pipeline's ``__call__``, so we encode as it does."""
        return inspect.signature(type(self.pipeline).__call__).parameters[parameter].default

    @property
    def prompt_max_tokens(self) -> int:
        """Prompt tokens while optimising: the preset's, else the pipeline's own default."""
        if self.preset.prompt_max_tokens is not None:
            return self.preset.prompt_max_tokens
        return self._call_default("max_sequence_length")

    @classmethod
    def plain_pipeline_kwargs(cls) -> dict[str, Any]:
        """Extra arguments for a plain ``pipeline(...)`` call so that it samples what ``render`` does
        (``siso render`` and the tests use them)."""
        return {}

    @classmethod
    def optimisation_pipeline_kwargs(cls) -> dict[str, Any]:
        """What a plain ``pipeline(...)`` call needs on top of :meth:`plain_pipeline_kwargs` to render
        exactly what the optimisation rendered (the shorter prompt, where the preset shortens it)."""
        tokens = cls.preset.prompt_max_tokens
        return {**cls.plain_pipeline_kwargs(), **({"max_sequence_length": tokens} if tokens is not None else {})}

    # -- memory ---------------------------------------------------------------------------------
    def offload_text_encoders(self) -> tuple[str, ...]:
        """Park every text encoder that is not being trained on the CPU; return those newly parked.

        Once the prompt embedding is computed (once per run, unless a text-encoder LoRA is trained)
        a frozen text encoder is dead weight on the GPU: FLUX's T5-XXL is 9.5 GB in bf16, Sana's
        Gemma-2 5.2 GB. ``encode_prompt`` still works afterwards: a parked encoder visits the GPU for
        the call and goes back, and ``restore_text_encoders`` (called by ``attach_lora``) brings
        them all back for good. Numerically neutral.
        """
        parked = []
        for name in (*self.text_encoder_names, *self.frozen_text_encoder_names):
            module = getattr(self.pipeline, name, None)
            if name in self._offloaded or not isinstance(module, torch.nn.Module):
                continue
            if any(p.requires_grad for p in module.parameters()):
                continue
            module.to("cpu")
            self._offloaded.add(name)
            parked.append(name)
        if parked and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return tuple(parked)

    def restore_text_encoders(self) -> None:
        """Undo ``offload_text_encoders``: every parked encoder goes back to the denoiser's device."""
        for name in sorted(self._offloaded):
            getattr(self.pipeline, name).to(self.device)
        self._offloaded.clear()

    @contextlib.contextmanager
    def _text_encoders_on_device(self, *names: str) -> Iterator[None]:
        """Adapters wrap their text-encoder calls in this: parked encoders visit the GPU meanwhile."""
        visiting = [name for name in names if name in self._offloaded]
        for name in visiting:
            getattr(self.pipeline, name).to(self.device)
        try:
            yield
        finally:
            for name in visiting:
                getattr(self.pipeline, name).to("cpu")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's blocks during backward instead of keeping their activations.

        Exact (the same forward is run twice), and it only acts on steps that carry gradients. It
        trades about a third more denoiser time for most of its activation memory (for FLUX at
        512 px an estimated 12-15 GiB).
        """
        self.denoiser.enable_gradient_checkpointing()

    def stream_denoiser_blocks(self) -> int:
        """Keep the weights of the denoiser's repeated blocks in CPU memory; return their bytes.

        Each linear layer of the blocks gets a fresh GPU copy of its weight for the duration of its
        call. Unlike diffusers' CPU/group offloading, which swaps ``param.data`` under autograd's
        feet, the copy is an ordinary new tensor, so backward sees the weights it used; with
        gradient checkpointing (switched on here) autograd keeps no copy past its block, and the
        backward pass re-fetches each block when it recomputes it. Exact, at the cost of moving the
        weights over PCIe twice per optimised step: what puts FLUX's 24 GB transformer (bf16) on a
        24 GB GPU. Call it before the pipeline moves to the GPU; LoRA layers are never streamed.
        """
        pin = torch.cuda.is_available()
        kept = 0
        for blocks in self.denoiser.children():
            if not isinstance(blocks, torch.nn.ModuleList):
                continue
            for module in blocks.modules():
                if (not isinstance(module, torch.nn.Linear) or parametrize.is_parametrized(module, "weight")
                        or module.weight.requires_grad):
                    continue
                weight = module.weight.detach().to("cpu")
                weight = weight.pin_memory() if pin else weight
                parametrize.register_parametrization(module, "weight", _WeightOnCpu(weight), unsafe=True)
                module.parametrizations.weight.original.requires_grad_(False)
                module.register_state_dict_post_hook(_state_dict_with_cpu_weight)
                kept += weight.numel() * weight.element_size()
        self.enable_gradient_checkpointing()
        self.streams_denoiser = True
        return kept

    def place_on(self, device: torch.device) -> None:
        """Move the loaded (frozen, CPU) pipeline to ``device``; adapters of big models override this
        to choose memory savers from the GPU's size first."""
        self.pipeline.to(device)

    def choose_memory_plan(self, low_memory: bool | None, resolution: int) -> MemoryPlan:
        """The memory savers of a run: forced by ``low_memory``, or (``None``) chosen from the GPU's free memory.

        Call it once the run's weights are on the GPU (LoRA attached, frozen text encoders parked):
        the free memory is then what the loop's activations can have. Auto takes the fastest tier
        whose estimated activations (scaled with the pixel count) plus a margin fit, else the lightest.
        Every tier computes the same numbers (checkpointing reruns the same forward in backward).
        """
        if low_memory is not None:
            return MemoryPlan("checkpoint-all" if low_memory else "plain",
                              "--low-memory" if low_memory else "--no-low-memory")
        free = cuda_free_memory_gib(self.device)
        if free is None:
            return MemoryPlan(self.load_time_tier, f"auto: {self.device.type} device, no GPU memory to save")
        estimates = self.activation_gib_512
        if estimates is None:
            return MemoryPlan(self.load_time_tier, f"auto: {free:.1f} GiB free; {type(self).__name__} chose its "
                              "savers from the GPU's size when it loaded", free)
        # Activations grow with the pixel count, and double in fp32.
        scale = (resolution / 512) ** 2 * self.denoiser.dtype.itemsize / 2
        for tier in MEMORY_TIERS:
            needed = estimates[tier] * scale + self.memory_margin_gib
            if free >= needed:
                return MemoryPlan(tier, f"auto: {free:.1f} GiB free, ~{needed:.1f} GiB needed", free)
        return MemoryPlan(MEMORY_TIERS[-1], f"auto: {free:.1f} GiB free, less than the ~{needed:.1f} GiB the "
                          "lightest setting is estimated to need", free)

    def apply_memory_plan(self, plan: MemoryPlan) -> None:
        """Switch the plan's savers on and every other one off (a cached backbone keeps no earlier run's).

        A streamed denoiser keeps its checkpointing: without it autograd would hold every block's
        fetched weights.
        """
        denoiser = self.denoiser
        if plan.denoiser_checkpointing or self.streams_denoiser:
            self.enable_gradient_checkpointing()
        elif denoiser.is_gradient_checkpointing:
            denoiser.disable_gradient_checkpointing()
        vae = getattr(self.pipeline, "vae", None)
        if vae is not None and getattr(vae, "_supports_gradient_checkpointing", False):
            if plan.vae_checkpointing:
                vae.enable_gradient_checkpointing()
            elif vae.is_gradient_checkpointing:
                vae.disable_gradient_checkpointing()

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

    # -- the pieces of a render -------------------------------------------------------------
    @property
    @abstractmethod
    def resolution_multiple(self) -> int:
        """Image sides must be a multiple of this (VAE factor times the denoiser's downsampling)."""

    @abstractmethod
    def encode_prompt(self, prompt: str, resolution: int) -> Conditioning:
        """Prompt (and output size, which SDXL conditions on) -> what the denoiser is conditioned on.

        Differentiable when text-encoder LoRA is on. Implementations run their text encoders inside
        ``self._text_encoders_on_device(...)`` so that offloaded encoders still work.
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

    def save_lora_weights(self, directory: str, layers: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Write diffusers-format LoRA files with the pipeline class's own saver.

        ``layers`` maps a component name (``unet``, ``text_encoder``, ...) to its diffusers-format
        LoRA state dict.
        """
        kwargs = {f"{name}_lora_layers": dict(state) for name, state in layers.items() if state}
        type(self.pipeline).save_lora_weights(directory, safe_serialization=True, **kwargs)


@dataclass(frozen=True)
class StartPoint:
    """Where a render resumes part-way instead of starting from the seed's noise (editing: an
    inverted photo).

    ``scheduler`` stands in for the pipeline's own during these steps (editing's samplers), and
    ``step_kwargs`` holds one mapping per timestep (an ancestral sampler's fixed step noise), or
    nothing.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor  # the steps still to run, noisiest first
    scheduler: Any
    step_kwargs: tuple[Mapping[str, Any], ...] = ()


@contextlib.contextmanager
def scheduler_swapped(backbone: Backbone, scheduler: Any) -> Iterator[None]:
    """Run with ``scheduler`` in place of the pipeline's own; the original comes back afterwards.

    Set on the instance directly: ``DiffusionPipeline.__setattr__`` would also rewrite the
    pipeline's config, and a cached pipeline must come out exactly as it went in.
    """
    pipeline = backbone.pipeline
    original = pipeline.scheduler
    object.__setattr__(pipeline, "scheduler", scheduler)
    try:
        yield
    finally:
        object.__setattr__(pipeline, "scheduler", original)


class _WeightOnCpu(torch.nn.Module):
    """A parametrization holding a linear layer's weight in (pinned) CPU memory: the registered
    parameter is an empty placeholder that travels with the module, and each use of ``.weight``
    returns a copy on the placeholder's device."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.cpu_weight = weight  # a plain attribute: Module.to() and state_dict() leave it alone

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        return self.cpu_weight.to(placeholder.device, non_blocking=True)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.new_empty(0)


def _state_dict_with_cpu_weight(module: torch.nn.Module, state_dict: dict, prefix: str, metadata: Any) -> None:
    """A streamed layer's state dict shows its real ``weight`` (LoRA loaders read the shapes)."""
    state_dict.pop(prefix + "parametrizations.weight.original", None)
    state_dict[prefix + "weight"] = module.parametrizations.weight[0].cpu_weight


#: Memory savers, fastest first; all exact (checkpointing recomputes the same forward during backward).
#: The VAE decoder comes first: at 512 px it keeps more activations for backward than the SD or SDXL
#: UNet (~2.8 GiB in bf16 against ~1.1 and ~2.1) and costs a third as much to recompute. diffusers'
#: other decoder savers do not fit: slicing is a no-op for one image, tiling is not exact.
MEMORY_TIERS = ("plain", "checkpoint-vae", "checkpoint-all")


@dataclass(frozen=True)
class MemoryPlan:
    """Which memory savers a run uses, and why: run.json's ``memory``."""

    tier: str  # one of MEMORY_TIERS
    reason: str
    free_gib: float | None = None  # the GPU's free memory when auto chose

    @property
    def denoiser_checkpointing(self) -> bool:
        return self.tier == "checkpoint-all"

    @property
    def vae_checkpointing(self) -> bool:
        return self.tier != "plain"

    def describe(self) -> str:
        what = {"plain": "no savers (fastest)", "checkpoint-vae": "gradient checkpointing in the VAE decoder",
                "checkpoint-all": "gradient checkpointing in the denoiser and the VAE decoder"}[self.tier]
        return f"Memory: {what} ({self.reason})"

    def to_record(self) -> dict[str, Any]:
        return {"tier": self.tier, "denoiser_checkpointing": self.denoiser_checkpointing,
                "vae_checkpointing": self.vae_checkpointing, "reason": self.reason,
                "free_gib": round(self.free_gib, 2) if self.free_gib is not None else None}


def cuda_free_memory_gib(device: torch.device) -> float | None:
    """Memory a CUDA ``device`` can still give this process, in GiB; None for other devices.

    The driver's free memory plus what PyTorch's caching allocator holds but does not use (in a
    long-lived app the previous run's activations stay reserved, yet are ours to reuse).
    """
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + cached) / 2**30


def cuda_memory_gib(device: torch.device) -> float | None:
    """Total memory of a CUDA ``device`` in GiB; None for other devices."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30


def render(backbone: Backbone, cond: Conditioning, seed: int, resolution: int,
           num_steps: int, grad_steps: int, start: StartPoint | None = None) -> torch.Tensor:
    """Sample an image from the seed's fixed noise; only the last ``grad_steps`` steps carry autograd.

    This is the only place in siso that decides which denoising steps are differentiated: the
    earlier steps run under ``no_grad`` (their LoRA effect is real, but not optimised through),
    and nothing is differentiated at all when the caller disabled gradients.

    With ``start``, sampling resumes from its latents with its scheduler and runs its timesteps
    (``num_steps`` must be their number; ``seed`` and ``resolution`` are not used).
    """
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [0, {num_steps}], got {grad_steps}")
    if start is None:
        latents, step_kwargs = backbone.initial_latents(seed, resolution, cond)
        timesteps = backbone.set_timesteps(num_steps, resolution)
        per_step: Sequence[Mapping[str, Any]] = [step_kwargs] * len(timesteps)
        sampler = contextlib.nullcontext()
    else:
        if len(start.timesteps) != num_steps or len(start.step_kwargs) not in (0, num_steps):
            raise ValueError(f"the start point has {len(start.timesteps)} timesteps and "
                             f"{len(start.step_kwargs)} step kwargs; num_steps is {num_steps}")
        latents, timesteps = start.latents, start.timesteps
        per_step = start.step_kwargs or [{}] * num_steps
        sampler = scheduler_swapped(backbone, start.scheduler)
    first_grad_step = len(timesteps) - grad_steps
    want_grad = torch.is_grad_enabled()
    with sampler:
        for index, timestep in enumerate(timesteps):
            with torch.set_grad_enabled(want_grad and index >= first_grad_step):
                latents = backbone.denoise_step(latents, timestep, cond, per_step[index])
    with torch.set_grad_enabled(want_grad and grad_steps > 0):
        return backbone.decode(latents)
