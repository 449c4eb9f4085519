"""Every knob of a SISO run, as frozen dataclasses; backbone presets carry the method's numbers.

The CLI maps 1:1 onto these fields, and ``run.json`` records them, so a run can be repeated from
its record alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import SisoError
from .ir_cache import GET_IR, IR_AUTO, resolve_ir_model

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
    """The method's per-backbone numbers, as the authors' reference commands run them (every value
    and its source: docs/fidelity.md). Used wherever the user gave none."""

    learning_rate: float = 2e-4
    weight_decay: float = 1e-2  # AdamW's, on the denoiser's LoRA
    denoise_steps: int = 1
    grad_steps: int = 1
    guidance_scale: float = 0.0
    early_stop_patience: int = 7
    render_steps: int = 4
    train_text_encoder: bool = False
    #: the text encoders' LoRA in its own AdamW group; None: the denoiser's values
    text_encoder_learning_rate: float | None = None
    text_encoder_weight_decay: float | None = None
    #: prompt tokens while optimising (T5 / Gemma); None: the pipeline's default. Rendering afterwards
    #: always uses the pipeline's default, as the reference does.
    prompt_max_tokens: int | None = None

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What every optimising run shares, generation and editing: each knob declared, checked and
    recorded once. Subclasses add their task's fields and may change a default."""

    model: str
    seed: int = 42
    resolution: int = 512
    max_steps: int = 50
    learning_rate: float | None = None  # None: the backbone preset
    early_stop_pct: float = 3.0
    early_stop_patience: int | None = None  # None: the backbone preset
    #: how many of the last denoising steps carry gradients; None: the backbone preset
    grad_steps: int | None = None
    lora_rank: int = 4
    #: gradient checkpointing (exact): True the VAE decoder and the denoiser, False none, None (auto)
    #: chosen from the GPU's free memory (see Backbone.choose_memory_plan)
    low_memory: bool | None = None
    #: torch.compile the denoiser, VAE decoder and similarity towers (siso.speed); None: on for CUDA GPUs
    compile: bool | None = False
    dino_model: str = DEFAULT_DINO_MODEL
    ir_model: str | None = IR_AUTO  # auto: siso's cached conversion if there is one; None: no IR
    similarity: tuple[str, ...] | None = None  # None: dino, plus ir when an IR model is available
    dino_weight: float = 1.0
    ir_weight: float = 1.0
    device: str = "auto"
    dtype: str = "auto"
    lora_format: tuple[str, ...] | None = None  # None: the backbone's default_lora_formats
    # Adam, grad clipping: the reference's values; not on the CLI, but recorded.
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float | None = None  # None: the backbone preset (1e-2; FLUX and Sana 1e-4)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _check_positive("max-steps", self.max_steps)
        _check_positive("lora-rank", self.lora_rank)
        for name, value in (("grad-steps", self.grad_steps), ("early-stop-patience", self.early_stop_patience)):
            if value is not None:
                _check_positive(name, value)
        _check_size_and_seed(self)
        _check_number("lr", self.learning_rate, exclusive=True)
        _check_number("early-stop-pct", self.early_stop_pct)
        for flag, value in (("dino-weight", self.dino_weight), ("ir-weight", self.ir_weight),
                            ("adam-weight-decay", self.adam_weight_decay), ("max-grad-norm", self.max_grad_norm),
                            ("adam-eps", self.adam_eps)):
            _check_number(flag, value)
        _check_device_and_dtype(self)
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
        """The similarity models the run uses: ``similarity``, else DINO plus IR when one is found."""
        if self.similarity is not None:
            return self.similarity
        return ("dino", "ir") if resolve_ir_model(self.ir_model) else ("dino",)

    def input_sources(self) -> tuple[str | Path | None, ...]:
        """Everything the run reads by name: photos, masks, models (Hub ids or paths)."""
        return (self.model, self.dino_model, self.ir_model)

    def input_paths(self) -> tuple[Path, ...]:
        """Every local file or directory the run reads (an --overwrite must not replace any)."""
        return tuple(Path(s) for s in self.input_sources() if s and Path(s).exists())

    def with_ir_resolved(self) -> Any:
        """``ir_model`` ``auto`` replaced by the cached IR conversion, or None (then DINO only)."""
        ir_model = resolve_ir_model(self.ir_model)
        if ir_model is None and self.similarity is not None and "ir" in self.similarity:
            raise SisoError(f"--similarity includes ir, but --ir-model {self.ir_model} found no IR model. {GET_IR}")
        return _replace(self, ir_model=ir_model)

    def to_record(self) -> dict[str, Any]:
        """The config as run.json records it (paths as strings)."""
        return {name: _recordable(value) for name, value in asdict(self).items()}


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(RunConfig):
    """A generation run: optimise a LoRA so the model's image of ``prompt`` shows the subject."""

    subjects: tuple[Path, ...]
    prompt: str
    model: str = DEFAULT_GENERATION_MODEL
    denoise_steps: int | None = None  # None: the backbone preset
    train_text_encoder: bool | None = None  # None: the backbone preset (on for SDXL-Turbo and FLUX)
    text_encoder_learning_rate: float | None = None  # None: the preset's, else the denoiser's
    text_encoder_weight_decay: float | None = None  # None: the preset's, else adam_weight_decay

    def __post_init__(self) -> None:
        if not self.subjects:
            raise SisoError("No subject photo given: pass at least one with --subject PATH.")
        object.__setattr__(self, "subjects", tuple(Path(p) for p in self.subjects))
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise SisoError('The prompt is empty: pass a description such as --prompt "a photo of a dog".')
        super().__post_init__()
        if self.denoise_steps is not None:
            _check_positive("denoise-steps", self.denoise_steps)
        _check_number("text-encoder-lr", self.text_encoder_learning_rate, exclusive=True)
        _check_number("text-encoder-weight-decay", self.text_encoder_weight_decay)

    def input_sources(self) -> tuple[str | Path | None, ...]:
        return (*self.subjects, *super().input_sources())

    def resolved(self, preset: BackbonePreset, lora_formats: tuple[str, ...] = ("diffusers",)) -> GenerateConfig:
        """Fill every ``None`` knob from the backbone preset and its default ``lora_formats``, so the
        record shows what ran."""
        learning_rate = _first(self.learning_rate, preset.learning_rate)
        weight_decay = _first(self.adam_weight_decay, preset.weight_decay)
        values = {
            "lora_format": _first(self.lora_format, lora_formats),
            "learning_rate": learning_rate,
            "adam_weight_decay": weight_decay,
            "early_stop_patience": _first(self.early_stop_patience, preset.early_stop_patience),
            "denoise_steps": _first(self.denoise_steps, preset.denoise_steps),
            "grad_steps": _first(self.grad_steps, preset.grad_steps),
            "train_text_encoder": _first(self.train_text_encoder, preset.train_text_encoder),
            "text_encoder_learning_rate": _first(self.text_encoder_learning_rate, preset.text_encoder_learning_rate,
                                                 learning_rate),
            "text_encoder_weight_decay": _first(self.text_encoder_weight_decay, preset.text_encoder_weight_decay,
                                                weight_decay),
            "similarity": self.similarity_names,
        }
        resolved = _replace(self.with_ir_resolved(), **values)
        if resolved.grad_steps > resolved.denoise_steps:
            raise SisoError(
                f"--grad-steps ({resolved.grad_steps}) cannot exceed --denoise-steps ({resolved.denoise_steps}): "
                "gradients flow through the last k of the N denoising steps."
            )
        return resolved


