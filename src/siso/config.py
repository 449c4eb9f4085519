"""The run specification: every knob of generation, editing and rendering, declared once.

Each field is a :func:`~siso.knobs.knob`: its default and help live here, and the command line,
the web app's controls, the benchmark's options and docs/cli.md are derived from these classes. A
knob left ``None`` with ``preset=...`` is filled from the backbone's preset (``siso.presets``) when
the run starts (:meth:`RunSettings.resolved`), so ``run.json`` records what ran.

The ``*Settings`` classes hold the knobs a whole benchmark shares; the ``*Config`` classes add one
run's inputs (photos, prompt). Pure: no torch, no file system; checks that need the disk (does the
photo exist, is the IR model converted) happen where the run starts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from .errors import SisoError
from .knobs import Knob, knob, knobs, like
from .model_ids import CLIP_MODEL, DETECTOR_MODEL, DINO_MODEL, EDITING_MODEL, GENERATION_MODEL, SEGMENTER_MODEL
from .presets import PRESETS, BackbonePreset

#: ``--ir-model`` value meaning "the cached conversion if there is one, else no IR loss" (siso.ir_cache)
IR_AUTO = "auto"
SIMILARITY_NAMES = ("dino", "ir")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "bf16", "fp16", "fp32")
LORA_FORMATS = ("diffusers", "kohya")
MAX_RESOLUTION = 2048  # beyond the sizes these models are trained at, and beyond most GPUs' memory
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
#: the schedulers of every supported model are trained on 1000 timesteps: more steps add nothing but time
MAX_RENDER_STEPS = 1000


def _none_or(value: str) -> str | None:
    """``none`` switches an optional model off; anything else (a Hub id, a directory, auto) stays."""
    return None if value.strip().lower() == "none" else value


def _comma_list(values: tuple[str, ...]) -> tuple[str, ...]:
    """The command line's values, each possibly comma-separated: ``--similarity dino,ir``."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _lora_formats(values: tuple[str, ...] | list[str]) -> tuple[str, ...] | None:
    """The diffusers file is always written; ``--lora-format`` adds others."""
    return tuple(dict.fromkeys(["diffusers", *values])) if values else None


def _families() -> str:
    return ", ".join(preset.title for preset in PRESETS.values())


