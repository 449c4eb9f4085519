"""Subject-driven editing: swap the object in a photo for the subject, keep everything else.

Before the loop: frame the scene, name the two classes, find the object's mask, invert the scene
with ReNoise. Then the same loop as generation, whose render resumes from the inverted latent
(gradients through the last step only, as the reference) and whose loss adds a background term:
``L = L_sim + bg_weight * MSE(image, scene) over the background``.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..backbones import Backbone, backbone_class_for, render
from ..backbones.base import MemoryPlan
from ..backbones.stable_diffusion import StableDiffusionBackbone
from ..backbones.stable_diffusion_xl import StableDiffusionXLBackbone
from ..config import EditConfig
from ..devices import dtype_name, resolve_device, resolve_dtype
from ..errors import SisoError
from ..files import write_png
from ..generation import (
    GenerateResult,
    GenerationRun,
    SessionControls,
    Status,
    _out_of_memory_as_error,
    _quiet,
    apply_speed_settings,
    check_similarity_sources,
    load_similarity_loss,
    similarity_sources,
    speed_record,
)
from ..images import load_image, pil_to_tensor, tensor_to_pil, working_copy
from ..lora import attach_lora, lora_parameter_groups, snapshot_lora
from ..models import ModelCache
from ..optimize import LoopSettings, Optimization, StepEvent
from ..runs import check_run_dir, library_versions, prepare_run_dir
from ..similarity import SimilarityLoss
from ..sources import check_source
from ..speed import CompileRecord
from .inversion import Inversion, ReNoiseSettings, inversion_residual, invert
from .labels import ClipLabeller, Label, user_label
from .masks import ObjectFinder, ObjectMask, load_user_mask, square_crop

PROMPT = "a photo of a {}"
#: what the run directory holds besides generation's files
INPUT_FILE, MASK_FILE, RECONSTRUCTION_FILE = "input.png", "mask.png", "reconstruction.png"


def background_mse(image: torch.Tensor, scene: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the background's pixel values (every channel of every pixel where
    ``background`` is 1), as the reference computes it."""
    weights = background.expand_as(image)
    return ((image - scene) ** 2 * weights).sum() / weights.sum()


class EditLoss(nn.Module):
    """The similarity loss plus ``bg_weight`` times the background error; ``bg`` is recorded even at weight 0."""

    def __init__(self, similarity: SimilarityLoss, scene: torch.Tensor, background: torch.Tensor,
                 bg_weight: float) -> None:
        super().__init__()
        self.similarity = similarity
        self.bg_weight = bg_weight
        self.register_buffer("scene", scene, persistent=False)
        self.register_buffer("background", background, persistent=False)

    @property
    def offset(self) -> float:
        """The reference's editing loss is ``-sum_m w_m cos_m + c * bg`` = ``total - offset``."""
        return self.similarity.offset

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = self.similarity(image)
        similarity_total = losses.pop("total")
        losses["bg"] = background_mse(image.float(), self.scene, self.background)
        losses["total"] = similarity_total + self.bg_weight * losses["bg"]
        return losses


@dataclass
class EditSession(SessionControls):
    """A prepared edit."""

    config: EditConfig  # resolved
    backbone: Backbone
    loss: EditLoss
    optimization: Optimization
    device: torch.device
    dtype: torch.dtype
    scene: Image.Image  # the framed scene the edit starts from (input.png)
    mask: ObjectMask
    labels: dict[str, Label]  # "subject" and "input"
    inversion: Inversion
    reconstruction: torch.Tensor  # the inverted scene rendered back with the untouched model
    residual: float
    setup_seconds: float = 0.0
    memory: MemoryPlan | None = None
    compiled: CompileRecord | None = None

    @property
    def prompts(self) -> dict[str, str]:
        return {"inversion": PROMPT.format(self.labels["input"].text),
                "edit": PROMPT.format(self.labels["subject"].text)}

    def record(self) -> dict[str, Any]:
        scene = pil_to_tensor(self.scene)
        return {
            "task": "edit",
            "config": self.config.to_record(),
            "similarity_models": similarity_sources(self.config),
            "labels": {role: label.to_record() for role, label in self.labels.items()},
            "prompts": self.prompts,
            "mask": self.mask.to_record(),
            "inversion": {
                "sampler": self.inversion.sampler.name,
                "timesteps": [int(t) for t in self.inversion.timesteps],
                "renoise": self.inversion.settings.to_record(),
                "residual": round(self.residual, 6),
                "reconstruction_mse": round(float(((self.reconstruction - scene) ** 2).mean()), 6),
            },
            "guidance_scale": 1.0,
            "files": {"input": INPUT_FILE, "mask": MASK_FILE, "reconstruction": RECONSTRUCTION_FILE},
            "backbone": type(self.backbone).__name__,
            "device": str(self.device),
            "dtype": dtype_name(self.dtype),
            **speed_record(self),
            "versions": library_versions(),
        }

    def write_inputs(self, out_dir: Path) -> None:
        write_png(self.scene, out_dir / INPUT_FILE)
        write_png(self.mask.to_image(), out_dir / MASK_FILE)
        write_png(tensor_to_pil(self.reconstruction), out_dir / RECONSTRUCTION_FILE)


