"""The mask of the object an edit replaces: the user's drawing, or Grounding DINO + SAM.

Grounding DINO finds "a {class}." in the scene, SAM turns the best box into a mask as the reference
implementation does: the union of SAM's candidate masks, then only its largest region, with holes
filled (the reference fills the largest contour). 1 marks the object to replace, 0 the background
the edit must keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import SisoError
from ..images import load_image


def square_crop(image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize the shorter side to ``size`` and take the centred ``size`` x ``size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    new = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new != image.size:
        image = image.resize(new, resample)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the framed scene's pixels
    score: float
    phrase: str


@dataclass
class ObjectMask:
    """(1, 1, H, W) float mask, 1 on the object to replace; and how it was made."""

    mask: torch.Tensor
    source: str  # "user" or "grounding_dino+sam"
    path: Path | None = None
    detection: Detection | None = None
    detections: int = 0

    @property
    def background(self) -> torch.Tensor:
        return 1.0 - self.mask

    def to_image(self) -> Image.Image:
        return Image.fromarray((self.mask[0, 0].cpu().numpy() * 255).astype(np.uint8), mode="L")

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"source": self.source, "object_fraction": round(float(self.mask.mean()), 4)}
        if self.path is not None:
            record["path"] = str(self.path)
        if self.detection is not None:
            record.update(box=[round(v, 1) for v in self.detection.box], score=round(self.detection.score, 4),
                          phrase=self.detection.phrase, detections=self.detections)
        return record


def _checked(binary: np.ndarray, what: str, advice: str) -> torch.Tensor:
    if not binary.any():
        raise SisoError(f"{what} is empty (all background): there is no object to replace. {advice}")
    if binary.all():
        raise SisoError(f"{what} covers the whole image: no background is left to keep. {advice}")
    return torch.from_numpy(binary.astype(np.float32))[None, None]


def largest_region_filled(binary: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of ``binary`` with its holes filled; all False if it is empty.

    The reference traces the union mask's outer contours, keeps the one of largest area and fills
    it as a polygon; the filled largest region is the same set of pixels up to the contour's own
    one-pixel rasterisation (and, between two near-equal regions, area by pixel count rather than
    by polygon area).
    """
    from scipy import ndimage

    labels, count = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return np.zeros_like(binary, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(sizes.argmax()) + 1)
    return ndimage.binary_fill_holes(largest)


def load_user_mask(path: str | Path, scene_size: tuple[int, int], resolution: int) -> ObjectMask:
    """Read the user's mask: any image, white (> 50 % grey) on the object to replace.

    It must have the scene photo's size (it is then framed like the scene) or be the framed
    ``resolution`` square itself (e.g. drawn over a run's input.png).
    """
    path = Path(path)
    image = load_image(path, "mask").convert("L")
    if image.size == scene_size:
        image = square_crop(image, resolution, Image.Resampling.BILINEAR)
    elif image.size != (resolution, resolution):
        raise SisoError(
            f"The mask {path} is {image.width}x{image.height} pixels, but the scene photo is "
            f"{scene_size[0]}x{scene_size[1]}: draw the mask at the scene's size (or at {resolution}x{resolution} "
            "over input.png of an earlier run) so that it lines up with the photo."
        )
    binary = np.asarray(image) >= 128
    mask = _checked(binary, f"The mask {path}, binarised at 50 % grey,",
                    "Paint the object to replace white and everything to keep black.")
    return ObjectMask(mask, "user", path=path)


class ObjectFinder:
    """Grounding DINO (text -> boxes) and SAM (box -> mask), both transformers models."""

    def __init__(self, detector: Any, detector_processor: Any, segmenter: Any, segmenter_processor: Any) -> None:
        self.detector = detector
        self.detector_processor = detector_processor
        self.segmenter = segmenter
        self.segmenter_processor = segmenter_processor

    @classmethod
    def from_pretrained(cls, detector: str, segmenter: str, device: torch.device | str = "cpu") -> ObjectFinder:
        # float32 on purpose: both are small, and Grounding DINO's deformable attention is touchy in half precision.
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor, SamModel, SamProcessor

        loaded = []
        for flag, source, model_cls, processor_cls in (
            ("--detector-model", detector, GroundingDinoForObjectDetection, GroundingDinoProcessor),
            ("--segmenter-model", segmenter, SamModel, SamProcessor),
        ):
            try:
                model = model_cls.from_pretrained(source).to(device).eval().requires_grad_(False)
                processor = processor_cls.from_pretrained(source)
            except Exception as err:  # hub errors come in many types; the message is what matters
                raise SisoError(
                    f"Could not load {model_cls.__name__} from {source!r} ({err.__class__.__name__}: {err}). Pass a "
                    f"Hub id or directory with {flag}, or draw the object's mask yourself and pass --mask MASK.png."
                ) from err
            loaded += [model, processor]
        return cls(*loaded)

    @property
    def device(self) -> torch.device:
        return next(self.detector.parameters()).device

    @torch.no_grad()
    def detect(self, image: Image.Image, class_name: str, box_threshold: float,
               text_threshold: float) -> list[Detection]:
        """Boxes for "a {class_name}." above the thresholds, best first."""
        inputs = self.detector_processor(images=image, text=f"a {class_name.lower()}.", return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        outputs = self.detector(**inputs)
        result = self.detector_processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=box_threshold, text_threshold=text_threshold,
            target_sizes=[(image.height, image.width)],
        )[0]
        special = set(self.detector_processor.tokenizer.all_special_tokens)
        detections = [
            Detection(tuple(float(v) for v in box), float(score),
                      " ".join(word for word in str(phrase).split() if word not in special))
            for box, score, phrase in zip(result["boxes"].cpu(), result["scores"].cpu(), result["text_labels"],
                                          strict=True)
        ]
        return sorted(detections, key=lambda d: d.score, reverse=True)

    @torch.no_grad()
    def segment(self, image: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
        """SAM's mask for ``box``: (H, W) bool, the union of its candidates, largest region filled."""
        inputs = self.segmenter_processor(images=image, input_boxes=[[list(box)]], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        outputs = self.segmenter(**inputs)
        masks = self.segmenter_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu(),
        )[0]  # (boxes, candidates, H, W) bool
        return largest_region_filled(masks[0].any(dim=0).numpy())

    def find(self, image: Image.Image, class_name: str, box_threshold: float, text_threshold: float,
             scene: str = "the scene") -> ObjectMask:
        detections = self.detect(image, class_name, box_threshold, text_threshold)
        if not detections:
            raise SisoError(
                f'Grounding DINO found no "{class_name}" in {scene} at --box-threshold {box_threshold} '
                f"(--text-threshold {text_threshold}). Name the object to replace with --input-class, lower "
                "--box-threshold, or draw its mask and pass --mask MASK.png."
            )
        best = detections[0]
        mask = _checked(self.segment(image, best.box), f'SAM\'s mask of the "{class_name}" found in {scene}',
                        "Draw the object's mask yourself and pass --mask MASK.png.")
        return ObjectMask(mask, "grounding_dino+sam", detection=best, detections=len(detections))
