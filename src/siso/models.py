"""Keep loaded models across runs: loading SDXL takes longer than a whole personalisation.

The web app and the benchmark's workers hold one cache each; a plain CLI run needs none.
"""

from __future__ import annotations

import torch

from .backbones import Backbone, load_backbone
from .similarity import SimilarityModel, load_similarity


class ModelCache:
    """Loaded backbones and similarity models by (source, device, dtype). Not thread-safe: one
    optimisation at a time per cache (per GPU)."""

    def __init__(self) -> None:
        self._backbones: dict[tuple, Backbone] = {}
        self._similarity: dict[tuple, SimilarityModel] = {}

    def backbone(self, model: str, device: torch.device, dtype: torch.dtype) -> Backbone:
        key = (model, str(device), dtype)
        if key not in self._backbones:
            self._backbones[key] = load_backbone(model, device, dtype)
        return self._backbones[key]

    def similarity(self, name: str, source: str, device: torch.device, dtype: torch.dtype) -> SimilarityModel:
        key = (name, source, str(device), dtype)
        if key not in self._similarity:
            self._similarity[key] = load_similarity(name, source, device, dtype)
        return self._similarity[key]

    def has_similarity(self, name: str, source: str) -> bool:
        """Whether a similarity model from ``source`` is loaded (on any device)."""
        return any(key[:2] == (name, source) for key in self._similarity)

    def add_backbone(self, model: str, device: torch.device, dtype: torch.dtype, backbone: Backbone) -> None:
        """Register an already-built backbone under ``model`` (benchmarks build random-weight ones)."""
        self._backbones[(model, str(device), dtype)] = backbone

    def add_similarity(self, name: str, source: str, device: torch.device, dtype: torch.dtype,
                       model: SimilarityModel) -> None:
        self._similarity[(name, source, str(device), dtype)] = model

    def clear(self) -> None:
        self._backbones.clear()
        self._similarity.clear()