def _sampler_for(backbone: Backbone) -> str:
    """ReNoise's pairing: SDXL-Turbo keeps its Euler-ancestral sampler (with noise correction),
    SD-Turbo inverts with deterministic DDIM."""
    return "euler_ancestral" if isinstance(backbone, StableDiffusionXLBackbone) else "ddim"


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _object_crop(scene: Image.Image, mask: ObjectMask, margin: float = 0.1) -> Image.Image:
    """The part of the scene around the masked object, for naming it."""
    rows, cols = torch.nonzero(mask.mask[0, 0], as_tuple=True)
    top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    pad_y, pad_x = int((bottom - top) * margin), int((right - left) * margin)
    box = (max(0, left - pad_x), max(0, top - pad_y), min(scene.width, right + pad_x),
           min(scene.height, bottom + pad_y))
    return scene.crop(box)


def find_labels_and_mask(config: EditConfig, subject: Image.Image, scene: Image.Image, mask: ObjectMask | None,
                         device: torch.device, dtype: torch.dtype, status: Status = _quiet,
                         ) -> tuple[dict[str, Label], ObjectMask]:
    """The user's class names, else CLIP's; the user's mask, else Grounding DINO + SAM's.

    Models are loaded only for what is missing, and freed before the backbone needs the memory.
    """
    labels = {"subject": user_label(config.subject_class), "input": user_label(config.input_class)}
    if None in labels.values():
        status(f"Loading the CLIP labeller {config.label_model}")
        labeller = ClipLabeller.from_pretrained(config.label_model, device, dtype)
        if labels["subject"] is None:
            labels["subject"] = labeller.label(subject)
        if labels["input"] is None:
            labels["input"] = labeller.label(_object_crop(scene, mask) if mask is not None else scene)
        del labeller
        _release_memory(device)
    if mask is None:
        status(f"Finding the {labels['input'].text} with {config.detector_model} and {config.segmenter_model}")
        finder = ObjectFinder.from_pretrained(config.detector_model, config.segmenter_model, device)
        mask = finder.find(scene, labels["input"].text, config.box_threshold, config.text_threshold,
                           scene=f"the scene {config.input}")
        del finder
        _release_memory(device)
    return labels, mask


