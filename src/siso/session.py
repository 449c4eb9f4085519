"""The session template: what every optimising run does, whatever it optimises for.

A :class:`Task` (generation, editing) supplies its inputs, how it renders and its loss; the
:class:`Session` does the rest, the same way for both (peft's ``BaseTuner`` is the model: the
template calls the task's hooks): resolve the config, check everything that needs no model, borrow the
backbone from the model cache, load the similarity models, attach the LoRA, apply the memory savers
and compilation, and hand the loop (:class:`~siso.optimize.Optimization`) its render and loss.

A session borrows its backbone for as long as it lives (:class:`~siso.models.ModelCache`). While it
is idle (the web app between Start and Continue) another run may take the backbone; the session then
puts its own LoRA back before its next iteration, so runs that share models stay independent.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from .backbones import Backbone
from .config import RunSettings
from .devices import dtype_name, resolve_device, resolve_dtype
from .errors import SisoError
from .images import pil_to_tensor
from .ir_cache import resolve_ir
from .loop import LoopSettings, Optimization, StepEvent
from .lora import LoraAdapter, attach_lora, lora_parameter_groups, reattach_lora, save_lora, snapshot_lora
from .models import ModelCache
from .run_directory import library_versions
from .similarity import SIMILARITY_MODELS, SimilarityLoss
from .speed import compile_modules, iteration_modules, mark_iterations

log = logging.getLogger(__name__)


class Task(ABC):
    """What one kind of run contributes to the template. Hooks run in this order: ``load_inputs``
    (before any model), ``check_backbone``, ``setup`` (the backbone is loaded; the similarity models
    not yet), ``prepare`` (the LoRA is attached); ``record`` and ``write_inputs`` describe the run."""

    #: run.json's ``task``
    kind: ClassVar[str]

    def __init__(self, config: RunSettings) -> None:
        self.config = config  # the template replaces it with the resolved config
        #: what the user should know about the inputs once the models have read them (a prompt cut short)
        self.notes: list[str] = []

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the LoRA covers the text encoders too."""
        return False

    @abstractmethod
    def load_inputs(self) -> list[Image.Image]:
        """Read and check the task's photos before any model loads; return the subject photo(s)."""

    def check_backbone(self, backbone_class: type[Backbone]) -> None:  # noqa: B027 - an optional hook
        """Refuse, before loading, a model family the task cannot run on."""

    def extra_sources(self) -> tuple[tuple[str, str], ...]:
        """(source, flag) of the task's own models, checked before any model loads."""
        return ()

    def setup(self, backbone: Backbone, device: torch.device, dtype: torch.dtype) -> None:  # noqa: B027 - an optional hook
        """Work that needs the backbone loaded but not yet the similarity models (editing: labels, mask)."""

    @abstractmethod
    def prepare(self, backbone: Backbone, similarity: SimilarityLoss) -> tuple[Callable[[], torch.Tensor], nn.Module]:
        """The render the loop calls (its graph reaching the LoRA) and the loss (``forward(image)`` ->
        dict of scalar tensors with ``total``; ``offset`` turns it into the reference's loss)."""

    def parameter_groups(self, adapter: LoraAdapter, denoiser_name: str) -> list[dict]:
        """The LoRA's AdamW parameter groups."""
        return lora_parameter_groups(adapter, denoiser_name)

    def record(self) -> dict[str, Any]:
        """The task's entries in run.json."""
        return {}

    def write_inputs(self, out_dir: Path) -> None:  # noqa: B027 - an optional hook
        """Files the run directory holds besides the iterations (editing: the scene, the mask)."""

    def memory_hints(self) -> list[str]:
        """What else the user can switch off when the GPU runs out of memory."""
        return []

    @abstractmethod
    def lora_title(self) -> str:
        """The LoRA's title in its files' metadata (ModelSpec's ``title``)."""


