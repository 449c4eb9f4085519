"""Crop images to their subject before comparing identities (the ImagenHub/SISO protocol).

A cropper is any callable ``(images, labels) -> boxes``: ``images`` is (B, 3, H, W) in [0, 1],
``labels`` the class name of each image's subject, ``boxes`` a (B, 4) tensor of pixel corners
(x0, y0, x1, y1). Tests inject a fixed box; the default finds the box with Grounding DINO.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..errors import SisoError
from ..model_ids import CROP_MODEL

Cropper = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]


def whole_image_boxes(images: torch.Tensor) -> torch.Tensor:
    height, width = images.shape[-2:]
    return images.new_tensor([[0.0, 0.0, float(width), float(height)]]).expand(images.shape[0], 4).clone()


def crop_to_boxes(images: torch.Tensor, boxes: torch.Tensor) -> list[torch.Tensor]:
    """Cut each image to its box, rounded outwards to whole pixels; returns (1, 3, h, w) crops.

    A box that is empty after clipping to the image keeps the whole image rather than failing.
    """
    height, width = images.shape[-2:]
    crops = []
    for image, box in zip(images, boxes.tolist(), strict=True):
        x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
        x1, y1 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
        if x1 <= x0 or y1 <= y0:
            x0, y0, x1, y1 = 0, 0, width, height
        crops.append(image[None, :, y0:y1, x0:x1])
    return crops


class RememberingCropper:
    """A cropper that answers again from memory when asked about the very same images tensor and
    labels: each identity metric of a collection (DINO, IR, CLIP-I) asks about the same batch, and
    Grounding DINO runs once for all of them. The tensors are held, so ``is`` never matches a new
    tensor at a reused address; :meth:`forget` drops them."""

    def __init__(self, cropper: Cropper, size: int = 2) -> None:
        self.cropper = cropper
        self.size = size
        self._memory: list[tuple[torch.Tensor, tuple[str, ...], torch.Tensor]] = []

    def __call__(self, images: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        labels = tuple(labels)
        for tensor, names, boxes in self._memory:
            if tensor is images and names == labels:
                return boxes
        boxes = self.cropper(images, labels)
        self._memory = [(images, labels, boxes), *self._memory][: self.size]
        return boxes

    def forget(self) -> None:
        self._memory = []


class FixedBoxCropper:
    """The same relative box for every image: (x0, y0, x1, y1) as fractions of the width/height."""

    def __init__(self, box: Sequence[float] = (0.0, 0.0, 1.0, 1.0)) -> None:
        if len(box) != 4 or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise ValueError(f"box must be (x0, y0, x1, y1) fractions with x0 < x1 and y0 < y1, got {box}")
        self.box = tuple(float(v) for v in box)

    def __call__(self, images: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        height, width = images.shape[-2:]
        scale = images.new_tensor([width, height, width, height], dtype=torch.float32)
        return (images.new_tensor(self.box, dtype=torch.float32) * scale).expand(images.shape[0], 4).clone()


class GroundingDinoCropper(nn.Module):
    """The highest-scoring Grounding DINO box for the prompt "a {label}." in each image.

    When nothing clears the thresholds the whole image is kept (and counted in ``misses``), as
    an evaluation must score every image. The thresholds are Grounding DINO's usual defaults.
    """

    def __init__(self, model: nn.Module, processor, box_threshold: float = 0.35,
                 text_threshold: float = 0.25) -> None:
        super().__init__()
        self.model = model
        self.processor = processor
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.misses = 0

    @classmethod
    def from_pretrained(cls, source: str = CROP_MODEL, device: torch.device | str = "cpu",
                        **kwargs) -> GroundingDinoCropper:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        try:
            processor = AutoProcessor.from_pretrained(source)
            # Detection stays in fp32: it is small, and box scores near the threshold are fragile in bf16.
            model = GroundingDinoForObjectDetection.from_pretrained(source)
        except Exception as err:  # hub errors come in many types; the message is what matters
            raise SisoError(
                f"Could not load the Grounding DINO detector {source!r} ({err.__class__.__name__}: {err}). Pass a "
                f"Hub id such as {CROP_MODEL} or a local directory with --crop-model (the first "
                "use of a Hub id needs internet access), or --no-crop to compare whole images."
            ) from err
        return cls(model.to(device).eval().requires_grad_(False), processor, **kwargs)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, labels: Sequence[str]) -> torch.Tensor:
        if len(labels) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
        device = next(self.model.parameters()).device
        height, width = images.shape[-2:]
        boxes = whole_image_boxes(images).float().cpu()
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            inputs = self.processor(images=[image.detach().float().clamp(0, 1).cpu()], text=[f"a {label}."],
                                    do_rescale=False, return_tensors="pt").to(device)
            outputs = self.model(**inputs)
            found = self.processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=self.box_threshold, text_threshold=self.text_threshold,
                target_sizes=[(height, width)],
            )[0]
            if len(found["scores"]):
                boxes[index] = found["boxes"][found["scores"].argmax()].float().cpu()
            else:
                self.misses += 1
        return boxes.to(images.device)
