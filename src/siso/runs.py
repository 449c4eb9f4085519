"""The run directory: one PNG per iteration, the best image, a loss plot, the LoRA and run.json.

Every file is written atomically, and run.json is rewritten after each iteration, so a run that
dies still leaves a readable record of what it did.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import SisoError
from .files import atomic_path, write_json, write_png
from .images import tensor_to_pil
from .optimize import Optimization, StepEvent

_LIBRARIES = ("siso", "torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def check_run_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse a non-empty ``out`` unless ``overwrite``; creates nothing (so a failed start leaves no trace)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SisoError(f"--out {out} is a file; pass a directory for the run's outputs.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SisoError(
            f"--out {out} is not empty; choose a new directory or pass --overwrite "
            "(siso then replaces its own files there and leaves the others alone)."
        )
    return out


def prepare_run_dir(out: str | Path, overwrite: bool) -> Path:
    """Check, then create ``out`` and ``out/steps``. Never deletes anything."""
    out = check_run_dir(out, overwrite)
    (out / "steps").mkdir(parents=True, exist_ok=True)
    return out


class RunWriter:
    """Consumes the loop's events and keeps the run directory up to date."""

    def __init__(self, out: Path, record: dict[str, Any]) -> None:
        self.out = out
        self.record = {**record, "losses": [], "best_step": None, "stop_reason": None, "status": "running"}
        self.started = time.time()

    def on_step(self, event: StepEvent) -> None:
        write_png(tensor_to_pil(event.image), self.out / "steps" / f"{event.step:04d}.png")
        if event.is_best:
            write_png(tensor_to_pil(event.image), self.out / "best.png")
        self.record["losses"].append({**event.losses, "seconds": round(event.seconds, 4)})
        self.record["best_step"] = event.best_step
        self.record.setdefault("timings", {}).setdefault("seconds_to_first_step", round(time.time() - self.started, 3))
        write_json(self.record, self.out / "run.json")

    def finish(self, optimization: Optimization, save_lora: Callable[[Path], Any] | None,
               timings: dict[str, float]) -> dict[str, Any]:
        """Write the best LoRA, the loss plot and the final run.json."""
        if optimization.best_lora is not None and save_lora is not None:
            save_lora(self.out / "lora")
            self.record["lora"] = "lora"
        if optimization.history:
            plot_losses(optimization.history, optimization.best_step, self.out / "losses.png")
        self.record.update(
            best_step=optimization.best_step,
            stop_reason=optimization.stop_reason,
            status="finished",
        )
        steps = len(optimization.history)
        self.record["timings"] = {
            **self.record.get("timings", {}), **timings,
            "optimize_seconds": round(time.time() - self.started, 3),
            "seconds_per_step": round((time.time() - self.started) / steps, 4) if steps else None,
        }
        write_json(self.record, self.out / "run.json")
        return self.record


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
