"""Every knob of a SISO run, as frozen dataclasses; backbone presets carry the method's numbers.

The CLI maps 1:1 onto these fields, and ``run.json`` records them, so a run can be repeated from
its record alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import SisoError

DEFAULT_GENERATION_MODEL = "stabilityai/sdxl-turbo"
DEFAULT_DINO_MODEL = "facebook/dinov2-large"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
SIMILARITY_NAMES = ("dino", "ir")
DEVICES = ("auto", "cpu", "cuda", "mps")  # the --device choices
DTYPES = ("auto", "bf16", "fp16", "fp32")
LORA_FORMATS = ("diffusers", "kohya")


@dataclass(frozen=True)
class BackbonePreset:
    """The method's per-backbone numbers (see method-facts): used where the user gave none."""

    learning_rate: float = 2e-4
    denoise_steps: int = 1
    grad_steps: int = 1
    guidance_scale: float = 0.0
    early_stop_patience: int = 7
    render_steps: int = 4


@dataclass(frozen=True)
class GenerateConfig:
    """A generation run: optimise a LoRA so the model's image of ``prompt`` shows the subject."""

    subjects: tuple[Path, ...]
    prompt: str
    model: str = DEFAULT_GENERATION_MODEL
    seed: int = 42
    resolution: int = 512
    max_steps: int = 50
    learning_rate: float | None = None  # None: the backbone preset
    early_stop_pct: float = 3.0
    early_stop_patience: int | None = None  # None: the backbone preset
    denoise_steps: int | None = None
    grad_steps: int | None = None
    lora_rank: int = 4
    train_text_encoder: bool = False
    low_memory: bool = False  # gradient checkpointing in the denoiser and the VAE decoder
    dino_model: str = DEFAULT_DINO_MODEL
    ir_model: str | None = None
    similarity: tuple[str, ...] | None = None  # None: dino, plus ir when ir_model is set
    dino_weight: float = 1.0
    ir_weight: float = 1.0
    device: str = "auto"
    dtype: str = "auto"
    lora_format: tuple[str, ...] | None = None  # None: the backbone's default_lora_formats
    # Adam, grad clipping: the reference's values; not on the CLI, but recorded.
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        if not self.subjects:
            raise SisoError("No subject photo given: pass at least one with --subject PATH.")
        object.__setattr__(self, "subjects", tuple(Path(p) for p in self.subjects))
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise SisoError('The prompt is empty: pass a description such as --prompt "a photo of a dog".')
        _check_positive("max-steps", self.max_steps)
        _check_positive("resolution", self.resolution)
        _check_positive("lora-rank", self.lora_rank)
        for name, value in (("denoise-steps", self.denoise_steps), ("grad-steps", self.grad_steps),
                            ("early-stop-patience", self.early_stop_patience)):
            if value is not None:
                _check_positive(name, value)
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise SisoError(f"--lr must be a positive number, got {self.learning_rate}.")
        if self.early_stop_pct < 0:
            raise SisoError(f"--early-stop-pct must be >= 0, got {self.early_stop_pct}.")
        if self.device not in DEVICES:
            raise SisoError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}.")
        if self.dtype not in DTYPES:
            raise SisoError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        object.__setattr__(self, "lora_format", _check_lora_formats(self.lora_format))
        if self.similarity is not None:
            names = tuple(self.similarity)
            unknown = [n for n in names if n not in SIMILARITY_NAMES]
            if unknown or not names:
                raise SisoError(
                    f"--similarity takes a comma-separated list of {', '.join(SIMILARITY_NAMES)}; "
                    f"got {','.join(names) or 'nothing'}."
                )
            if "ir" in names and not self.ir_model:
                raise SisoError(
                    "--similarity includes ir but no IR model is configured: pass --ir-model DIR "
                    "(a directory made by `siso convert-ir`)."
                )
            object.__setattr__(self, "similarity", names)

    @property
    def similarity_names(self) -> tuple[str, ...]:
        if self.similarity is not None:
            return self.similarity
        return ("dino", "ir") if self.ir_model else ("dino",)

    def resolved(self, preset: BackbonePreset, lora_formats: tuple[str, ...] = ("diffusers",)) -> GenerateConfig:
        """Fill every ``None`` knob from the backbone preset and its default ``lora_formats``, so the
        record shows what ran."""
        values = {
            "lora_format": self.lora_format if self.lora_format is not None else lora_formats,
            "learning_rate": self.learning_rate if self.learning_rate is not None else preset.learning_rate,
            "early_stop_patience": (
                self.early_stop_patience if self.early_stop_patience is not None else preset.early_stop_patience
            ),
            "denoise_steps": self.denoise_steps if self.denoise_steps is not None else preset.denoise_steps,
            "grad_steps": self.grad_steps if self.grad_steps is not None else preset.grad_steps,
            "similarity": self.similarity_names,
        }
        resolved = _replace(self, **values)
        if resolved.grad_steps > resolved.denoise_steps:
            raise SisoError(
                f"--grad-steps ({resolved.grad_steps}) cannot exceed --denoise-steps ({resolved.denoise_steps}): "
                "gradients flow through the last k of the N denoising steps."
            )
        return resolved

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        record["subjects"] = [str(p) for p in self.subjects]
        return record


def _replace(config: GenerateConfig, **changes: Any) -> GenerateConfig:
    values = {f.name: getattr(config, f.name) for f in fields(config)}
    values.update(changes)
    return type(config)(**values)