def prepare_edit(config: EditConfig, status: Status = _quiet, cache: ModelCache | None = None) -> EditSession:
    """Load and precompute everything an edit needs; fails fast (before any model loads) on bad inputs."""
    started = time.perf_counter()
    cache = cache or ModelCache()
    subject = working_copy(load_image(config.subject, "subject photo"))
    photo = load_image(config.input, "scene photo")
    scene = square_crop(photo, config.resolution)
    user_mask = load_user_mask(config.mask, photo.size, config.resolution) if config.mask is not None else None
    backbone_class = backbone_class_for(config.model)
    if not issubclass(backbone_class, StableDiffusionBackbone):
        raise SisoError(
            f"Editing runs on Stable Diffusion and SDXL pipelines (stabilityai/sd-turbo, stabilityai/sdxl-turbo); "
            f"{config.model} is a {', '.join(backbone_class.pipeline_classes)}, which ReNoise inversion here does not "
            "support. Pass --model stabilityai/sd-turbo."
        )
    backbone_class.check_options(config.model, False, config.lora_format)
    config = config.resolved(backbone_class.default_lora_formats)
    check_similarity_sources(config, cache)
    for source, flag in ((config.label_model, "--label-model"), (config.detector_model, "--detector-model"),
                         (config.segmenter_model, "--segmenter-model")):
        check_source(source, flag)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    with _out_of_memory_as_error(config):
        status(f"Loading {config.model}")
        backbone = cache.backbone(config.model, device, dtype)
        backbone.check_resolution(config.resolution)
        labels, mask = find_labels_and_mask(config, subject, scene, user_mask, device, dtype, status)
        similarity = load_similarity_loss(config, [subject], cache, device, dtype, status)
        # A zero LoRA (B = 0): the inversion and the reconstruction see the untouched model.
        attach_lora(backbone, config.lora_rank, False, config.seed)
        scene_pixels = pil_to_tensor(scene).to(device)
        status(f"Inverting the scene (ReNoise, {config.inversion_steps} steps, strength {config.strength})")
        with torch.no_grad():
            inversion_cond = backbone.encode_prompt(PROMPT.format(labels["input"].text), config.resolution)
            edit_cond = backbone.encode_prompt(PROMPT.format(labels["subject"].text), config.resolution)
        sampler = _sampler_for(backbone)
        inversion = invert(backbone, scene_pixels, inversion_cond, sampler=sampler, num_steps=config.inversion_steps,
                           strength=config.strength, settings=ReNoiseSettings.for_sampler(sampler), seed=config.seed)
        start = inversion.start_point(dtype)
        steps = len(start.timesteps)
        with torch.no_grad():
            reconstruction = render(backbone, inversion_cond, config.seed, config.resolution, steps, 0,
                                    start=start).float().cpu()
        residual = inversion_residual(backbone, inversion_cond, inversion)
        backbone.offload_text_encoders()
        loss = EditLoss(similarity, scene_pixels, mask.background.to(device), config.bg_weight)

    def render_edit() -> torch.Tensor:
        # Every remaining step runs with the LoRA; gradients flow through the last grad_steps of them
        # (1, the reference's `set_grad_enabled(i == last)`: the paper finds the final step suffices).
        return render(backbone, edit_cond, config.seed, config.resolution, steps, config.grad_steps, start=start)

    with _out_of_memory_as_error(config):
        # After the inversion, which stays eager on a model not compiled before: the loop is what repeats.
        render_fn, memory, compiled = apply_speed_settings(backbone, similarity, config, render_edit, status)
    optimization = Optimization(
        render=render_fn,
        loss_fn=loss,
        params=lora_parameter_groups(backbone),
        snapshot=lambda: snapshot_lora(backbone),
        settings=LoopSettings.from_config(config),
        early_stop_offset=loss.offset,
    )
    return EditSession(config, backbone, loss, optimization, device, dtype, scene, mask, labels, inversion,
                       reconstruction, residual, setup_seconds=time.perf_counter() - started, memory=memory,
                       compiled=compiled)


@dataclass
class EditResult(GenerateResult):
    """What ``edit`` returns: generation's result plus the labels, the mask and the reconstruction."""

    labels: dict[str, Label] = field(default_factory=dict)
    mask: torch.Tensor | None = None  # (1, 1, H, W), 1 on the replaced object
    scene: Image.Image | None = None
    reconstruction: Image.Image | None = None
    inversion_residual: float | None = None


def start_edit(config: EditConfig, out: str | Path, overwrite: bool = False, status: Status = _quiet,
               cache: ModelCache | None = None) -> GenerationRun:
    """Check ``out``, prepare the edit (labels, mask, inversion), then create the run directory
    with input.png, mask.png and reconstruction.png (a failed start leaves none)."""
    check_run_dir(out, overwrite, config.input_paths())
    session = prepare_edit(config, status, cache)
    out_dir = prepare_run_dir(out, overwrite, config.input_paths())
    session.write_inputs(out_dir)
    return GenerationRun(session, out_dir)  # the run-directory bookkeeping is task-agnostic


def run_edit(config: EditConfig, out: str | Path, overwrite: bool = False,
             on_step: Callable[[StepEvent], None] | None = None, status: Status = _quiet,
             on_session: Callable[[EditSession], None] | None = None,
             cache: ModelCache | None = None) -> EditResult:
    """Prepare, optimise and write the run directory (generation's files plus input.png, mask.png
    and reconstruction.png); Ctrl-C and NaN keep the best so far."""
    run = start_edit(config, out, overwrite, status, cache)
    session = run.session
    if on_session is not None:
        on_session(session)
    for _ in run.steps(on_step):
        pass
    result = run.finish()
    return EditResult(
        **{f.name: getattr(result, f.name) for f in fields(GenerateResult)},
        labels=session.labels, mask=session.mask.mask, scene=session.scene,
        reconstruction=tensor_to_pil(session.reconstruction), inversion_residual=session.residual,
    )


def edit(subject: str | Path, scene: str | Path, out: str | Path, *, overwrite: bool = False,
         on_step: Callable[[StepEvent], None] | None = None, **options: Any) -> EditResult:
    """Replace the object in the photo ``scene`` with the subject of the photo ``subject``.

    Writes the run directory ``out`` and returns the best image, the LoRA directory, the losses
    (``bg`` included), the class labels and the mask. ``options`` are :class:`EditConfig` fields
    (``subject_class``, ``input_class``, ``mask``, ``bg_weight``, ``model``, ``max_steps``, ...).
    """
    config = EditConfig(subject=Path(subject), input=Path(scene), **options)
    return run_edit(config, out, overwrite=overwrite, on_step=on_step)
