"""Generation: set up backbone, LoRA and similarity models for a config, run the loop, write the run.

``optimize()`` gives the raw event stream; ``generate()`` runs it to the end and writes the run
directory. The CLI and the web app are thin layers over these two.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .backbones import Backbone, render
from .backbones.base import MemoryPlan
from .config import EditConfig, GenerateConfig
from .devices import dtype_name, resolve_device, resolve_dtype
from .errors import NoResultError, SisoError
from .images import load_image, pil_to_tensor, tensor_to_pil, working_copy
from .lora import LoraState, attach_lora, lora_parameter_groups, save_lora, snapshot_lora
from .models import ModelCache
from .optimize import LoopSettings, Optimization, StepEvent
from .runs import RunWriter, check_run_dir, library_versions, prepare_run_dir
from .similarity import SIMILARITY_MODELS, SimilarityLoss
from .speed import CompileRecord, compile_modules, iteration_modules, mark_iterations

Status = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


class SessionControls:
    """What every prepared session (generation, editing) offers: iterate it to optimise
    (``for event in session``), stop it, save its best LoRA."""

    config: Any
    backbone: Backbone
    optimization: Optimization

    def __iter__(self) -> Iterator[StepEvent]:
        return iter(self.optimization)

    def request_stop(self) -> None:
        self.optimization.request_stop()

    def save_lora(self, directory: str | Path) -> Path:
        state: LoraState = self.optimization.best_lora
        if state is None:
            raise SisoError("No iteration finished, so there is no LoRA to save yet.")
        return save_lora(self.backbone, state, directory, self.config.lora_format, self.config.resolution)


@dataclass
class GenerationSession(SessionControls):
    """A prepared generation."""

    config: GenerateConfig  # resolved: no None knobs left
    backbone: Backbone
    loss: SimilarityLoss
    optimization: Optimization
    device: torch.device
    dtype: torch.dtype
    setup_seconds: float = 0.0
    memory: MemoryPlan | None = None  # the memory savers the run uses, and why
    compiled: CompileRecord | None = None  # whether (and how) the iteration's modules are compiled

    def record(self) -> dict[str, Any]:
        return {
            "task": "generate",
            "config": self.config.to_record(),
            "similarity_models": similarity_sources(self.config),
            "backbone": type(self.backbone).__name__,
            "preset": self.backbone.preset.to_record(),
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            **speed_record(self),
            "versions": library_versions(),
        }


def prepare_generation(config: GenerateConfig, status: Status = _quiet,
                       cache: ModelCache | None = None) -> GenerationSession:
    """Load everything a run needs; fails fast (before any model loads) on bad inputs.

    With a ``cache``, models loaded by earlier runs are reused (their old LoRA is removed).
    """
    started = time.perf_counter()
    cache = cache or ModelCache()
    config = config.with_ir_resolved()
    subjects = [working_copy(load_image(path, "subject photo")) for path in config.subjects]
    check_similarity_sources(config, cache)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    with _out_of_memory_as_error(config):
        status(f"Loading {config.model}")
        backbone = cache.backbone(config.model, device, dtype)
        type(backbone).check_options(config.model, config.train_text_encoder, config.lora_format)
        config = config.resolved(backbone.preset, type(backbone).default_lora_formats)
        backbone.check_resolution(config.resolution)
        loss = load_similarity_loss(config, subjects, cache, device, dtype, status)
        attach_lora(backbone, config.lora_rank, config.train_text_encoder, config.seed)
        render_fn = _make_render(backbone, config)
        render_fn, memory, compiled = apply_speed_settings(backbone, loss, config, render_fn, status)
    optimization = Optimization(
        render=render_fn,
        loss_fn=loss,
        params=lora_parameter_groups(backbone, config.text_encoder_learning_rate, config.text_encoder_weight_decay),
        snapshot=lambda: snapshot_lora(backbone),
        settings=LoopSettings.from_config(config),
        early_stop_offset=loss.offset,
    )
    return GenerationSession(config, backbone, loss, optimization, device, dtype,
                             setup_seconds=time.perf_counter() - started, memory=memory, compiled=compiled)


def apply_speed_settings(backbone: Backbone, loss: torch.nn.Module, config: GenerateConfig | EditConfig,
                         render_fn: Callable[[], torch.Tensor], status: Status = _quiet,
                         ) -> tuple[Callable[[], torch.Tensor], MemoryPlan, CompileRecord]:
    """Memory savers and compilation for a run whose weights are all in place (LoRA attached, frozen
    text encoders parked): the free memory is then what the loop has. Returns the render to loop on."""
    memory = backbone.choose_memory_plan(config.low_memory, config.resolution)
    backbone.apply_memory_plan(memory)
    status(memory.describe())
    compiled = compile_modules(iteration_modules(backbone, loss), config.compile, backbone.device)
    return mark_iterations(render_fn, compiled), memory, compiled


def speed_record(session: Any) -> dict[str, Any]:
    """run.json's ``memory``, ``compile`` and ``weights_variant`` entries of a prepared session."""
    return {
        "memory": session.memory.to_record() if session.memory is not None else None,
        "compile": session.compiled.to_record() if session.compiled is not None else None,
        "weights_variant": getattr(session.backbone, "weights_variant", None),
    }


