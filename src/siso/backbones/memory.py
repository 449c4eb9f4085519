"""Where a backbone's memory goes, and the exact ways to spend less of it.

Three kinds of saver, all numerically neutral: frozen text encoders parked on the CPU once the prompt
is encoded; gradient checkpointing (the memory tiers, chosen from the GPU's free memory); and the
denoiser's block weights streamed from CPU memory (the large transformers on a 24 GB card). How much
each needs is counted, not guessed: benchmarks/count_memory.py counts every family's weights and
activations on the real architectures (on the meta device). :class:`MemorySavers` is the part of
:class:`~siso.backbones.base.Backbone` that does them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.nn.utils import parametrize

#: Memory savers, fastest first; all exact (checkpointing recomputes the same forward during backward).
#: The VAE decoder comes first: at 512 px it keeps more activations for backward than the SD or SDXL
#: UNet (~2.8 GiB in bf16 against ~1.1 and ~2.1) and costs a third as much to recompute. diffusers'
#: other decoder savers do not fit: slicing is a no-op for one image, tiling is not exact.
MEMORY_TIERS = ("plain", "checkpoint-vae", "checkpoint-all")
#: The counted activations (``activation_gib_512``) miss backward's gradient buffers and transients: against
#: the reference H200 peaks they came out low by ~0.7 and ~1.0 GiB (SD-Turbo: 8.3 GiB counted in all, 9.0
#: measured; SDXL-Turbo without a text-encoder LoRA 13.2 against 14.2), so a run plans for 20% more.
ACTIVATION_HEADROOM = 1.2
#: DINOv2-L and the IR tower in bf16 (benchmarks/results/memory-512px.json): on the GPU beside every backbone
SIMILARITY_WEIGHTS_GIB = 1.75


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


class MemorySavers:
    """The memory side of a backbone: parking text encoders, checkpointing, streaming weights.

    Expects ``pipeline``, ``denoiser``, ``device``, ``preset`` and the text-encoder name tuples of
    :class:`~siso.backbones.base.Backbone`.
    """

    #: Activation memory (GiB) one iteration keeps for backward beyond the weights, at 512 px, bf16, DINO + IR,
    #: per memory tier (:data:`MEMORY_TIERS`), for each checkpoint counted by benchmarks/count_memory.py, keyed
    #: by its denoiser's size in billions of parameters (benchmarks/results/memory-512px.json holds the counts;
    #: tests/test_memory_estimates.py keeps the two equal). What ``--low-memory`` auto compares with the GPU's
    #: free memory, and what decides streaming. A checkpoint of another size takes the next larger one's.
    activation_gib_512: ClassVar[Mapping[float, Mapping[str, float]]] = {}
    #: kept free on top of the scaled estimate: the allocator's fragmentation, the CUDA context's share
    memory_margin_gib: ClassVar[float] = 1.0
    #: Whether the denoiser's repeated blocks may keep their weights in CPU memory
    #: (:meth:`stream_denoiser_blocks`) when the GPU is too small to hold them: the large transformers.
    streams_when_short: ClassVar[bool] = False

    pipeline: Any
    denoiser: torch.nn.Module
    device: torch.device
    preset: Any
    denoiser_name: ClassVar[str]
    text_encoder_names: ClassVar[tuple[str, ...]]
    frozen_text_encoder_names: ClassVar[tuple[str, ...]]

    def _init_memory(self) -> None:
        self._offloaded: set[str] = set()  # text encoders parked on the CPU by offload_text_encoders
        #: the memory tier ``place_on`` chose for the GPU (auto keeps it where there is no estimate)
        self.load_time_tier = "plain"
        self.streams_denoiser = False  # set by stream_denoiser_blocks
        #: the denoiser's size as loaded (no LoRA; streaming later empties the parameters it moves)
        self.denoiser_billion_parameters = sum(p.numel() for p in self.denoiser.parameters()) / 1e9

    # -- text encoders ------------------------------------------------------------------------------
    def offload_text_encoders(self) -> tuple[str, ...]:
        """Park every text encoder that is not being trained on the CPU; return those newly parked.

        Once the prompt embedding is computed (once per run, unless a text-encoder LoRA is trained)
        a frozen text encoder is dead weight on the GPU: FLUX's T5-XXL is 9.5 GB in bf16, Sana's
        Gemma-2 5.2 GB. ``encode_prompt`` still works afterwards: a parked encoder visits the GPU for
        the call and goes back (:meth:`text_encoders_on_device`); ``restore_text_encoders`` brings
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
    def text_encoders_on_device(self, *names: str) -> Iterator[None]:
        """Adapters wrap their text-encoder calls in this: parked encoders visit the GPU meanwhile."""
        visiting = [name for name in names if name in self._offloaded]
        for name in visiting:
            getattr(self.pipeline, name).to(self.device)
        try:
            yield
        finally:
            for name in visiting:
                getattr(self.pipeline, name).to("cpu")

    # -- checkpointing --------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self) -> None:
        """Recompute the denoiser's blocks during backward instead of keeping their activations.

        Exact (the same forward is run twice), and it only acts on steps that carry gradients. It
        trades about a third more denoiser time for most of its activation memory.
        """
        self.denoiser.enable_gradient_checkpointing()

    def activation_estimate(self) -> Mapping[str, float] | None:
        """:attr:`activation_gib_512` of the counted checkpoint this denoiser matches: the same size (to 1%),
        else the smallest larger one, else the largest (an estimate either way); None without counts."""
        if not self.activation_gib_512:
            return None
        size = self.denoiser_billion_parameters
        larger = [counted for counted in sorted(self.activation_gib_512) if counted >= size * 0.99]
        return self.activation_gib_512[larger[0] if larger else max(self.activation_gib_512)]

    def activation_need_gib(self, tier: str, resolution: int) -> float | None:
        """GPU memory a run at ``resolution`` needs free for ``tier``, beyond its weights: the estimate, scaled
        with the pixel count and the dtype's size, with headroom for what the count does not see, plus the margin."""
        estimates = self.activation_estimate()
        if estimates is None:
            return None
        scale = (resolution / 512) ** 2 * self.denoiser.dtype.itemsize / 2
        return estimates[tier] * scale * ACTIVATION_HEADROOM + self.memory_margin_gib

    def choose_memory_plan(self, low_memory: bool | None, resolution: int) -> MemoryPlan:
        """The memory savers of a run: forced by ``low_memory``, or (``None``) chosen from the GPU's free memory.

        Call it once the run's weights are on the GPU (LoRA attached, frozen text encoders parked):
        the free memory is then what the loop's activations can have. Auto takes the fastest tier
        whose need (:meth:`activation_need_gib`) fits, else the lightest. Every tier computes the same
        numbers (checkpointing reruns the same forward in backward).
        """
        if low_memory is not None:
            return MemoryPlan("checkpoint-all" if low_memory else "plain",
                              "--low-memory" if low_memory else "--no-low-memory")
        free = cuda_free_memory_gib(self.device)
        if free is None:
            return MemoryPlan(self.load_time_tier, f"auto: {self.device.type} device, no GPU memory to save")
        if self.activation_estimate() is None:
            return MemoryPlan(self.load_time_tier, f"auto: {free:.1f} GiB free; {type(self).__name__} has no "
                              "activation estimate, so it keeps the savers it loaded with", free)
        for tier in MEMORY_TIERS:
            needed = self.activation_need_gib(tier, resolution)
            if free >= needed:
                return MemoryPlan(tier, f"auto: {free:.1f} GiB free, ~{needed:.1f} GiB needed", free)
        return MemoryPlan(MEMORY_TIERS[-1], f"auto: {free:.1f} GiB free, less than the ~{needed:.1f} GiB the "
                          "lightest setting is estimated to need", free)

    def apply_memory_plan(self, plan: MemoryPlan) -> None:
        """Switch the plan's savers on and every other one off.

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

    def weights_gib(self, *names: str) -> float:
        """The named components' weights (every component's when none is named), in GiB: exact."""
        components = self.pipeline.components
        modules = [components.get(name) for name in names] if names else list(components.values())
        return sum(p.numel() * p.element_size() for module in modules if isinstance(module, torch.nn.Module)
                   for p in module.parameters()) / 2**30

    def needs_streaming(self, device: torch.device) -> bool:
        """Whether the denoiser's block weights must stay in CPU memory on ``device``: for a family that
        may stream, a GPU smaller than what loading puts on it (every weight: the prompt is encoded there
        before the frozen encoders are parked) or than the loop at its lightest (the denoiser, VAE, trained
        text encoders and similarity models, the checkpointed activations), plus the margin."""
        memory = cuda_memory_gib(device)
        estimate = self.activation_need_gib("checkpoint-all", 512)
        if memory is None or not self.streams_when_short or estimate is None:
            return False
        trained = self.text_encoder_names if self.preset.train_text_encoder else ()
        at_load = self.weights_gib() + SIMILARITY_WEIGHTS_GIB + self.memory_margin_gib
        in_loop = self.weights_gib(self.denoiser_name, "vae", *trained) + SIMILARITY_WEIGHTS_GIB + estimate
        return memory < max(at_load, in_loop)

    # -- streaming ----------------------------------------------------------------------------------------
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


class _WeightOnCpu(torch.nn.Module):
    """A parametrization holding a linear layer's weight in (pinned) CPU memory: the registered
    parameter is an empty placeholder that travels with the module, and each use of ``.weight``
    returns a copy on the placeholder's device."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.cpu_weight = weight  # a plain attribute: Module.to() and state_dict() leave it alone

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        return self.cpu_weight.to(placeholder.device, non_blocking=True)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:  # torch calls it when registering
        return weight.new_empty(0)


def _state_dict_with_cpu_weight(module: torch.nn.Module, state_dict: dict, prefix: str, metadata: Any) -> None:
    """A streamed layer's state dict shows its real ``weight`` (LoRA loaders read the shapes)."""
    state_dict.pop(prefix + "parametrizations.weight.original", None)
    state_dict[prefix + "weight"] = module.parametrizations.weight[0].cpu_weight
