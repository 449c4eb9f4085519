"""Similarity models by name; adding one is a new file and a line here."""

from __future__ import annotations

import torch

from .base import Preprocessing, SimilarityModel
from .dino import DinoSimilarity
from .ir import IRSimilarity
from .loss import SimilarityLoss

SIMILARITY_MODELS: dict[str, type[SimilarityModel]] = {"dino": DinoSimilarity, "ir": IRSimilarity}

__all__ = ["SIMILARITY_MODELS", "DinoSimilarity", "IRSimilarity", "Preprocessing", "SimilarityLoss",
           "SimilarityModel", "load_similarity"]


def load_similarity(name: str, source: str, device: torch.device, dtype: torch.dtype) -> SimilarityModel:
    return SIMILARITY_MODELS[name].from_pretrained(source, device=device, dtype=dtype)
