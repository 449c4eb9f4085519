"""What a command shows and how it ends: the console, the progress bar, the device and settings
lines, Ctrl-C, SIGTERM and SIGHUP, the closing summary and the exit code after a signal."""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)

STOP_REASONS = {
    "early_stop": "stopped early (no further improvement)",
    "max_steps": "reached --max-steps",
    "interrupted": "interrupted; the best iteration so far was kept",
    "nan": "stopped: the loss became NaN; the best finite iteration was kept",
}
#: exit codes after a stop by signal, as shells report a process killed by it (128 + the signal)
SIGNAL_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
if hasattr(signal, "SIGHUP"):  # the terminal closed (not on Windows): a stop like SIGTERM's, not a kill
    SIGNAL_EXIT_CODES[signal.SIGHUP] = 129


def quiet_libraries() -> None:
    """Library download/loading bars would fight with ours; siso reports its own progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)
    # diffusers still passes this deprecated argument to huggingface_hub on every download: not the user's to fix.
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")


def announce_device(device: str, dtype: str) -> None:
    """Say where the run computes before anything large is loaded (or downloaded); warn, not refuse, on the CPU."""
    from ..config import DEVICES, DTYPES
    from ..devices import describe_device, dtype_name, resolve_device, resolve_dtype

    if device not in DEVICES or dtype not in DTYPES:
        return  # the run's config refuses these with the message that names the choices
    resolved = resolve_device(device)
    precision = dtype_name(resolve_dtype(dtype, resolved))
    console.print(f"Device: {escape(describe_device(resolved))}, dtype {precision} "
                  "(frozen weights; the LoRA trains in fp32)")
    if resolved.type == "cpu":
        why = "PyTorch sees no CUDA or MPS GPU" if device == "auto" else "--device cpu"
        console.print(f"[yellow]Warning: running on the CPU ({why}). A full-size model takes minutes per "
                      "iteration here; a GPU is strongly recommended.[/]")


def settings_line(session: Any) -> str:
    """One line with the settings a prepared session resolved (the backbone's preset filled in)."""
    from ..devices import dtype_name

    config = session.config
    parts = [f"lr {config.learning_rate:.1e}".replace("e-0", "e-"),
             f"early stop {config.early_stop_pct:g} % / {config.early_stop_patience} iterations"]
    if getattr(config, "denoise_steps", None) is not None:
        parts.append(f"denoise/grad steps {config.denoise_steps}/{config.grad_steps}")
    if getattr(config, "inversion_steps", None) is not None:
        parts.append(f"inversion steps {config.inversion_steps}, strength {config.strength:g}, "
                     f"grad steps {config.grad_steps}")
    parts.append(f"weight decay {config.adam_weight_decay:g}")
    if getattr(config, "train_text_encoder", False):
        parts.append(f"text-encoder LoRA (lr {config.text_encoder_learning_rate:.1e})".replace("e-0", "e-"))
    parts += [f"max steps {config.max_steps}", f"LoRA rank {config.lora_rank}", f"seed {config.seed}",
              f"resolution {config.resolution}", f"device {session.device}",
              f"dtype {dtype_name(session.dtype)}"]
    return "Settings: " + ", ".join(parts)


class StopSignals:
    """Ctrl-C (SIGINT), SIGTERM (what `docker stop`, `timeout`, Slurm and Kubernetes send) and SIGHUP (the
    terminal closed) all stop a run gracefully: the first finishes this iteration, then everything is
    written; a second stops at once (the best iteration's image and LoRA are on disk already).
    ``received`` is the first."""

    def __init__(self) -> None:
        self.received: int | None = None

    @property
    def exit_code(self) -> int | None:
        return SIGNAL_EXIT_CODES.get(self.received) if self.received is not None else None

    @contextlib.contextmanager
    def stopping(self, request_stop: Callable[[], None]) -> Iterator[None]:
        def handler(signum, _frame):
            if self.received is not None:
                raise KeyboardInterrupt
            self.received = signum
            request_stop()
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
                console.print(f"[yellow]{name}: stopping after this iteration; send it again to stop at once "
                              "(the best iteration so far is saved either way).[/]")

        previous = {sig: signal.getsignal(sig) for sig in SIGNAL_EXIT_CODES}
        for sig in SIGNAL_EXIT_CODES:
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)



