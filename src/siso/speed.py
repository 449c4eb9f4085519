"""``--compile``: torch.compile the modules an iteration spends its time in, with a persistent cache.

An eager iteration of the distilled models is dominated by kernel launches rather than arithmetic
(docs/performance.md has the figures, and which of them are measured), so fusing kernels and replaying
CUDA graphs is where the time is. What is compiled:
the denoiser, the VAE decoder and the similarity towers (DINOv2, IR) -- every module that runs
forward and backward each iteration. Text encoders run once per run (or are small) and stay eager.

Compiling is done in place (``nn.Module.compile``): the module object, its state dict keys and its
LoRA layers stay what they were, so saving the LoRA, the model cache and plain-pipeline renders are
unaffected. Switching it off again (a later run without ``--compile`` on a cached model) only drops
the compiled call. Attaching a new LoRA to a compiled module is safe: dynamo guards on the module
tree and recompiles when it changed (a new rank, a new adapter).

Compiled code is cached on disk (inductor's FX-graph cache and AOTAutograd's cache, which holds the
backward too) in siso's cache directory, so only a machine's first run pays the minutes of compiling.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import SisoError
from .user_cache import cache_dir

COMPILE_CACHE_SUBDIR = "torch-compile"
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
#: overrides the compile mode siso picks (e.g. ``default`` where CUDA graphs misbehave or cost too much memory)
MODE_ENV = "SISO_COMPILE_MODE"
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileRecord:
    """What run.json records under ``compile``."""

    enabled: bool
    requested: str  # "on", "off" or "auto" (on for CUDA devices)
    mode: str | None = None
    modules: tuple[str, ...] = ()
    cache_dir: str | None = None

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["modules"] = list(self.modules)
        return record

    def describe(self) -> str:
        if not self.enabled:
            return "compile: off" + (" (auto: on for CUDA GPUs only)" if self.requested == "auto" else "")
        return f"compile: on, mode {self.mode} ({', '.join(self.modules)}); cache {self.cache_dir}"


def compile_cache_dir() -> Path:
    """Where compiled code is kept: ``<siso's cache>/torch-compile`` (see :func:`siso.user_cache.cache_dir`)."""
    return cache_dir() / COMPILE_CACHE_SUBDIR


def configure_inductor() -> Path:
    """Send inductor's on-disk caches to siso's cache directory, make sure they are on, and keep
    inductor off the one optimisation found inexact (below). Returns the cache directory.

    Inductor's own default is a directory under /tmp, which a reboot empties: the next run would
    compile for minutes again. A ``TORCHINDUCTOR_CACHE_DIR`` the user set is respected (inductor
    writes its default into that variable once it has looked, so the default does not count as
    set). Must run before compiling: inductor reads the variable each time it opens its cache.
    """
    current = os.environ.get(INDUCTOR_CACHE_ENV)
    if not current or os.path.abspath(current) == _inductor_default_cache_dir():
        os.environ[INDUCTOR_CACHE_ENV] = str(compile_cache_dir())
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # forward and backward graphs -> generated kernels
    functorch_config.enable_autograd_cache = True  # the joint graph's split, so warm runs skip AOTAutograd
    # Inductor's layout optimisation (convolutions in channels-last) gave wrong gradients here: with
    # torch 2.13 on the CPU, the backward of a diffusers UpBlock2D (ResNet blocks, then nearest upsampling
    # and a convolution) compiled to gradients unrelated to eager's (relative error 1.0), with the forward
    # exact; off, they agree to 1e-7 (tests/test_speed.py checks the whole iteration). Upstream reworked
    # how the backward inherits the forward's layout decision (pytorch/pytorch#191306). Off on every device
    # until a GPU run shows it exact there (benchmarks/bench_iteration.py checks gradients against eager).
    inductor_config.layout_optimization = False
    return Path(os.environ[INDUCTOR_CACHE_ENV])


def _inductor_default_cache_dir() -> str | None:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a torch that moved it: then only an unset variable is replaced
        return None
    return os.path.abspath(default_cache_dir())


def compile_mode(device: torch.device) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA, inductor's default elsewhere; ``$SISO_COMPILE_MODE`` overrides.

    CUDA graphs replay a whole captured iteration with one launch, which is what a launch-bound
    iteration needs, and they are sound here: shapes are fixed for a run (``dynamic=False``: one
    resolution, batch 1) and the LoRA is updated in place by the optimiser, so the captured
    addresses stay valid. ``max-autotune`` would autotune every matmul and convolution: many more
    minutes of compiling for a few percent. CPUs have no CUDA graphs.
    """
    override = os.environ.get(MODE_ENV, "").strip()
    if override:
        if override not in MODES:
            raise SisoError(f"${MODE_ENV} must be one of {', '.join(MODES)}, got {override!r}.")
        return override
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_wanted(requested: bool | None, device: torch.device) -> bool:
    """``None`` (auto): compile on CUDA GPUs, where the compile pays back; never by default on CPU or MPS."""
    return device.type == "cuda" if requested is None else bool(requested)


def set_compiled(module: torch.nn.Module, mode: str | None) -> None:
    """Compile ``module`` in place with ``mode``, or (``None``) return it to eager; idempotent.

    A module compiled before with the same mode gets the same compiled callable back, so a cached
    model is never wrapped twice and dynamo's code for it (kept per callable's backend) is reused.
    """
    if mode is None:
        module._compiled_call_impl = None  # what nn.Module.compile sets; __call__ then runs eagerly
        return
    calls = module.__dict__.setdefault("_siso_compiled_calls", {})
    if mode not in calls:
        # Static shapes: one graph per resolution, which CUDA graphs need; a graph break falls back
        # to eager for that part instead of failing.
        module.compile(mode=mode, dynamic=False, fullgraph=False)
        calls[mode] = module._compiled_call_impl
    module._compiled_call_impl = calls[mode]


def compile_modules(modules: Mapping[str, torch.nn.Module], requested: bool | None,
                    device: torch.device) -> CompileRecord:
    """Compile (or un-compile) ``modules`` for a run as ``requested`` (None: auto); return the record."""
    label = "auto" if requested is None else ("on" if requested else "off")
    if not compile_wanted(requested, device):
        for module in modules.values():
            set_compiled(module, None)
        return CompileRecord(enabled=False, requested=label)
    cache = configure_inductor()
    mode = compile_mode(device)
    for module in modules.values():
        set_compiled(module, mode)
    return CompileRecord(enabled=True, requested=label, mode=mode, modules=tuple(modules), cache_dir=str(cache))


def mark_iterations(render: Callable[[], torch.Tensor], record: CompileRecord) -> Callable[[], torch.Tensor]:
    """Tell CUDA-graph trees where each iteration starts.

    Without the mark, a forward whose backward never ran (the last iteration of a run, which is not
    stepped) leaves the captured graphs waiting for it, and the next run's first forward would fall
    off the fast path. Only for modes that capture CUDA graphs; the mark is a no-op otherwise.
    """
    if not record.enabled or record.mode not in ("reduce-overhead", "max-autotune"):
        return render

    def marked() -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return render()

    return marked


def iteration_modules(backbone: Any, loss: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The backbone's per-iteration modules (:meth:`Backbone.compiled_modules`) and the similarity
    towers: each similarity model's network, which its ``embed`` calls (preprocessing stays eager)."""
    modules = dict(backbone.compiled_modules())
    for name, model in getattr(loss, "models", {}).items():
        network = getattr(model, "model", None)
        if isinstance(network, torch.nn.Module):
            modules[name] = network
    return modules
