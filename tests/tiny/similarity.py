"""Tiny similarity models: a DINOv2 and an IR tower (overlapping patches), in their real layouts."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Dinov2Config, Dinov2Model


def dino_model() -> Dinov2Model:
    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=28,
        patch_size=7, layerscale_value=1.0,
    )
    return Dinov2Model(config)


def ir_dir(directory: Path) -> Path:
    """A tiny IR tower (overlapping patches, stride 12) in the layout `siso convert-ir` writes."""
    from siso.similarity.ir import SisoIRConfig, SisoIRModel

    torch.manual_seed(0)
    config = SisoIRConfig(
        hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2, num_attention_heads=2,
        image_size=38, patch_size=14, patch_stride=12, embedding_dim=16,
    )
    SisoIRModel(config).save_pretrained(directory)
    return directory