Settings = TypeVar("Settings", bound="RunSettings")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """The knobs generation and editing share."""

    model: str = knob(help=f"Hub id or directory of a diffusers pipeline ({_families()}, or another checkpoint "
                           "of their families; the adapter is chosen from its model_index.json).",
                      label="Backbone (Hub id or directory)")
    seed: int = knob(42, help="Seed of the fixed initial noise (exactly torch.Generator(device).manual_seed).")
    resolution: int = knob(512, help="Image side in pixels (a multiple of the model's downsampling factor).")
    max_steps: int = knob(50, help="Most optimisation iterations.", label="Max iterations")
    learning_rate: float | None = knob(None, flag="lr", preset="learning_rate", label="Learning rate",
                                       help="AdamW learning rate (constant; betas 0.9/0.999, gradient-norm clip 1.0).")
    early_stop_pct: float = knob(3.0, help="An iteration improves when the reference's loss, -(sum of weighted "
                                           "cosines), drops by this % of its value at the last improvement.")
    early_stop_patience: int | None = knob(None, preset="early_stop_patience", label="Early-stop patience",
                                           help="Stop after this many iterations in a row without an improvement.")
    grad_steps: int | None = knob(None, preset="grad_steps",
                                  help="How many of the last denoising steps carry gradients.")
    lora_rank: int = knob(4, help="LoRA rank (alpha equals it) on the backbone's LoRA targets (docs/fidelity.md).")
    low_memory: bool | None = knob(None, help="Gradient checkpointing (exact, slower): on in the VAE decoder and the "
                                              "denoiser, off for none, or (default) chosen from the GPU's free memory.")
    compile: bool | None = knob(False, long_lived=None, help=(
        "torch.compile the denoiser, VAE decoder and similarity models (CUDA graphs on GPUs): about 2x faster "
        "iterations, but a machine's first compile takes minutes (cached on disk after that), so it is off for a "
        "single run and, where the models stay loaded (siso app, siso bench), on for CUDA GPUs unless set."))
    dino_model: str = knob(DINO_MODEL, help="DINOv2 Hub id or directory.")
    ir_model: str | None = knob(IR_AUTO, parse=_none_or, help=(
        "IR model directory made by `siso convert-ir` (the paper's loss is DINO + IR); auto: the one `siso "
        "convert-ir --download` cached, if any; none: no IR loss."))
    similarity: tuple[str, ...] | None = knob(None, choices=SIMILARITY_NAMES, parse=_comma_list, metavar="dino,ir",
                                              help="The similarity models whose distances are summed, "
                                                   "comma-separated (unset: dino, plus ir when an IR model is found).")
    dino_weight: float = knob(1.0, help="Weight of the DINO distance in the loss.")
    ir_weight: float = knob(1.0, help="Weight of the IR distance in the loss.")
    device: str = knob("auto", choices=DEVICES, help="Where to compute (auto: a CUDA or MPS GPU if there is one).")
    dtype: str = knob("auto", choices=DTYPES, help="Frozen-weight precision (auto: bf16 on GPUs, fp16 where bf16 is "
                                                   "missing, fp32 on the CPU); the LoRA always trains in fp32.")
    similarity_dtype: str = knob("auto", choices=DTYPES, help=(
        "Precision of the DINO and IR models (auto: the frozen weights'; the reference runs them in fp32)."))
    iteration_images: bool = knob(True, help=(
        "Write each iteration's image to steps/NNNN.png as it is made (off: only the best is kept, as best.png; "
        "in a catalogue the iteration images are about half of its storage)."))
    lora_format: tuple[str, ...] | None = knob(None, choices=LORA_FORMATS, preset="lora_format", parse=_lora_formats,
                                               help="LoRA files to write besides the diffusers one (always written): "
                                                    "kohya, for ComfyUI and A1111; repeat the flag for several.")
    adam_weight_decay: float | None = knob(None, flag="weight-decay", preset="adam_weight_decay",
                                           help="AdamW's weight decay on the denoiser's LoRA.")
    adam_betas: tuple[float, float] = knob((0.9, 0.999), cli=False, help="AdamW's betas.")
    adam_eps: float = knob(1e-8, cli=False, help="AdamW's epsilon.")
    max_grad_norm: float = knob(1.0, cli=False, help="Gradient-norm clip of the LoRA's gradients.")

    def __post_init__(self) -> None:
        flag = self.flag
        for name in ("max_steps", "lora_rank", "grad_steps", "early_stop_patience"):
            _check_positive(flag(name), getattr(self, name))
        _check_size_and_seed(self)
        _check_number(flag("learning_rate"), self.learning_rate, exclusive=True)
        for name in ("early_stop_pct", "dino_weight", "ir_weight", "adam_weight_decay", "max_grad_norm", "adam_eps"):
            _check_number(flag(name), getattr(self, name))
        for name in ("lora_format", "similarity"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
        _check_choices(self)
        if self.similarity is not None:
            if not self.similarity:
                raise SisoError(f"{flag('similarity')} takes a comma-separated list of {', '.join(SIMILARITY_NAMES)}; "
                                "got nothing.")
            if "ir" in self.similarity and not self.ir_model:
                raise SisoError(f"{flag('similarity')} includes ir but no IR model is configured: pass --ir-model DIR "
                                "(a directory made by `siso convert-ir`).")

    @classmethod
    def flag(cls, name: str) -> str:
        """The command-line spelling of knob ``name`` (``--lr``), for messages."""
        return _knobs(cls)[name].option

    @property
    def similarity_names(self) -> tuple[str, ...]:
        """The similarity models the run uses: ``similarity``, else DINO plus IR when there is an IR
        model. Needs ``ir_model`` resolved (``siso.ir_cache.resolve_ir``): ``auto`` is a question for the disk."""
        if self.similarity is not None:
            return self.similarity
        if self.ir_model == IR_AUTO:
            raise ValueError("ir_model 'auto' is not resolved yet: call siso.ir_cache.resolve_ir(config) first")
        return ("dino", "ir") if self.ir_model else ("dino",)

    def resolved(self: Settings, preset: BackbonePreset) -> Settings:
        """Every knob left ``None`` filled from the backbone's ``preset`` (or, where the preset has no
        value, from the knob named as its ``fallback``), and ``similarity`` from the models found."""
        values: dict[str, Any] = {"similarity": self.similarity_names}
        for spec in _knobs(type(self)).values():
            if spec.preset is None or getattr(self, spec.name) is not None:
                continue
            value = getattr(preset, spec.preset)
            if value is None and spec.fallback is not None:
                value = values.get(spec.fallback, getattr(self, spec.fallback))
            values[spec.name] = value
        resolved = replace(self, **values)
        resolved.check_resolved()
        return resolved

    def check_resolved(self) -> None:
        """Checks that need the preset's values (subclasses add theirs)."""

    def input_sources(self) -> tuple[str | Path | None, ...]:
        """Everything the run reads by name: photos, masks, models (Hub ids or paths)."""
        return (self.model, self.dino_model, self.ir_model)

    def to_record(self) -> dict[str, Any]:
        """The config as run.json records it (paths as strings)."""
        return {name: _recordable(value) for name, value in asdict(self).items()}

    @classmethod
    def from_settings(cls, settings: RunSettings, **inputs: Any):
        """This config class for one run: the shared ``settings`` plus the run's ``inputs``."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(settings)}, **inputs)


@dataclass(frozen=True, kw_only=True)
class GenerateSettings(RunSettings):
    """The knobs of a generation (every one but the run's photos and prompt)."""

    model: str = like(RunSettings, "model", default=GENERATION_MODEL)
    denoise_steps: int | None = knob(None, preset="denoise_steps", help="Denoising steps per iteration.")
    train_text_encoder: bool | None = knob(None, preset="train_text_encoder", help=(
        "Also put LoRA on the CLIP text encoder(s) (never on T5 or Gemma, which stay frozen)."))
    text_encoder_learning_rate: float | None = knob(
        None, flag="text-encoder-lr", preset="text_encoder_learning_rate", fallback="learning_rate",
        help="Learning rate of the text encoders' LoRA (its own AdamW group).")
    text_encoder_weight_decay: float | None = knob(None, preset="text_encoder_weight_decay",
                                                   fallback="adam_weight_decay",
                                                   help="AdamW's weight decay on the text encoders' LoRA.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self.flag("denoise_steps"), self.denoise_steps)
        _check_number(self.flag("text_encoder_learning_rate"), self.text_encoder_learning_rate, exclusive=True)
        _check_number(self.flag("text_encoder_weight_decay"), self.text_encoder_weight_decay)

    def check_resolved(self) -> None:
        if self.grad_steps > self.denoise_steps:
            raise SisoError(
                f"{self.flag('grad_steps')} ({self.grad_steps}) cannot exceed {self.flag('denoise_steps')} "
                f"({self.denoise_steps}): gradients flow through the last k of the N denoising steps."
            )


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(GenerateSettings):
    """A generation run: optimise a LoRA so the model's image of ``prompt`` shows the subject."""

    subjects: tuple[Path, ...] = knob(flag="subject", help="Photo of the subject; repeat the flag for several photos.")
    prompt: str = knob(help='A simple prompt naming the subject\'s class, e.g. "a photo of a dog".')

    def __post_init__(self) -> None:
        if not self.subjects:
            raise SisoError("No subject photo given: pass at least one with --subject PATH.")
        object.__setattr__(self, "subjects", tuple(Path(p) for p in self.subjects))
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise SisoError('The prompt is empty: pass a description such as --prompt "a photo of a dog".')
        super().__post_init__()

    def input_sources(self) -> tuple[str | Path | None, ...]:
        return (*self.subjects, *super().input_sources())


@dataclass(frozen=True, kw_only=True)
class EditSettings(RunSettings):
    """The knobs of an edit (every one but the run's photos, classes and mask). Editing has no
    backbone preset for the optimiser: its numbers are the reference's editing command's."""

    model: str = like(RunSettings, "model", default=EDITING_MODEL,
                      help="Hub id or directory of a diffusers Stable Diffusion or SDXL pipeline.")
    learning_rate: float = like(RunSettings, "learning_rate", default=3e-4, preset=None)
    early_stop_patience: int = like(RunSettings, "early_stop_patience", default=7, preset=None)
    #: the reference differentiates the edit's final step only
    grad_steps: int = like(RunSettings, "grad_steps", default=1, preset=None,
                           help="How many of the re-run steps carry gradients (the last ones; the paper's 1 suffices).")
    adam_weight_decay: float = like(RunSettings, "adam_weight_decay", default=1e-2, preset=None)
    bg_weight: float = knob(10.0, label="Background weight",
                            help="Weight of the background loss, the MSE outside the object (0 turns it off).")
    strength: float = knob(0.75, help="Fraction of the inversion steps the edit re-runs.")
    inversion_steps: int = knob(4, help="Sampler steps over the whole schedule (ReNoise inversion).")
    label_model: str = knob(CLIP_MODEL, help=(
        "CLIP model that names the subject and the object when --subject-class/--input-class are not given."))
    detector_model: str = knob(DETECTOR_MODEL, help="Grounding DINO that finds the object (unless --mask).")
    segmenter_model: str = knob(SEGMENTER_MODEL, help="SAM that turns the object's box into a mask "
                                                                "(unless --mask).")
    box_threshold: float = knob(0.3, help="Grounding DINO's box confidence threshold.")
    text_threshold: float = knob(0.25, help="Grounding DINO's text (phrase) threshold.")

    def __post_init__(self) -> None:
        super().__post_init__()
        flag = self.flag
        for name in ("learning_rate", "early_stop_patience", "grad_steps", "adam_weight_decay"):
            if getattr(self, name) is None:  # editing has no backbone preset to fill these from
                raise SisoError(f"{flag(name)} needs a value for editing.")
        _check_positive(flag("inversion_steps"), self.inversion_steps)
        if not (isinstance(self.bg_weight, (int, float)) and math.isfinite(self.bg_weight) and self.bg_weight >= 0):
            raise SisoError(f"{flag('bg_weight')} must be >= 0 (0 turns the background loss off), "
                            f"got {self.bg_weight}.")
        if not (isinstance(self.strength, (int, float)) and 0 < self.strength <= 1):
            raise SisoError(f"{flag('strength')} must be in (0, 1], got {self.strength}.")
        edit_steps = self.edit_steps
        if edit_steps < 1:
            raise SisoError(
                f"{flag('strength')} {self.strength} of {flag('inversion_steps')} {self.inversion_steps} leaves no "
                "denoising step to edit; raise either (the method uses 0.75 of 4)."
            )
        if self.grad_steps > edit_steps:
            raise SisoError(
                f"{flag('grad_steps')} ({self.grad_steps}) cannot exceed the {edit_steps} denoising steps the edit "
                f"re-runs ({flag('strength')} {self.strength} of {flag('inversion_steps')} {self.inversion_steps})."
            )
        for name in ("box_threshold", "text_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):  # NaN fails this too
                raise SisoError(f"{flag(name)} must be in [0, 1], got {value}.")

    @property
    def edit_steps(self) -> int:
        """The denoising steps the edit re-runs: the last ``strength`` of the inversion's."""
        return int(self.inversion_steps * self.strength + 1e-6)

    def input_sources(self) -> tuple[str | Path | None, ...]:
        return (*super().input_sources(), self.label_model, self.detector_model, self.segmenter_model)


@dataclass(frozen=True, kw_only=True)
class EditConfig(EditSettings):
    """An editing run: swap the object of class ``input_class`` in the scene ``input`` for the subject.

    Classes left ``None`` are found by the CLIP labeller; without ``mask`` Grounding DINO + SAM find
    the object. Defaults are the method's editing numbers (docs/fidelity.md, Editing).
    """

    subject: Path = knob(help="Photo of the subject to put into the scene.")
    input: Path = knob(help="The scene photo whose object is replaced.")
    subject_class: str | None = knob(None, help='What the subject is, e.g. "dog" (unset: recognised by CLIP).')
    input_class: str | None = knob(None, help='What to replace in the scene, e.g. "cat" (unset: recognised by CLIP).')
    mask: Path | None = knob(None, help="Mask of the object to replace (white = replace), at the scene's size; "
                                        "skips the detection.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "subject", Path(self.subject))
        object.__setattr__(self, "input", Path(self.input))
        if self.mask is not None:
            object.__setattr__(self, "mask", Path(self.mask))
        for name in ("subject_class", "input_class"):
            value = getattr(self, name)
            if value is not None:
                flag = self.flag(name)
                if not isinstance(value, str) or not value.strip():
                    raise SisoError(f'{flag} is empty: name the object, e.g. {flag} "dog", or leave it out to have '
                                    "it recognised automatically.")
                object.__setattr__(self, name, " ".join(value.split()))
        super().__post_init__()

    def input_sources(self) -> tuple[str | Path | None, ...]:
        return (self.subject, self.input, self.mask, *super().input_sources())


@dataclass(frozen=True, kw_only=True)
class RenderConfig:
    """The second stage: the learned LoRA with any prompt and more denoising steps."""

    model: str = knob(help="The model the LoRA was learned on (Hub id or directory).")
    prompt: str = knob(help="Any prompt; name the subject's class, e.g. 'a dog in the snow'.")
    lora: Path | None = knob(None, help="The lora/ directory of a siso run (or one .safetensors file).")
    steps: int | None = knob(None, preset="render_steps", label="Denoising steps",
                             help=f"Denoising steps (at most {MAX_RENDER_STEPS}).")
    seed: int = like(RunSettings, "seed")
    resolution: int = like(RunSettings, "resolution")
    device: str = like(RunSettings, "device")
    dtype: str = like(RunSettings, "dtype")
    prompt_tokens: int | None = knob(None, help=(
        "FLUX/Sana prompt length (unset: the pipeline's, FLUX 512, Sana 300); the optimisation used 256, so 256 "
        "with --steps 1 (FLUX) renders its best image again."))

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise SisoError('The prompt is empty: pass a description such as --prompt "a dog on the beach".')
        if self.lora is not None:
            object.__setattr__(self, "lora", Path(self.lora))
        _check_size_and_seed(self)
        _check_positive("--steps", self.steps)
        if self.steps is not None and self.steps > MAX_RENDER_STEPS:
            raise SisoError(f"--steps {self.steps} is more than a render can use: these models' schedulers are trained "
                            f"on {MAX_RENDER_STEPS} timesteps (their model cards render in 1-50); at most "
                            f"{MAX_RENDER_STEPS}.")
        _check_positive("--prompt-tokens", self.prompt_tokens)
        _check_choices(self)


@functools.cache
def _knobs(owner: type) -> dict[str, Knob]:
    return knobs(owner)


def _check_choices(config: Any) -> None:
    for spec in _knobs(type(config)).values():
        value = getattr(config, spec.name)
        if spec.choices is None or value is None:
            continue
        for item in value if isinstance(value, tuple) else (value,):
            if item not in spec.choices:
                raise SisoError(f"{spec.option} must be one of {', '.join(spec.choices)}, got {item!r}.")


def _check_number(flag: str, value: float | None, minimum: float = 0.0, exclusive: bool = False) -> None:
    """A finite number above ``minimum`` (None passes: the preset decides); NaN and inf never do."""
    if value is None:
        return
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > minimum if exclusive else value >= minimum))
    if not ok:
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        raise SisoError(f"{flag} must be a finite number {bound}, got {value!r}.")


def _check_positive(flag: str, value: int | None) -> None:
    """A whole number >= 1 (None passes: the preset decides)."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise SisoError(f"{flag} must be a whole number >= 1, got {value!r}.")


def _check_size_and_seed(config: Any) -> None:
    _check_positive("--resolution", config.resolution)
    if config.resolution > MAX_RESOLUTION:
        raise SisoError(f"--resolution {config.resolution} is too large: siso optimises at the model's native size "
                        f"(512 in the paper); at most {MAX_RESOLUTION}.")
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or not 0 <= config.seed <= MAX_SEED:
        raise SisoError(f"--seed must be a whole number from 0 to 2**64 - 1, got {config.seed!r}.")


def _recordable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_recordable(v) for v in value]
    return value
