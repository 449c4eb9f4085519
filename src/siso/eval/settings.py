"""What a benchmark run measures and with which models, as knobs: recorded in DIR/bench.json, so a
rerun into the same DIR can check it continues the same experiment.

``run`` holds the task's own knobs, typed (:class:`~siso.config.GenerateSettings` or
:class:`~siso.config.EditSettings`: every knob but the per-item photos and prompt), checked when the
settings are made; each item's config is those settings plus the item's inputs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import MAX_RENDER_STEPS, EditConfig, EditSettings, GenerateConfig, GenerateSettings, RunSettings
from ..errors import SisoError
from ..ir_cache import DINO_ONLY_NOTICE, resolve_ir
from ..knobs import knob, option
from ..model_ids import CLIP_MODEL, CMMD_MODEL, CROP_MODEL

TASKS = ("generate", "edit")
BASELINES = ("none", "plain")
FID_FEATURES = ("inception", "dino", "clip")
EXECUTORS = ("local", "ray")
#: the settings class of each task's run knobs
RUN_SETTINGS: dict[str, type[RunSettings]] = {"generate": GenerateSettings, "edit": EditSettings}


def _none_or(value: str) -> str | None:
    return None if value.strip().lower() == "none" else value


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    task: str = knob("generate", choices=TASKS, help="What each item runs: generate (its prompts) or edit (its scene).")
    #: the task's run knobs; None: the task's defaults
    run: RunSettings | None = field(default=None)
    render_steps: int | None = knob(None, preset="render_steps",
                                    help="Denoising steps when rendering the prompts (generation's second stage).")
    baseline: str = knob("none", choices=BASELINES, help=(
        "plain: also render every prompt with the untouched model (same seeds): the FID/KID/CMMD reference set."))
    clip_model: str = knob(CLIP_MODEL, help="CLIP for CLIP-I and CLIP-T.")
    cmmd_model: str = knob(CMMD_MODEL, help="CLIP for CMMD.")
    crop_model: str | None = knob(CROP_MODEL, parse=_none_or, help=(
        "Grounding DINO that crops both images to the subject for DINO, IR and CLIP-I; none: whole images."))
    fid_features: str = knob("inception", choices=FID_FEATURES, help=(
        "FID/KID features: inception (as in the paper; needs torch-fidelity), dino or clip."))
    inception_weights: str | None = knob(None, help=(
        "Local copy of the FID Inception weights (pt_inception-2015-12-05-6726825d.pth)."))
    eval_batch_size: int = knob(8, help="Images scored per batch.")

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SisoError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        wanted = RUN_SETTINGS[self.task]
        run = self.run if self.run is not None else wanted()
        if type(run) is not wanted:
            raise SisoError(f"--task {self.task} runs {wanted.__name__}; got {type(run).__name__}.")
        # "auto" becomes the IR model found now, so bench.json names what every item (resumed ones too) uses.
        object.__setattr__(self, "run", resolve_ir(run))
        if self.baseline not in BASELINES:
            raise SisoError(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}.")
        if self.task == "edit" and self.baseline != "none":
            raise SisoError("--baseline plain is for --task generate; an edit is measured against its input scene.")
        if self.fid_features not in FID_FEATURES:
            raise SisoError(f"--fid-features must be one of {', '.join(FID_FEATURES)}, got {self.fid_features!r}.")
        if self.render_steps is not None and (not isinstance(self.render_steps, int)
                                              or not 1 <= self.render_steps <= MAX_RENDER_STEPS):
            raise SisoError(f"--render-steps must be a whole number from 1 to {MAX_RENDER_STEPS}, "
                            f"got {self.render_steps!r}.")
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise SisoError(f"--eval-batch-size must be a whole number >= 1, got {self.eval_batch_size!r}.")

    @property
    def notice(self) -> str | None:
        """What to tell the user before the run: the loss is not the paper's without an IR model."""
        return DINO_ONLY_NOTICE if self.run.ir_model is None and self.run.similarity is None else None

    def generate_config(self, subject: str | Path, prompt: str) -> GenerateConfig:
        return GenerateConfig.from_settings(self.run, subjects=(subject,), prompt=prompt)

    def edit_config(self, subject: str | Path, scene: str | Path, subject_class: str | None = None,
                    scene_class: str | None = None, mask: str | Path | None = None) -> EditConfig:
        return EditConfig.from_settings(self.run, subject=Path(subject), input=Path(scene),
                                        subject_class=subject_class, input_class=scene_class, mask=mask)

    def model_sources(self) -> tuple[tuple[str, str], ...]:
        """(source, flag) of every model the benchmark loads besides the IR model (checked when it is
        resolved): what is checked before any worker starts."""
        run, flag = self.run, functools.partial(option, BenchSettings)
        sources = [(run.model, run.flag("model")), (run.dino_model, run.flag("dino_model")),
                   (self.clip_model, flag("clip_model"))]
        if self.has_reference_set:
            sources.append((self.cmmd_model, flag("cmmd_model")))
        if self.crop_model is not None:
            sources.append((self.crop_model, flag("crop_model")))
        return tuple(sources)

    @property
    def device(self) -> str:
        return self.run.device

    @property
    def dtype(self) -> str:
        return self.run.dtype

    @property
    def has_reference_set(self) -> bool:
        """Whether FID/KID/CMMD can be measured: against the plain model's images, or the edit inputs."""
        return self.baseline == "plain" or self.task == "edit"

    def to_record(self) -> dict[str, Any]:
        record = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "run"}
        return {**record, "run": self.run.to_record()}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BenchSettings:
        values = dict(record)
        run = values.pop("run")
        settings_class = RUN_SETTINGS[values.get("task", "generate")]
        tuples = {"similarity", "lora_format", "adam_betas"}
        run = settings_class(**{k: tuple(v) if k in tuples and v is not None else v for k, v in run.items()})
        return cls(run=run, **values)


@dataclass(frozen=True, kw_only=True)
class ExecutorSettings:
    """Where the benchmark's items run: not part of the experiment (a rerun may use another executor)."""

    executor: str = knob("local", choices=EXECUTORS, help="local (this process) or ray (one worker per GPU).")
    ray_address: str | None = knob(None, help="Existing Ray cluster to join (e.g. auto or ray://head:10001); "
                                              "unset: start Ray here.")
    workers: int | None = knob(None, help=(
        "Ray workers (unset: one per GPU in the cluster; 1 without GPUs). Workers the cluster has no room for yet "
        "start when it grows."))
    worker_timeout: float = knob(600.0, help=(
        "Ray: seconds to wait while no worker is running (every node lost, or none with room) before stopping; "
        "rerun the same command to resume."))

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise SisoError(f"--executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}.")
        if self.executor == "local" and (self.ray_address or self.workers):
            raise SisoError("--ray-address and --workers need --executor ray; the local executor runs one item "
                            "at a time in this process.")
        if self.workers is not None and self.workers < 1:
            raise SisoError(f"--workers must be >= 1, got {self.workers}.")
        if not isinstance(self.worker_timeout, int | float) or self.worker_timeout <= 0:
            raise SisoError(f"--worker-timeout must be a number of seconds > 0, got {self.worker_timeout!r}.")