def check_similarity_sources(config: GenerateConfig | EditConfig, cache: ModelCache) -> None:
    """The similarity models' sources, checked before the (much larger) backbone loads (those the
    cache already holds were loaded, so checked, before)."""
    for name, source in similarity_sources(config).items():
        if not cache.has_similarity(name, source):
            SIMILARITY_MODELS[name].check_source(source)


def similarity_sources(config: GenerateConfig | EditConfig) -> dict[str, str]:
    """Which similarity models a (resolved) config runs, and from where: what run.json records."""
    sources = {"dino": config.dino_model, "ir": config.ir_model}
    return {name: sources[name] for name in config.similarity_names}


def load_similarity_loss(config: GenerateConfig | EditConfig, subjects: list[Image.Image], cache: ModelCache,
                         device: torch.device, dtype: torch.dtype, status: Status = _quiet) -> SimilarityLoss:
    """The config's similarity models (from the cache), weighted, against the subject photo(s)."""
    sources = similarity_sources(config)
    weights = {"dino": config.dino_weight, "ir": config.ir_weight}
    models = {}
    for name in sources:
        status(f"Loading the {name} similarity model {sources[name]}")
        models[name] = cache.similarity(name, sources[name], device, dtype)
    return SimilarityLoss(models, {n: weights[n] for n in models}, [pil_to_tensor(s) for s in subjects])


def _make_render(backbone: Backbone, config: GenerateConfig) -> Callable[[], torch.Tensor]:
    def render_with(cond):
        return render(backbone, cond, config.seed, config.resolution, config.denoise_steps, config.grad_steps)

    if config.train_text_encoder:
        # The text encoders are being trained, so the prompt must be encoded anew each time
        # (backbones cache what their frozen encoders compute, e.g. FLUX's T5).
        render_fn = lambda: render_with(backbone.encode_prompt(config.prompt, config.resolution))  # noqa: E731
    else:
        with torch.no_grad():
            cond = backbone.encode_prompt(config.prompt, config.resolution)
        render_fn = lambda: render_with(cond)  # noqa: E731
    # Frozen text encoders have done their work: free their GPU memory for the loop.
    backbone.offload_text_encoders()
    return render_fn


@contextlib.contextmanager
def _out_of_memory_as_error(config: GenerateConfig) -> Iterator[None]:
    try:
        yield
    except torch.OutOfMemoryError as err:
        raise SisoError(out_of_memory_advice(config)) from err


def out_of_memory_advice(config: GenerateConfig | EditConfig) -> str:
    hints = [f"a lower --resolution (now {config.resolution})"]
    if getattr(config, "train_text_encoder", False):  # editing has no text-encoder LoRA
        hints.append("dropping --train-text-encoder")
    if "ir" in config.similarity_names:
        hints.append("--similarity dino")
    if config.dtype == "fp32":
        hints.append("--dtype bf16")
    if "xl" in config.model.lower():
        hints.append("the smaller stabilityai/sd-turbo model")
    return (f"The GPU ran out of memory running {config.model}. Try " + ", ".join(hints)
            + ", or close other programs using the GPU.")


@dataclass
class GenerateResult:
    """What ``generate`` returns: the best image, where the LoRA is, and the per-iteration losses."""

    image: Image.Image | None
    lora_dir: Path | None
    history: list[dict[str, float]]
    best_step: int | None
    stop_reason: str | None
    run_dir: Path
    record: dict[str, Any] = field(default_factory=dict)


