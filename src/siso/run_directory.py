"""The run directory: one PNG per iteration, the best image, a loss plot, the LoRA and run.json.

Every file is written atomically, and run.json is rewritten after each iteration, so a run that
dies still leaves a readable record of what it did.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import SisoError
from .files import (
    WRITE_ERRORS,
    atomic_path,
    check_name_lengths,
    make_private_dir_public,
    replace_directory,
    write_json,
    write_png,
)
from .images import tensor_to_pil
from .locks import DirectoryLock, check_not_locked, lock_directory, only_the_lock
from .loop import Optimization, StepEvent
from .model_card import IMAGE_NAME, write_model_card

_LIBRARIES = ("siso", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


RUN_RECORD = "run.json"


def is_siso_run(directory: Path) -> bool:
    """Whether ``directory`` holds a siso run: a run.json that siso wrote (it names the task)."""
    try:
        record = json.loads((directory / RUN_RECORD).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("task") in ("generate", "edit") and "config" in record


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(out: Path, what: str = "--out", probe: Path | None = None) -> None:
    """Refuse an output place siso could not write, before any model loads: below a file, on a
    read-only filesystem, or in a directory the user may not write to. The write test happens in
    ``probe`` (default: ``out``'s nearest existing directory), where siso is about to write anyway."""
    check_name_lengths(out, what)
    existing = probe or _nearest_existing(out if out.is_dir() else out.parent)
    if not existing.is_dir():
        raise SisoError(f"{what} {out} lies inside {existing}, which is a file, not a directory; "
                        "choose another place.")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".siso-write-test-"):
            pass  # a real write: os.access says yes on read-only filesystems to root
    except OSError as err:
        raise SisoError(f"{what} {out}: siso cannot write in {existing} ({err.strerror or err}); choose a directory "
                        "you can write to.") from err


def _inside(path: Path, directory: Path) -> bool:
    try:
        return path.resolve().is_relative_to(directory.resolve())
    except OSError:
        return False