def similarity_hint(config: Any) -> None:
    """Say once, plainly, when a run will not use the paper's DINO + IR loss because no IR model is found."""
    from ..ir_cache import DINO_ONLY_NOTICE, is_dino_only

    if is_dino_only(config):
        console.print(f"[yellow]{escape(DINO_ONLY_NOTICE)}[/]")


@contextlib.contextmanager
def status_lines(show: Callable[[str], None]) -> Iterator[None]:
    """Route siso's status messages (``logging`` INFO on the ``siso`` loggers) to ``show`` while the
    block runs; its warnings are printed. Library users see them only if they configure logging."""

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                console.print(f"[yellow]{escape(message)}[/]", highlight=False)
            else:
                show(message)

    logger = logging.getLogger("siso")
    handler, level = Handler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def follow(start: Callable[[], Any], max_steps: int, announce: Callable[[Any], None] | None = None,
           signals: StopSignals | None = None) -> Any:
    """Start a run (``start()`` returns a :class:`siso.run.Run`) and iterate it under a progress bar,
    with Ctrl-C and SIGTERM wired to its ``request_stop``; ``announce(session)`` prints what the task
    found before the loop. Returns the run's result; the backbone is handed back however it ends."""
    signals = signals if signals is not None else StopSignals()
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"), TimeElapsedColumn(), console=console, transient=False,
    )
    with progress:
        task = progress.add_task("Loading", total=max_steps, losses="")
        with status_lines(lambda message: progress.update(task, description=escape(message))):
            run = start()
        try:
            session = run.session
            console.print(escape(settings_line(session)), highlight=False)
            for note in session.task.notes:
                console.print(f"[yellow]Note:[/] {escape(note)}", highlight=False)
            announce_speed(session)
            if announce is not None:
                announce(session)
            progress.update(task, description="Optimising", total=session.config.max_steps)
            with signals.stopping(run.request_stop):
                for event in run.steps():
                    parts = [f"{k} {v:.4f}" for k, v in event.losses.items() if k != "step"]
                    parts.append(f"best step {event.best_step}")
                    progress.update(task, completed=event.step + 1, losses=" | ".join(parts))
            return run.finish()
        finally:
            run.close()


def exit_after_signal(result: Any, signals: StopSignals) -> None:
    """Exit as scripts expect of a run a signal stopped: 130 after Ctrl-C, 143 after SIGTERM, 129 after SIGHUP."""
    if result.stop_reason == "interrupted" and signals.exit_code is not None:
        raise typer.Exit(signals.exit_code)


def print_summary(result: Any, files: Iterable[tuple[str, str]] = ()) -> None:
    """The closing lines of an optimising command: why it stopped and where everything is."""
    console.print(f"[green]Done[/]: {STOP_REASONS.get(result.stop_reason, result.stop_reason)}. "
                  f"Best iteration {result.best_step} of {len(result.history)}.")
    console.print(f"  best image: {escape(str(result.run_dir / 'best.png'))}")
    for name, path in files:
        console.print(f"  {name + ':':<11} {escape(path)}")
    if result.lora_dir is not None:
        from ..lora import KOHYA_WEIGHT_NAME

        console.print(f"  LoRA:       {escape(str(result.lora_dir))}  (diffusers: pipe.load_lora_weights(...))")
        kohya = result.lora_dir / KOHYA_WEIGHT_NAME
        if kohya.is_file():
            console.print(f"              {escape(str(kohya))}  (ComfyUI: LoraLoader; A1111: <lora:{kohya.stem}:1>)")
    console.print(f"  record:     {escape(str(result.run_dir / 'run.json'))}")


def announce_speed(session: Any) -> None:
    """Print which memory savers the run uses (and why) and whether it is compiled."""
    memory = getattr(session, "memory", None)
    compiled = getattr(session, "compiled", None)
    if memory is not None:
        console.print(escape(memory.describe()))
    if compiled is not None and compiled.enabled:
        console.print(escape("Compiling: the first iteration takes longer (" + compiled.describe() + ")"))