class GenerationRun:
    """A prepared session that keeps its run directory up to date: iterate :meth:`steps`, then
    :meth:`finish`. Iterating ``steps()`` again continues the run (the web app's Continue).

    The best iteration's image and LoRA are on disk from the moment they are found; a run that ends
    in an error (out of memory, a full disk) keeps them and says so.
    """

    def __init__(self, session: GenerationSession, out_dir: Path) -> None:
        self.session = session
        self.out_dir = out_dir
        self.writer = RunWriter(out_dir, session.record(), save_lora=session.save_lora)
        self.failure: SisoError | None = None

    def _kept(self) -> str:
        optimization = self.session.optimization
        if optimization.best_step is None:
            return f"No iteration finished, so nothing but the record {self.out_dir / 'run.json'} was written."
        return (f"The best of {len(optimization.history)} iterations (iteration {optimization.best_step}: "
                f"best.png and lora/) is saved in {self.out_dir}.")

    def steps(self, on_step: Callable[[StepEvent], None] | None = None) -> Iterator[StepEvent]:
        optimization = self.session.optimization
        try:
            for event in self.session:
                self.writer.on_step(event)
                if on_step is not None:
                    on_step(event)
                yield event
        except KeyboardInterrupt:
            optimization.stop_reason = "interrupted"
        except torch.OutOfMemoryError as err:
            optimization.stop_reason = "out_of_memory"
            self.failure = SisoError(out_of_memory_advice(self.session.config) + " " + self._kept())
            self.failure.__cause__ = err
        except OSError as err:  # the disk filled up, or the run directory went away
            optimization.stop_reason = "write_error"
            self.failure = SisoError(
                f"Writing the run failed ({_describe_os_error(err)}), so it stopped after iteration "
                f"{len(optimization.history) - 1}. {self._kept()} Free some space and run again."
            )
            self.failure.__cause__ = err

    def finish(self) -> GenerateResult:
        """Write the plot and the final run.json; raise the run's error, if it had one.

        A run whose first iteration was already NaN has no usable result: :class:`NoResultError`.
        """
        optimization = self.session.optimization
        if optimization.stop_reason is None:  # the consumer stopped iterating early
            optimization.stop_reason = "interrupted"
        if self.failure is None and optimization.stop_reason == "nan" and optimization.best_step is None:
            self.failure = NoResultError(nan_advice(self.session.config, self.out_dir))
        status = "failed" if self.failure is not None else "finished"
        try:
            record = self.writer.finish(optimization, {"setup_seconds": round(self.session.setup_seconds, 3)},
                                        status=status, error=str(self.failure) if self.failure else None)
        except OSError as err:
            if self.failure is not None:  # already failing (the disk is full): report the first cause
                raise self.failure from err
            optimization.stop_reason = "write_error"
            raise SisoError(f"Writing the run's final record failed ({_describe_os_error(err)}). "
                            f"{self._kept()}") from err
        if self.failure is not None:
            raise self.failure
        return GenerateResult(
            image=tensor_to_pil(optimization.best_image) if optimization.best_image is not None else None,
            lora_dir=self.out_dir / "lora" if optimization.best_lora is not None else None,
            history=list(optimization.history),
            best_step=optimization.best_step,
            stop_reason=optimization.stop_reason,
            run_dir=self.out_dir,
            record=record,
        )


def _describe_os_error(err: OSError) -> str:
    where = f" {err.filename}" if err.filename else ""
    return f"{err.strerror or err.__class__.__name__}{':' if where else ''}{where}"


def nan_advice(config: GenerateConfig | EditConfig, out_dir: Path) -> str:
    hints = ["a lower --lr"]
    if config.dtype in ("fp16", "auto"):
        hints.insert(0, "--dtype bf16 or --dtype fp32 (in fp16 some models overflow: SDXL's VAE does)")
    return (f"The loss was NaN at the first iteration, so there is no usable image or LoRA (the record is "
            f"{out_dir / 'run.json'}). Try " + ", or ".join(hints) + ".")


def start_generation(config: GenerateConfig, out: str | Path, overwrite: bool = False, status: Status = _quiet,
                     cache: ModelCache | None = None) -> GenerationRun:
    """Check ``out``, load the models, then create the run directory (a failed start leaves none)."""
    check_run_dir(out, overwrite, config.input_paths())
    session = prepare_generation(config, status, cache)
    return GenerationRun(session, prepare_run_dir(out, overwrite, config.input_paths()))


def run_generation(config: GenerateConfig, out: str | Path, overwrite: bool = False,
                   on_step: Callable[[StepEvent], None] | None = None, status: Status = _quiet,
                   on_session: Callable[[GenerationSession], None] | None = None,
                   cache: ModelCache | None = None) -> GenerateResult:
    """Prepare, optimise and write the run directory; Ctrl-C and NaN keep the best so far.

    ``on_session`` receives the prepared session before the loop starts (the CLI uses it to wire
    Ctrl-C to ``request_stop``).
    """
    run = start_generation(config, out, overwrite, status, cache)
    if on_session is not None:
        on_session(run.session)
    for _ in run.steps(on_step):
        pass
    return run.finish()


def _config(subject: str | Path | list[str | Path], prompt: str, options: dict[str, Any]) -> GenerateConfig:
    subjects = tuple(subject) if isinstance(subject, (list, tuple)) else (subject,)
    return GenerateConfig(subjects=subjects, prompt=prompt, **options)


def optimize(subject: str | Path | list[str | Path], prompt: str, **options: Any) -> GenerationSession:
    """Stream a generation: ``for event in siso.optimize("dog.jpg", "a photo of a dog"): ...``.

    ``options`` are :class:`GenerateConfig` fields. Nothing is written to disk; call
    ``session.save_lora(dir)`` to keep the best LoRA.
    """
    return prepare_generation(_config(subject, prompt, options))


def generate(subject: str | Path | list[str | Path], prompt: str, out: str | Path, *, overwrite: bool = False,
             on_step: Callable[[StepEvent], None] | None = None, **options: Any) -> GenerateResult:
    """Personalise the model on the subject photo(s) and write the run directory ``out``.

    Returns the best image, the LoRA directory (loadable by ``pipe.load_lora_weights``) and the
    per-iteration losses. ``options`` are :class:`GenerateConfig` fields (``model``, ``seed``,
    ``max_steps``, ``learning_rate``, ...).
    """
    return run_generation(_config(subject, prompt, options), out, overwrite=overwrite, on_step=on_step)