def check_run_dir(out: str | Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse an output directory siso must not write; creates nothing (a failed start leaves no trace),
    and writes nothing into a directory it refuses.

    A new or empty directory is fine. A non-empty one only with ``overwrite``, only if it is a siso
    run (its run.json says so: siso never replaces the user's own files), only if none of the run's
    inputs (photos, mask, local models) lies inside it, and not while the current directory does
    (it would be deleted under the shell). Returns ``out`` as an absolute path (``.`` has no name
    to put the replacement beside).
    """
    given = out
    check_name_lengths(Path(out), "--out")
    out = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise SisoError(f"--out {given} is a file; pass a directory for the run's outputs.")
    if out.is_dir():
        check_not_locked(out)  # another process writes it now: --overwrite or not, it is theirs
    if not out.exists() or only_the_lock(out):
        check_writable(out)
        return out
    if not overwrite:
        raise SisoError(f"--out {given} is not empty; choose a new directory, or pass --overwrite to replace an "
                        "earlier siso run there.")
    if not is_siso_run(out):
        raise SisoError(f"--out {given} is not empty and is not a siso run (it has no siso {RUN_RECORD}); "
                        "--overwrite only replaces siso's own run directories. Choose a new directory.")
    for path in inputs:
        if path is not None and Path(path).exists() and _inside(Path(path), out):
            raise SisoError(f"{path} lies inside --out {given}, which --overwrite would replace; copy it elsewhere "
                            "first, or write the run to another directory.")
    if _inside(Path.cwd(), out):
        raise SisoError(f"--out {given} holds the current directory, which --overwrite would delete under your shell; "
                        f"run the command from outside it (e.g. `cd {out.parent}`), with --out {out}.")
    check_writable(out, probe=out.resolve().parent)  # the replacement is made beside the old run
    return out


def prepare_run_dir(out: str | Path, overwrite: bool,
                    inputs: Iterable[str | Path | None] = ()) -> tuple[Path, DirectoryLock]:
    """Check, then create ``out``, locked for this process (:mod:`siso.locks`) until the returned
    lock is released.

    An earlier run that ``overwrite`` replaces goes whole: a fresh directory is swapped into its place
    (:func:`~siso.files.replace_directory`) and the old one deleted only then. ``out`` is never a
    mixture of two runs (no stale step images or LoRA files of another subject), and a crash at any
    moment leaves either run complete. Where ``out`` is a symbolic link, the run it points to is
    replaced, and the link kept.
    """
    out = check_run_dir(out, overwrite, inputs)
    if out.exists() and not only_the_lock(out):
        old_lock = lock_directory(out)  # nobody may start writing the old run while it is replaced
        target = out.resolve()
        fresh = make_private_dir_public(Path(tempfile.mkdtemp(prefix=f".{target.name}.siso-new-", dir=target.parent)))
        lock = lock_directory(fresh)  # locked before it has the run's name
        replace_directory(fresh, target)
        old_lock.release()
        lock.directory = out
        return out, lock
    out.mkdir(parents=True, exist_ok=True)
    return out, lock_directory(out)


class RunWriter:
    """Consumes the loop's events and keeps the run directory up to date.

    Whenever an iteration is the best so far, its LoRA is written together with best.png, so a run
    killed at any moment (SIGKILL, the OOM killer, a power cut) leaves a LoRA that renders its
    best.png. run.json's ``lora_step`` names the iteration the saved LoRA belongs to.
    """

    def __init__(self, out: Path, record: dict[str, Any], save_lora: Callable[[Path], Any] | None = None,
                 iteration_images: bool = True) -> None:
        self.out = out
        self.save_lora = save_lora
        self.steps = out / "steps" if iteration_images else None  # each iteration's image, or none of them
        if self.steps is not None:
            self.steps.mkdir(exist_ok=True)
        self.record = {**record, "losses": [], "best_step": None, "lora_step": None, "stop_reason": None,
                       "status": "running"}
        self.started = time.time()

    def on_step(self, event: StepEvent) -> None:
        # Recorded first: should a write below fail, the final record still has this iteration's losses.
        self.record["losses"].append({**event.losses, "seconds": round(event.seconds, 4)})
        if self.steps is not None:
            write_png(tensor_to_pil(event.image), self.steps / f"{event.step:04d}.png")
        if event.is_best:
            self._save_best(event.image, event.step)
        self.record["best_step"] = event.best_step
        self.record.setdefault("timings", {}).setdefault("seconds_to_first_step", round(time.time() - self.started, 3))
        write_json(self.record, self.out / RUN_RECORD)

    def _save_best(self, image, step: int) -> None:
        """The best iteration's LoRA and image, as one pair put in place in one step.

        ``lora/`` holds the LoRA files, the image they render (``lora/best.png``) and their card; it
        is written complete beside the old one and swapped in whole (:func:`replace_directory`), and
        the run's ``best.png`` is a link to ``lora/best.png``. So whatever moment a run is killed at,
        ``best.png`` is the image ``lora/`` renders; should a write fail, the previous pair stays.
        """
        if self.save_lora is None:
            write_png(tensor_to_pil(image), self.out / "best.png")
            return
        fresh = make_private_dir_public(Path(tempfile.mkdtemp(prefix=".lora-", dir=self.out)))
        try:
            self.save_lora(fresh)
            write_png(tensor_to_pil(image), fresh / IMAGE_NAME)
            record = {**self.record, "lora": "lora", "lora_step": step}
            write_model_card(fresh, record)
            replace_directory(fresh, self.out / "lora")
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
        self.record.update(lora="lora", lora_step=step)
        _link_best(self.out)

    def finish(self, optimization: Optimization, timings: dict[str, float], status: str = "finished",
               error: str | None = None) -> dict[str, Any]:
        """Write the loss plot and the final run.json (the best LoRA is already on disk)."""
        # Both best effort: should the disk refuse them too, the final record below still says how the run
        # ended, and its lora_step which pair is on disk.
        if optimization.best_image is not None and self.record["lora_step"] != optimization.best_step:
            # The best iteration's files were not written with its step (a write failed, or the
            # consumer skipped on_step): write the pair now.
            with contextlib.suppress(*WRITE_ERRORS):
                self._save_best(optimization.best_image, optimization.best_step)
        if optimization.history:
            with contextlib.suppress(*WRITE_ERRORS):
                plot_losses(optimization.history, optimization.best_step, self.out / "losses.png")
        self.record.update(best_step=optimization.best_step, stop_reason=optimization.stop_reason, status=status)
        if error is not None:
            self.record["error"] = error
        steps = len(optimization.history)
        self.record["timings"] = {
            **self.record.get("timings", {}), **timings,
            "optimize_seconds": round(time.time() - self.started, 3),
            "seconds_per_step": round((time.time() - self.started) / steps, 4) if steps else None,
        }
        write_json(self.record, self.out / RUN_RECORD)
        return self.record


def _link_best(out: Path) -> None:
    """``best.png``: a link to ``lora/best.png`` (made once), else, where links cannot be made, a copy."""
    best = out / "best.png"
    if best.is_symlink():
        return
    with atomic_path(best) as tmp:
        tmp.unlink()
        try:
            os.symlink(Path("lora") / IMAGE_NAME, tmp)
        except OSError:  # a filesystem without symbolic links: a copy, renamed after the LoRA (two steps)
            shutil.copyfile(out / "lora" / IMAGE_NAME, tmp)


def plot_losses(history: list[dict[str, float]], best_step: int | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display is needed or wanted
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    for key in [k for k in history[0] if k not in ("step", "seconds")]:
        axis.plot(steps, [h.get(key, float("nan")) for h in history], label=key, linewidth=2 if key == "total" else 1)
    if best_step is not None:
        axis.axvline(best_step, color="grey", linestyle="--", linewidth=1, label=f"best ({best_step})")
    axis.set_xlabel("iteration")
    axis.set_ylabel("loss")
    axis.legend(loc="upper right", fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