def _first(*values: Any) -> Any:
    """The first value that is not ``None``: the user's, else the preset's, else the fallback."""
    return next(value for value in values if value is not None)


def _replace(config: Any, **changes: Any) -> Any:
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


MAX_RESOLUTION = 2048  # beyond the sizes these models are trained at, and beyond most GPUs' memory
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range


def _check_number(flag: str, value: float | None, minimum: float = 0.0, exclusive: bool = False) -> None:
    """A finite number above ``minimum`` (None passes: the preset decides); NaN and inf never do."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > minimum if exclusive else
                                                                       value >= minimum)
    if not ok:
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        raise SisoError(f"--{flag} must be a finite number {bound}, got {value!r}.")


def _check_size_and_seed(config: Any) -> None:
    _check_positive("resolution", config.resolution)
    if config.resolution > MAX_RESOLUTION:
        raise SisoError(f"--resolution {config.resolution} is too large: siso optimises at the model's native size "
                        f"(512 in the paper); at most {MAX_RESOLUTION}.")
    if not isinstance(config.seed, int) or not 0 <= config.seed <= MAX_SEED:
        raise SisoError(f"--seed must be a whole number from 0 to 2**64 - 1, got {config.seed!r}.")


def _check_device_and_dtype(config: Any) -> None:
    if config.device not in DEVICES:
        raise SisoError(f"--device must be one of {', '.join(DEVICES)}, got {config.device!r}.")
    if config.dtype not in DTYPES:
        raise SisoError(f"--dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}.")


def _recordable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_recordable(v) for v in value]
    return value


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
    #: FLUX's T5 / Sana's Gemma prompt length; None: the pipeline's default (FLUX 512, Sana 300). The
    #: optimisation used 256: pass that to render its image again exactly.
    prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise SisoError('The prompt is empty: pass a description such as --prompt "a dog on the beach".')
        _check_size_and_seed(self)
        if self.steps is not None:
            _check_positive("steps", self.steps)
        if self.prompt_tokens is not None:
            _check_positive("prompt-tokens", self.prompt_tokens)
        _check_device_and_dtype(self)


DEFAULT_EDITING_MODEL = "stabilityai/sd-turbo"
DEFAULT_LABEL_MODEL = "openai/clip-vit-large-patch14"
#: the reference's detector (grounding-dino-base is the larger alternative)
DEFAULT_DETECTOR_MODEL = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SEGMENTER_MODEL = "facebook/sam-vit-base"


@dataclass(frozen=True, kw_only=True)
class EditConfig(RunConfig):
    """An editing run: swap the object of class ``input_class`` in the scene ``input`` for the subject.

    Classes left ``None`` are found by the CLIP labeller; without ``mask`` Grounding DINO + SAM find
    the object. Defaults are the method's editing numbers (docs/fidelity.md, Editing).
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
    learning_rate: float | None = 3e-4
    early_stop_patience: int | None = 7
    #: of the ``strength * inversion_steps`` steps the edit re-runs, how many (the last ones) carry
    #: gradients: the reference differentiates the final step only.
    grad_steps: int | None = 1
    adam_weight_decay: float | None = 1e-2
    label_model: str = DEFAULT_LABEL_MODEL
    detector_model: str = DEFAULT_DETECTOR_MODEL
    segmenter_model: str = DEFAULT_SEGMENTER_MODEL
    box_threshold: float = 0.3
    text_threshold: float = 0.25

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
        super().__post_init__()
        for flag, value in (("lr", self.learning_rate), ("early-stop-patience", self.early_stop_patience),
                            ("grad-steps", self.grad_steps), ("adam-weight-decay", self.adam_weight_decay)):
            if value is None:  # editing has no backbone preset to fill these from
                raise SisoError(f"--{flag} needs a value for editing.")
        _check_positive("inversion-steps", self.inversion_steps)
        if not (math.isfinite(self.bg_weight) and self.bg_weight >= 0):
            raise SisoError(f"--bg-weight must be >= 0 (0 turns the background loss off), got {self.bg_weight}.")
        if not 0 < self.strength <= 1:
            raise SisoError(f"--strength must be in (0, 1], got {self.strength}.")
        edit_steps = int(self.inversion_steps * self.strength + 1e-6)
        if edit_steps < 1:
            raise SisoError(
                f"--strength {self.strength} of --inversion-steps {self.inversion_steps} leaves no denoising step "
                f"to edit; raise either (the method uses 0.75 of 4)."
            )
        if self.grad_steps > edit_steps:
            raise SisoError(
                f"--grad-steps ({self.grad_steps}) cannot exceed the {edit_steps} denoising steps the edit re-runs "
                f"(--strength {self.strength} of --inversion-steps {self.inversion_steps})."
            )
        for flag, value in (("box-threshold", self.box_threshold), ("text-threshold", self.text_threshold)):
            if not 0 <= value <= 1:  # NaN fails this too
                raise SisoError(f"--{flag} must be in [0, 1], got {value}.")

    def input_sources(self) -> tuple[str | Path | None, ...]:
        return (self.subject, self.input, self.mask, *super().input_sources(), self.label_model, self.detector_model,
                self.segmenter_model)

    def resolved(self, lora_formats: tuple[str, ...] = ("diffusers",)) -> EditConfig:
        """Fill the ``None`` knobs (``lora_formats``: the backbone's default), so the record shows what ran."""
        return _replace(self.with_ir_resolved(), similarity=self.similarity_names,
                        lora_format=_first(self.lora_format, lora_formats))
