"""What a benchmark run measures and with which models: recorded in DIR/bench.json, so a rerun
into the same DIR can check it continues the same experiment."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import EditConfig, GenerateConfig
from ..errors import SisoError
from ..ir_cache import DINO_ONLY_NOTICE, IR_AUTO, resolve_ir_model
from .clip import DEFAULT_CLIP_MODEL, DEFAULT_CMMD_MODEL
from .cropping import DEFAULT_DETECTOR_MODEL

TASKS = ("generate", "edit")
BASELINES = ("none", "plain")
FID_FEATURES = ("inception", "dino", "clip")
# Config fields the benchmark sets itself, per item.
_PER_ITEM_FIELDS = {"generate": ("subjects", "prompt"),
                    "edit": ("subject", "input", "subject_class", "input_class", "mask")}


@dataclass(frozen=True)
class BenchSettings:
    task: str = "generate"
    #: the run's knobs: GenerateConfig fields (EditConfig fields for "edit") but the per-item ones.
    options: dict[str, Any] = field(default_factory=dict)
    render_steps: int | None = None  # generation's second stage; None: the backbone's preset (4)
    baseline: str = "none"  # "plain": also render every prompt with the untouched model (generation)
    clip_model: str = DEFAULT_CLIP_MODEL
    cmmd_model: str = DEFAULT_CMMD_MODEL
    detector_model: str | None = DEFAULT_DETECTOR_MODEL  # None: compare whole images, no cropping
    fid_features: str = "inception"
    inception_weights: str | None = None
    eval_batch_size: int = 8

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SisoError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.baseline not in BASELINES:
            raise SisoError(f"--baseline must be one of {', '.join(BASELINES)}, got {self.baseline!r}.")
        if self.task == "edit" and self.baseline != "none":
            raise SisoError("--baseline plain is for --task generate; an edit is measured against its input scene.")
        if self.fid_features not in FID_FEATURES:
            raise SisoError(f"--fid-features must be one of {', '.join(FID_FEATURES)}, got {self.fid_features!r}.")
        if self.render_steps is not None and (not isinstance(self.render_steps, int) or self.render_steps < 1):
            raise SisoError(f"--render-steps must be a whole number >= 1, got {self.render_steps!r}.")
        if self.eval_batch_size < 1:
            raise SisoError(f"The evaluation batch size must be >= 1, got {self.eval_batch_size}.")
        bad = [name for name in _PER_ITEM_FIELDS[self.task] if name in self.options]
        if bad:
            raise SisoError(f"The benchmark sets {', '.join(bad)} per item; leave them out of the options.")
        # "auto" becomes the IR model found now, so bench.json names what every item (resumed ones too) uses.
        options = {**self.options, "ir_model": resolve_ir_model(self.options.get("ir_model", IR_AUTO))}
        object.__setattr__(self, "options", options)
        self.run_config()  # the config's own checks, before any model loads

    @property
    def notice(self) -> str | None:
        """What to tell the user before the run: the loss is not the paper's without an IR model."""
        return DINO_ONLY_NOTICE if self.options["ir_model"] is None and "similarity" not in self.options else None

    def generate_config(self, subject: str | Path, prompt: str) -> GenerateConfig:
        return GenerateConfig(subjects=(subject,), prompt=prompt, **self.options)

    def edit_config(self, subject: str | Path, scene: str | Path, subject_class: str | None = None,
                    scene_class: str | None = None, mask: str | Path | None = None) -> EditConfig:
        return EditConfig(subject=Path(subject), input=Path(scene), subject_class=subject_class,
                          input_class=scene_class, mask=mask, **self.options)

    def run_config(self) -> GenerateConfig | EditConfig:
        """The task's config with placeholder per-item values: every shared knob, defaults filled in."""
        if self.task == "edit":
            return self.edit_config("subject.jpg", "scene.jpg", "thing", "thing")
        return self.generate_config("subject.jpg", "a photo of a thing")

    def resolved_options(self) -> dict[str, Any]:
        record = self.run_config().to_record()
        return {k: v for k, v in record.items() if k not in _PER_ITEM_FIELDS[self.task] and k != "subjects"}

    @property
    def device(self) -> str:
        return self.options.get("device", "auto")

    @property
    def dtype(self) -> str:
        return self.options.get("dtype", "auto")

    @property
    def has_reference_set(self) -> bool:
        """Whether FID/KID/CMMD can be measured: against the plain model's images, or the edit inputs."""
        return self.baseline == "plain" or self.task == "edit"

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(self.options.items())}
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BenchSettings:
        return cls(**record)