class Session:
    """A prepared run: iterate it to optimise (``for event in session``), stop it, save its best LoRA.

    Built by running the template over ``task`` (see the module doc); a model that fails to load or
    an input that is refused leaves the cache as it was.
    """

    def __init__(self, task: Task, cache: ModelCache | None = None) -> None:
        started = time.perf_counter()
        self.task = task
        self.cache = cache or ModelCache()
        self.busy = True  # preparing: the cache must not take the backbone away
        config = resolve_ir(task.config)
        task.config = config
        subjects = task.load_inputs()
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        backbone_class = self.cache.backbone_class(config.model, self.device, self.dtype)
        task.check_backbone(backbone_class)
        config = config.resolved(backbone_class.preset)
        task.config = self.config = config
        backbone_class.check_options(config.model, task.trains_text_encoder, config.lora_format)
        check_sources(config, self.cache, task.extra_sources())
        self.similarity_dtype = self.dtype if config.similarity_dtype == "auto" else resolve_dtype(
            config.similarity_dtype, self.device)
        with out_of_memory_as_error(self):
            log.info("Loading %s", config.model)
            self.backbone = self.cache.borrow(config.model, self.device, self.dtype, self)
            try:
                self._prepare(subjects)
            except BaseException:
                self.cache.give_back(self.backbone, self)
                raise
        self.busy = False
        self.setup_seconds = time.perf_counter() - started

    def _prepare(self, subjects: list[Image.Image]) -> None:
        config, backbone, task = self.config, self.backbone, self.task
        backbone.check_resolution(config.resolution)
        task.setup(backbone, self.device, self.dtype)
        self.similarity = similarity = load_similarity_loss(config, subjects, self.cache, self.device,
                                                            self.similarity_dtype)
        self.adapter = attach_lora(backbone, config.lora_rank, task.trains_text_encoder, config.seed)
        render, self.loss = task.prepare(backbone, similarity)
        # Frozen text encoders have done their work: free their GPU memory for the loop. Then the memory
        # savers, chosen with every weight in place: the free memory is what the loop's activations have.
        backbone.offload_text_encoders()
        self.memory = backbone.choose_memory_plan(config.low_memory, config.resolution)
        backbone.apply_memory_plan(self.memory)
        log.info("%s", self.memory.describe())
        self.compiled = compile_modules(iteration_modules(backbone, similarity), config.compile, backbone.device)
        self.optimization = Optimization(
            render=mark_iterations(render, self.compiled),
            loss_fn=self.loss,
            params=task.parameter_groups(self.adapter, backbone.denoiser_name),
            snapshot=lambda: snapshot_lora(backbone),
            settings=LoopSettings.from_config(config),
            early_stop_offset=self.loss.offset,
        )

    # -- the loop -------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StepEvent]:
        with self.active():
            yield from self.optimization

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """While this block runs the backbone is this session's, with its LoRA on: if another run took
        it meanwhile, it is borrowed back and the session's own LoRA, text-encoder parking, memory
        savers and compilation are put back as they were. Nests (saving the LoRA while iterating)."""
        was_busy, self.busy = self.busy, True
        try:
            if not self.cache.holds(self.backbone, self):
                backbone = self.cache.borrow(self.config.model, self.device, self.dtype, self)
                if backbone is not self.backbone:
                    raise SisoError("The model cache was cleared while this run was paused; start it again.")
                reattach_lora(backbone, self.adapter)
                backbone.offload_text_encoders()
                backbone.apply_memory_plan(self.memory)
                compile_modules(iteration_modules(backbone, self.similarity), self.config.compile, backbone.device)
            yield
        finally:
            self.busy = was_busy

    def suspend(self) -> None:
        """The cache takes the backbone for another run. Nothing to save: the adapter object keeps the
        LoRA's parameters (and the optimiser their state); :meth:`active` puts them back."""

    def request_stop(self) -> None:
        """Stop after the current iteration (Ctrl-C, a Stop button); the best so far is kept."""
        self.optimization.request_stop()

    def save_lora(self, directory: str | Path) -> Path:
        """Write the best iteration's LoRA files into ``directory``."""
        state = self.optimization.best_lora
        if state is None:
            raise SisoError("No iteration finished, so there is no LoRA to save yet.")
        with self.active():
            return save_lora(self.backbone, state, directory, self.config.lora_format, self.config.resolution,
                             self.task.lora_title())

    def close(self) -> None:
        """Hand the backbone back to the cache, clean (nothing if another run has it now)."""
        self.cache.give_back(self.backbone, self)

    # -- what run.json says -----------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        return {
            "task": self.task.kind,
            "config": self.config.to_record(),
            "similarity_models": similarity_sources(self.config),
            **self.task.record(),
            "backbone": type(self.backbone).__name__,
            "preset": self.backbone.preset.to_record(),
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            "similarity_dtype": dtype_name(self.similarity_dtype),
            "memory": self.memory.to_record(),
            "compile": self.compiled.to_record(),
            "weights_variant": self.backbone.weights_variant,
            "versions": library_versions(),
            **({"notes": list(self.task.notes)} if self.task.notes else {}),
        }


def check_sources(config: RunSettings, cache: ModelCache, extra: tuple[tuple[str, str], ...] = ()) -> None:
    """Every model source of the run checked before the (much larger) backbone loads: the similarity
    models (those the cache holds were checked when they loaded) and the task's own."""
    from .sources import check_source

    for name, source in similarity_sources(config).items():
        if not cache.has_similarity(name, source):
            SIMILARITY_MODELS[name].check_source(source)
    for source, flag in extra:
        check_source(source, flag)


def similarity_sources(config: RunSettings) -> dict[str, str]:
    """Which similarity models a (resolved) config runs, and from where: what run.json records."""
    sources = {"dino": config.dino_model, "ir": config.ir_model}
    return {name: sources[name] for name in config.similarity_names}


def load_similarity_loss(config: RunSettings, subjects: list[Image.Image], cache: ModelCache,
                         device: torch.device, dtype: torch.dtype) -> SimilarityLoss:
    """The config's similarity models (from the cache), weighted, against the subject photo(s)."""
    sources = similarity_sources(config)
    weights = {"dino": config.dino_weight, "ir": config.ir_weight}
    models = {}
    for name, source in sources.items():
        log.info("Loading the %s similarity model %s", name, source)
        models[name] = cache.similarity(name, source, device, dtype)
    return SimilarityLoss(models, {n: weights[n] for n in models}, [pil_to_tensor(s) for s in subjects])


@contextlib.contextmanager
def out_of_memory_as_error(session: Session) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise SisoError(out_of_memory_advice(session.config, session.task.memory_hints())) from err


def out_of_memory_advice(config: RunSettings, hints: list[str] = ()) -> str:
    hints = [f"a lower --resolution (now {config.resolution})", *hints]
    if "ir" in config.similarity_names:
        hints.append("--similarity dino")
    if config.dtype == "fp32":
        hints.append("--dtype bf16")
    if "xl" in config.model.lower():
        hints.append("the smaller stabilityai/sd-turbo model")
    return (f"The GPU ran out of memory running {config.model}. Try " + ", ".join(hints)
            + ", or close other programs using the GPU.")