def _check_lora_formats(formats: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if formats is None:
        return None
    formats = tuple(formats)
    for fmt in formats:
        if fmt not in LORA_FORMATS:
            raise SisoError(f"--lora-format must be one of {', '.join(LORA_FORMATS)}, got {fmt!r}.")
    return formats


def _check_positive(flag: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise SisoError(f"--{flag} must be a whole number >= 1, got {value!r}.")


@dataclass(frozen=True)
class RenderConfig:
    """The second stage: the learned LoRA with any prompt and more denoising steps."""

    model: str
    prompt: str
    lora: Path | None = None
    steps: int | None = None  # None: the backbone preset's render_steps
    seed: int = 42
    resolution: int = 512
    device: str = "auto"
    dtype: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise SisoError('The prompt is empty: pass a description such as --prompt "a dog on the beach".')
        _check_positive("resolution", self.resolution)
        if self.steps is not None:
            _check_positive("steps", self.steps)
        if self.device not in DEVICES:
            raise SisoError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}.")
        if self.dtype not in DTYPES:
            raise SisoError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")


DEFAULT_EDITING_MODEL = "stabilityai/sd-turbo"
DEFAULT_LABEL_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DETECTOR_MODEL = "IDEA-Research/grounding-dino-base"
DEFAULT_SEGMENTER_MODEL = "facebook/sam-vit-base"


@dataclass(frozen=True)
class EditConfig:
    """An editing run: swap the object of class ``input_class`` in the scene ``input`` for the subject.

    Classes left ``None`` are found by the CLIP labeller; without ``mask`` Grounding DINO + SAM find
    the object. Defaults are the method's editing numbers (method-facts, Editing).
    """

    subject: Path
    input: Path
    subject_class: str | None = None
    input_class: str | None = None
    mask: Path | None = None
    bg_weight: float = 10.0
    strength: float = 0.75
    inversion_steps: int = 4
    model: str = DEFAULT_EDITING_MODEL
    seed: int = 42
    resolution: int = 512
    max_steps: int = 50
    learning_rate: float = 3e-4
    early_stop_pct: float = 5.0
    early_stop_patience: int = 5
    lora_rank: int = 4
    dino_model: str = DEFAULT_DINO_MODEL
    ir_model: str | None = None
    similarity: tuple[str, ...] | None = None  # None: dino, plus ir when ir_model is set
    dino_weight: float = 1.0
    ir_weight: float = 1.0
    label_model: str = DEFAULT_LABEL_MODEL
    detector_model: str = DEFAULT_DETECTOR_MODEL
    segmenter_model: str = DEFAULT_SEGMENTER_MODEL
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    device: str = "auto"
    dtype: str = "auto"
    lora_format: tuple[str, ...] | None = None  # None: the backbone's default_lora_formats
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "subject", Path(self.subject))
        object.__setattr__(self, "input", Path(self.input))
        if self.mask is not None:
            object.__setattr__(self, "mask", Path(self.mask))
        for flag, name in (("subject-class", "subject_class"), ("input-class", "input_class")):
            value = getattr(self, name)
            if value is not None:
                if not isinstance(value, str) or not value.strip():
                    raise SisoError(f'--{flag} is empty: name the object, e.g. --{flag} "dog", or leave it out '
                                    "to have it recognised automatically.")
                object.__setattr__(self, name, " ".join(value.split()))
        for flag, value in (("max-steps", self.max_steps), ("resolution", self.resolution),
                            ("lora-rank", self.lora_rank), ("inversion-steps", self.inversion_steps),
                            ("early-stop-patience", self.early_stop_patience)):
            _check_positive(flag, value)
        if not self.learning_rate > 0:
            raise SisoError(f"--lr must be a positive number, got {self.learning_rate}.")
        if self.early_stop_pct < 0:
            raise SisoError(f"--early-stop-pct must be >= 0, got {self.early_stop_pct}.")
        if not self.bg_weight >= 0:
            raise SisoError(f"--bg-weight must be >= 0 (0 turns the background loss off), got {self.bg_weight}.")
        if not 0 < self.strength <= 1:
            raise SisoError(f"--strength must be in (0, 1], got {self.strength}.")
        if int(self.inversion_steps * self.strength + 1e-6) < 1:
            raise SisoError(
                f"--strength {self.strength} of --inversion-steps {self.inversion_steps} leaves no denoising step "
                f"to edit; raise either (the method uses 0.75 of 4)."
            )
        for flag, value in (("box-threshold", self.box_threshold), ("text-threshold", self.text_threshold)):
            if not 0 <= value <= 1:
                raise SisoError(f"--{flag} must be in [0, 1], got {value}.")
        if self.device not in DEVICES:
            raise SisoError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}.")
        if self.dtype not in DTYPES:
            raise SisoError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        object.__setattr__(self, "lora_format", _check_lora_formats(self.lora_format))
        if self.similarity is not None:
            names = tuple(self.similarity)
            if not names or any(n not in SIMILARITY_NAMES for n in names):
                raise SisoError(f"--similarity takes a comma-separated list of {', '.join(SIMILARITY_NAMES)}; "
                                f"got {','.join(names) or 'nothing'}.")
            if "ir" in names and not self.ir_model:
                raise SisoError("--similarity includes ir but no IR model is configured: pass --ir-model DIR "
                                "(a directory made by `siso convert-ir`).")
            object.__setattr__(self, "similarity", names)

    @property
    def similarity_names(self) -> tuple[str, ...]:
        if self.similarity is not None:
            return self.similarity
        return ("dino", "ir") if self.ir_model else ("dino",)

    def resolved(self, lora_formats: tuple[str, ...] = ("diffusers",)) -> EditConfig:
        """Fill the ``None`` knobs (``lora_formats``: the backbone's default), so the record shows what ran."""
        return _replace(self, similarity=self.similarity_names,
                        lora_format=self.lora_format if self.lora_format is not None else lora_formats)

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        for name in ("subject", "input", "mask"):
            record[name] = str(record[name]) if record[name] is not None else None
        return record
