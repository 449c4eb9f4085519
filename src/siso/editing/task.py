"""Subject-driven editing: swap the object in a photo for the subject, keep everything else.

The task the session template runs (:class:`EditTask`). Before the loop: frame the scene, name the
two classes, find the object's mask, invert the scene with ReNoise. Then the same loop as
generation, whose render resumes from the inverted latent (gradients through the last step only, as
the reference) and whose loss adds a background term:
``L = L_sim + bg_weight * MSE(image, scene) over the background``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from ..backbones import Backbone, render
from ..backbones.stable_diffusion import StableDiffusionBackbone
from ..backbones.stable_diffusion_xl import StableDiffusionXLBackbone
from ..config import EditConfig
from ..errors import SisoError
from ..files import write_png
from ..images import load_image, pil_to_tensor, tensor_to_pil, working_copy
from ..models import ModelCache
from ..run import Run, RunResult, run_to_end, start_run
from ..session import Session, Task
from ..similarity import SimilarityLoss
from .inversion import ReNoiseSettings, inversion_residual, invert
from .labels import ClipLabeller, Label, user_label
from .masks import ObjectFinder, ObjectMask, load_user_mask, square_crop

log = logging.getLogger(__name__)

PROMPT = "a photo of a {}"
#: what the run directory holds besides generation's files
INPUT_FILE, MASK_FILE, RECONSTRUCTION_FILE = "input.png", "mask.png", "reconstruction.png"
#: the edit's guidance, as the reference's img2img call runs it (1.0: no classifier-free guidance)
GUIDANCE_SCALE = 1.0


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
                         device: torch.device, dtype: torch.dtype) -> tuple[dict[str, Label], ObjectMask]:
    """The user's class names, else CLIP's; the user's mask, else Grounding DINO + SAM's.

    Models are loaded only for what is missing, and freed before the backbone needs the memory.
    """
    labels = {"subject": user_label(config.subject_class), "input": user_label(config.input_class)}
    if None in labels.values():
        log.info("Loading the CLIP labeller %s", config.label_model)
        labeller = ClipLabeller.from_pretrained(config.label_model, device, dtype)
        if labels["subject"] is None:
            labels["subject"] = labeller.label(subject)
        if labels["input"] is None:
            labels["input"] = labeller.label(_object_crop(scene, mask) if mask is not None else scene)
        del labeller
        _release_memory(device)
    if mask is None:
        log.info("Finding the %s with %s and %s", labels["input"].text, config.detector_model, config.segmenter_model)
        finder = ObjectFinder.from_pretrained(config.detector_model, config.segmenter_model, device)
        mask = finder.find(scene, labels["input"].text, config.box_threshold, config.text_threshold,
                           scene=f"the scene {config.input}")
        del finder
        _release_memory(device)
    return labels, mask


class EditTask(Task):
    """An edit. After ``prepare`` it holds what the edit found: ``scene`` (the framed scene, input.png),
    ``mask``, ``labels`` ("subject" and "input"), the ``inversion``, its ``reconstruction`` (the
    inverted scene rendered back with the untouched model) and ``residual``."""

    kind = "edit"
    config: EditConfig

    def load_inputs(self) -> list[Image.Image]:
        config = self.config
        self.subject = working_copy(load_image(config.subject, "subject photo"))
        photo = load_image(config.input, "scene photo")
        self.scene = square_crop(photo, config.resolution)
        self.user_mask = (load_user_mask(config.mask, photo.size, config.resolution)
                          if config.mask is not None else None)
        return [self.subject]

    def check_backbone(self, backbone_class: type[Backbone]) -> None:
        if not issubclass(backbone_class, StableDiffusionBackbone):
            raise SisoError(
                f"Editing runs on Stable Diffusion and SDXL pipelines (stabilityai/sd-turbo, stabilityai/sdxl-turbo); "
                f"{self.config.model} is a {', '.join(backbone_class.pipeline_classes)}, which ReNoise inversion here "
                "does not support. Pass --model stabilityai/sd-turbo."
            )

    def extra_sources(self) -> tuple[tuple[str, str], ...]:
        """Only the models the edit will load: CLIP for a class not given, Grounding DINO + SAM without a mask."""
        config = self.config
        names = []
        if not config.subject_class or not config.input_class:  # (as user_label reads them)
            names.append("label_model")
        if config.mask is None:
            names += ["detector_model", "segmenter_model"]
        return tuple((getattr(config, name), config.flag(name)) for name in names)

    def setup(self, backbone: Backbone, device: torch.device, dtype: torch.dtype) -> None:
        self.labels, self.mask = find_labels_and_mask(self.config, self.subject, self.scene, self.user_mask,
                                                      device, dtype)

    @property
    def prompts(self) -> dict[str, str]:
        return {"inversion": PROMPT.format(self.labels["input"].text),
                "edit": PROMPT.format(self.labels["subject"].text)}

    def prepare(self, backbone: Backbone, similarity: SimilarityLoss) -> tuple[Callable[[], torch.Tensor], EditLoss]:
        # The LoRA is attached but zero (B = 0): the inversion and the reconstruction see the untouched model.
        config, device = self.config, backbone.device
        scene_pixels = pil_to_tensor(self.scene).to(device)
        log.info("Inverting the scene (ReNoise, %d steps, strength %g)", config.inversion_steps, config.strength)
        with torch.no_grad():
            inversion_cond = backbone.encode_prompt(self.prompts["inversion"], config.resolution)
            edit_cond = backbone.encode_prompt(self.prompts["edit"], config.resolution)
        sampler = _sampler_for(backbone)
        self.inversion = invert(backbone, scene_pixels, inversion_cond, sampler=sampler,
                                num_steps=config.inversion_steps, strength=config.strength,
                                settings=ReNoiseSettings.for_sampler(sampler), seed=config.seed)
        start = self.inversion.start_point(backbone.denoiser.dtype)
        steps = len(start.timesteps)
        with torch.no_grad():
            self.reconstruction = render(backbone, inversion_cond, config.seed, config.resolution, steps, 0,
                                         start=start).float().cpu()
        self.residual = inversion_residual(backbone, inversion_cond, self.inversion)

        def render_edit() -> torch.Tensor:
            # Every remaining step runs with the LoRA; gradients flow through the last grad_steps of them
            # (1, the reference's `set_grad_enabled(i == last)`: the paper finds the final step suffices).
            return render(backbone, edit_cond, config.seed, config.resolution, steps, config.grad_steps, start=start)

        return render_edit, EditLoss(similarity, scene_pixels, self.mask.background.to(device), config.bg_weight)

    def lora_title(self) -> str:
        return f"siso edit LoRA: {self.prompts['edit']}"

    def record(self) -> dict[str, Any]:
        scene = pil_to_tensor(self.scene)
        return {
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
            "guidance_scale": GUIDANCE_SCALE,
            "files": {"input": INPUT_FILE, "mask": MASK_FILE, "reconstruction": RECONSTRUCTION_FILE},
        }

    def write_inputs(self, out_dir: Path) -> None:
        write_png(self.scene, out_dir / INPUT_FILE)
        write_png(self.mask.to_image(), out_dir / MASK_FILE)
        write_png(tensor_to_pil(self.reconstruction), out_dir / RECONSTRUCTION_FILE)


def prepare_edit(config: EditConfig, cache: ModelCache | None = None) -> Session:
    """Load and precompute everything an edit needs; fails fast (before any model loads) on bad inputs."""
    return Session(EditTask(config), cache)


def start_edit(config: EditConfig, out: str | Path, overwrite: bool = False, cache: ModelCache | None = None) -> Run:
    """Check ``out``, prepare the edit (labels, mask, inversion), then create the run directory with
    input.png, mask.png and reconstruction.png (a failed start leaves none)."""
    return start_run(EditTask(config), out, overwrite, cache)


def run_edit(config: EditConfig, out: str | Path, overwrite: bool = False,
             cache: ModelCache | None = None) -> RunResult:
    """Prepare, optimise and write the run directory (generation's files plus input.png, mask.png
    and reconstruction.png); Ctrl-C and NaN keep the best so far. ``result.task`` holds the labels,
    the mask, the scene and the reconstruction."""
    return run_to_end(start_edit(config, out, overwrite, cache))


def edit(subject: str | Path, scene: str | Path, out: str | Path, *, overwrite: bool = False,
         **options: Any) -> RunResult:
    """Replace the object in the photo ``scene`` with the subject of the photo ``subject``.

    Writes the run directory ``out`` and returns the best image, the LoRA directory, the losses
    (``bg`` included) and the task (``result.task.labels``, ``.mask``, ...). ``options`` are
    :class:`EditConfig` fields (``subject_class``, ``input_class``, ``mask``, ``bg_weight``, ``model``,
    ``max_steps``, ...).
    """
    return run_edit(EditConfig(subject=Path(subject), input=Path(scene), **options), out, overwrite=overwrite)
