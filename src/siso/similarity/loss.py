"""The SISO similarity loss: a weighted sum of (1 - cosine) distances to the subject photo(s)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import SimilarityModel


class SimilarityLoss(nn.Module):
    """``L = sum_m w_m * (1 - mean_r cos(e_m(image), e_m(reference_r)))``.

    The reference embeddings are computed once, here; each call embeds only the generated image.
    """

    def __init__(self, models: Mapping[str, SimilarityModel], weights: Mapping[str, float],
                 references: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.models = nn.ModuleDict(dict(models))
        self.weights = dict(weights)
        with torch.no_grad():
            for name, model in self.models.items():
                device = next(model.parameters()).device
                # Photos differ in size, so each is embedded on its own.
                embeddings = torch.cat([model.embed(ref.to(device)) for ref in references])
                self.register_buffer(f"reference_{name}", F.normalize(embeddings, dim=-1), persistent=False)

    @property
    def offset(self) -> float:
        """``total - offset`` is the reference's loss ``-sum_m w_m cos_m`` (what early stopping measures)."""
        return float(sum(self.weights[name] for name in self.models))

    def distances(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per model, the mean over references of 1 - cosine similarity, shape (B,)."""
        out = {}
        for name, model in self.models.items():
            embedding = F.normalize(model.embed(images), dim=-1)
            reference = getattr(self, f"reference_{name}")
            out[name] = 1.0 - (embedding @ reference.T).mean(dim=-1)
        return out

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Scalar losses for a single image (batch mean otherwise): each distance and ``total``."""
        losses = {name: value.mean() for name, value in self.distances(images).items()}
        losses["total"] = sum(self.weights[name] * value for name, value in losses.items())
        return losses
