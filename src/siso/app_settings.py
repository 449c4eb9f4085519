"""What ``siso app`` is started with: the page's defaults and the server's limits, as knobs.

Light (no gradio, no torch), so ``siso app --help`` is derived from it as instantly as every other
command's help. The run knobs among them are the run specification's own (``like(...)``): the page's
defaults are generate's and edit's defaults unless the operator changes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .config import EditSettings, GenerateSettings, RunSettings
from .errors import SisoError
from .knobs import knob, like


def _allowlist(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


@dataclass(frozen=True, kw_only=True)
class AppSettings:
    """The page's defaults, where runs go, and what one client may ask of the shared GPU."""

    model: str = like(GenerateSettings, "model", help="The backbone the Generate and Render tabs start with.")
    edit_model: str = like(EditSettings, "model", help="The backbone the Edit tab starts with.")
    dino_model: str = like(RunSettings, "dino_model")
    ir_model: str | None = like(RunSettings, "ir_model")
    resolution: int = like(RunSettings, "resolution")
    max_steps: int = like(RunSettings, "max_steps", help="Most optimisation iterations, the page's default.")
    device: str = like(RunSettings, "device")
    #: the models stay loaded, so one compile serves every run: auto (on for CUDA GPUs) by default
    compile: bool | None = like(RunSettings, "compile", default=None)
    runs_dir: Path = knob(Path("siso-runs"), help="Where every run's directory is written.")
    max_upload_mb: int = knob(25, help="Largest accepted upload, in MB.")
    max_job_steps: int = knob(200, help="Most iterations one job may run (Continue included; a Render's denoising "
                                        "steps too), so no client holds the GPU queue.")
    max_job_minutes: float = knob(30.0, help="Longest one Start, Continue or Render may run, in minutes.")
    model_allowlist: tuple[str, ...] | None = knob(None, parse=_allowlist, metavar="A,B", help=(
        "Models (Hub ids or directories) the page may load (unset: any on 127.0.0.1; only --model and "
        "--edit-model when serving beyond it)."))

    def __post_init__(self) -> None:
        if self.max_upload_mb < 1:
            raise SisoError(f"--max-upload-mb must be at least 1, got {self.max_upload_mb}.")
        if self.max_job_steps < 1 or not (self.max_job_minutes > 0 and math.isfinite(self.max_job_minutes)):
            raise SisoError("--max-job-steps and --max-job-minutes must be positive.")
        if not 1 <= self.max_steps <= self.max_job_steps:
            raise SisoError(f"--max-steps must be from 1 to --max-job-steps ({self.max_job_steps}), "
                            f"got {self.max_steps}.")
        object.__setattr__(self, "runs_dir", Path(self.runs_dir))
        if self.runs_dir.exists() and not self.runs_dir.is_dir():
            raise SisoError(f"--runs-dir {self.runs_dir} is a file; pass a directory for the runs.")
        if self.model_allowlist is not None:
            object.__setattr__(self, "model_allowlist", tuple(self.model_allowlist))

    def check_model(self, model: str) -> str:
        """``model`` if the page may load it; the allowlist keeps clients off arbitrary server paths."""
        if self.model_allowlist is not None and model not in self.model_allowlist:
            raise SisoError(f"This server only runs {', '.join(self.model_allowlist)}; {model!r} is not allowed "
                            "(its operator can add it with --model-allowlist).")
        return model

    def check_steps(self, steps: int) -> int:
        if steps > self.max_job_steps:
            raise SisoError(f"This server allows at most {self.max_job_steps} iterations per job; asked for {steps}.")
        return steps
