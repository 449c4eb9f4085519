"""The shape every similarity model shares: differentiable preprocessing, then an embedding.

Like a torchmetrics metric, each model carries flags describing itself and is used the same way
as a loss (gradients flow to the image) and as a benchmark metric (under ``torch.no_grad``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side (bicubic), centre-crop a square, normalise: the timm/open_clip eval recipe."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: (B, 3, H, W) in [0, 1]; returns the normalised (B, 3, crop, crop) model input.

        Only torch ops, so gradients reach the generated image.
        """
        height, width = images.shape[-2:]
        short, long = min(height, width), max(height, width)
        # torchvision's Resize(int) rule: the long side is truncated, not rounded.
        new_long = int(self.resize * long / short)
        size = (self.resize, new_long) if height <= width else (new_long, self.resize)
        if (height, width) != size:
            # antialias matters only when shrinking (large subject photos); it matches PIL there.
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        top = int(round((size[0] - self.crop) / 2.0))
        left = int(round((size[1] - self.crop) / 2.0))
        images = images[..., top : top + self.crop, left : left + self.crop]
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std


class SimilarityModel(nn.Module):
    """A frozen image-embedding model used as a perceptual identity distance.

    Subclasses set ``name`` and ``preprocessing`` and implement :meth:`forward` on preprocessed pixels.
    """

    name: str = ""
    higher_is_better: bool = True  # cosine similarity of the embeddings
    is_differentiable: bool = True
    preprocessing: Preprocessing

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def check_source(cls, source: str) -> None:
        """Refuse a source that cannot be this model, cheaply and before any model loads (subclasses
        check what they can without loading weights)."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> (B, D) embeddings, differentiable w.r.t. ``images``."""
        dtype = next(self.parameters()).dtype
        pixel_values = self.preprocessing(images.float()).to(dtype)
        return self.forward(pixel_values).float()
