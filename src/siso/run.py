"""A session that keeps its run directory up to date: the one way every surface drives the loop.

``run = start_run(task, out)``, then ``for event in run.steps(): ...`` (the CLI's progress bar, the
web app's live view, the benchmark's worker all iterate this), then ``run.finish()``. Iterating
``steps()`` again continues the run (the web app's Continue). The best iteration's image and LoRA are
on disk from the moment they are found; a run that ends in an error (out of memory, a full disk)
keeps them and says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import NoResultError, SisoError
from .files import WRITE_ERRORS, describe_write_error
from .images import tensor_to_pil
from .locks import DirectoryLock
from .loop import StepEvent
from .models import ModelCache
from .run_directory import RunWriter, check_run_dir, prepare_run_dir
from .session import Session, Task, out_of_memory_advice


@dataclass
class RunResult:
    """What a finished run gives: the best image, where its LoRA is, the per-iteration losses, and
    the task itself (``result.task``: for an edit its labels, mask, scene and reconstruction)."""

    image: Image.Image | None
    lora_dir: Path | None
    history: list[dict[str, float]]
    best_step: int | None
    stop_reason: str | None
    run_dir: Path
    task: Task
    record: dict[str, Any] = field(default_factory=dict)


class Run:
    """A prepared :class:`~siso.session.Session` writing the run directory ``out_dir``."""

    def __init__(self, session: Session, out_dir: Path, lock: DirectoryLock | None = None) -> None:
        self.session = session
        self.out_dir = out_dir
        self.lock = lock  # this process is the directory's one writer until close()
        self.writer = RunWriter(out_dir, session.record(), save_lora=session.save_lora,
                                iteration_images=session.task.config.iteration_images)
        self.failure: SisoError | None = None
        self.write_error: Exception | None = None  # the write that stopped the run, if one did

    def _kept(self) -> str:
        """What is really on disk: the iteration whose image and LoRA were last written whole."""
        optimization = self.session.optimization
        saved = self.writer.record.get("lora_step")
        if optimization.best_step is None:
            return f"No iteration finished, so nothing but the record {self.out_dir / 'run.json'} was written."
        if saved is None:
            return (f"No iteration's image and LoRA could be written; {len(optimization.history)} iterations ran "
                    f"(the record is {self.out_dir / 'run.json'}).")
        if saved != optimization.best_step:
            return (f"Iteration {saved}'s image and LoRA (best.png and lora/) are saved in {self.out_dir}; the "
                    f"best iteration, {optimization.best_step}, could not be written.")
        return (f"The best of {len(optimization.history)} iterations (iteration {saved}: "
                f"best.png and lora/) is saved in {self.out_dir}.")

    def steps(self) -> Iterator[StepEvent]:
        """The loop's events, each already written to the run directory."""
        optimization = self.session.optimization
        try:
            for event in self.session:
                self.writer.on_step(event)
                yield event
        except KeyboardInterrupt:
            optimization.stop_reason = "interrupted"
        except torch.OutOfMemoryError as err:
            optimization.stop_reason = "out_of_memory"
            hints = self.session.task.memory_hints()
            self.failure = SisoError(out_of_memory_advice(self.session.config, hints) + " " + self._kept())
            self.failure.__cause__ = err
        except WRITE_ERRORS as err:  # the disk filled up or turned read-only, the directory went away
            optimization.stop_reason = "write_error"
            self.write_error = err  # the message is made in finish(), once it is known what is on disk

    def request_stop(self) -> None:
        """Stop after the current iteration; the best so far is kept."""
        self.session.request_stop()

    def finish(self) -> RunResult:
        """Write the plot and the final run.json; raise the run's error, if it had one.

        A run whose first iteration was already NaN has no usable result: :class:`NoResultError`.
        """
        optimization = self.session.optimization
        if optimization.stop_reason is None:  # the consumer stopped iterating early
            optimization.stop_reason = "interrupted"
        if self.failure is None and optimization.stop_reason == "nan" and optimization.best_step is None:
            self.failure = NoResultError(nan_advice(self.session.config, self.out_dir))
        written = describe_write_error(self.write_error) if self.write_error is not None else None
        error = str(self.failure) if self.failure else f"Writing the run failed ({written[0]})" if written else None
        try:
            record = self.writer.finish(optimization, {"setup_seconds": round(self.session.setup_seconds, 3)},
                                        status="failed" if error else "finished", error=error)
        except WRITE_ERRORS as err:
            if self.failure is not None:  # already failing (out of memory, ...): report the first cause
                raise self.failure from err
            if written is None:
                optimization.stop_reason = "write_error"
                what, advice = describe_write_error(err)
                raise SisoError(f"Writing the run's final record failed ({what}). {self._kept()} {advice}") from err
        if written is not None and self.failure is None:
            what, advice = written
            self.failure = SisoError(f"Writing the run failed ({what}), so it stopped after iteration "
                                     f"{len(optimization.history) - 1}. {self._kept()} {advice}")
            self.failure.__cause__ = self.write_error
        if self.failure is not None:
            raise self.failure
        return RunResult(
            image=tensor_to_pil(optimization.best_image) if optimization.best_image is not None else None,
            lora_dir=self.out_dir / "lora" if optimization.best_lora is not None else None,
            history=list(optimization.history),
            best_step=optimization.best_step,
            stop_reason=optimization.stop_reason,
            run_dir=self.out_dir,
            task=self.session.task,
            record=record,
        )

    def close(self) -> None:
        """Hand the backbone back to the model cache (clean) and the run directory to whoever comes next."""
        self.session.close()
        if self.lock is not None:
            self.lock.release()


def start_run(task: Task, out: str | Path, overwrite: bool = False, cache: ModelCache | None = None) -> Run:
    """Check ``out``, prepare the session, then create the run directory (a failed start leaves none)."""
    check_run_dir(out, overwrite, task.config.input_sources())
    session = Session(task, cache)
    lock = None
    try:
        out_dir, lock = prepare_run_dir(out, overwrite, task.config.input_sources())
        task.write_inputs(out_dir)
        return Run(session, out_dir, lock)  # (its writer makes steps/)
    except BaseException:
        session.close()
        if lock is not None:
            lock.release()
        raise


def run_to_end(run: Run) -> RunResult:
    """Iterate ``run`` to its end, finish it and hand its backbone back; Ctrl-C and NaN keep the best."""
    try:
        for _ in run.steps():
            pass
        return run.finish()
    finally:
        run.close()


def nan_advice(config: Any, out_dir: Path) -> str:
    hints = ["a lower --lr"]
    if config.dtype in ("fp16", "auto"):
        hints.insert(0, "--dtype bf16 or --dtype fp32 (in fp16 some models overflow: SDXL's VAE does)")
    return (f"The loss was NaN at the first iteration, so there is no usable image or LoRA (the record is "
            f"{out_dir / 'run.json'}). Try " + ", or ".join(hints) + ".")
