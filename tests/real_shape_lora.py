"""siso's LoRA files at the real architectures' shapes, for the tests of the tools that load them.

Each checkpoint of benchmarks/configs/ is built on the meta device (``benchmarks/architectures.py``; the
text encoders that never carry a LoRA are left out), so the key sets are the real ones at no memory cost.
siso's own attach_lora / snapshot_lora / save_lora write the files; only the small LoRA layers are given
real (random) weights in between.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from siso.backbones import BACKBONES, Backbone
from siso.lora import (
    ADAPTER_NAME,
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    attach_lora,
    lora_components,
    save_lora,
    snapshot_lora,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import architectures  # noqa: E402

RANK = 4


def meta_backbone(checkpoint: str) -> Backbone:
    """The checkpoint's siso backbone, every weight on the meta device; frozen-only text encoders left out."""
    config = architectures.load_config(checkpoint)
    backbone_class = next(cls for cls in BACKBONES if config["_pipeline"] in cls.pipeline_classes)
    frozen = backbone_class.frozen_text_encoder_names
    pipeline = architectures.build_pipeline(checkpoint, skip=frozen)
    return backbone_class(pipeline, checkpoint)


def give_the_lora_real_weights(backbone: Backbone) -> None:
    """Only the LoRA layers leave the meta device (a few MB), with random values."""
    generator = torch.Generator().manual_seed(0)
    for name in lora_components(backbone):
        for module in getattr(backbone.pipeline, name).modules():
            if isinstance(module, BaseTunerLayer):
                for layers in (module.lora_A, module.lora_B):
                    layer = layers[ADAPTER_NAME].to_empty(device="cpu")
                    with torch.no_grad():
                        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))


def lora_module_paths(model: torch.nn.Module) -> set[str]:
    """Module paths (in the live model's own layout) that carry our LoRA."""
    return {path for path, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.lora_A}


def read(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    with safe_open(path, "pt") as file:
        keys = file.keys()
        return {key: tuple(file.get_slice(key).get_shape()) for key in keys}, file.metadata() or {}


class Saved:
    """What save_lora wrote for one checkpoint: the backbone it came from, the files' keys (with their
    shapes) and metadata, and where they are."""

    def __init__(self, checkpoint: str, train_text_encoder: bool, directory: Path) -> None:
        self.name = checkpoint
        self.train_text_encoder = train_text_encoder
        self.directory = directory
        self.backbone = meta_backbone(checkpoint)
        self.configs = architectures.load_config(checkpoint)
        attach_lora(self.backbone, RANK, train_text_encoder, seed=0)
        give_the_lora_real_weights(self.backbone)
        save_lora(self.backbone, snapshot_lora(self.backbone), directory, resolution=512)  # default formats
        self.diffusers_keys, _ = read(directory / DIFFUSERS_WEIGHT_NAME)
        self.has_kohya = (directory / KOHYA_WEIGHT_NAME).exists()
        self.kohya_keys, self.metadata = read(directory / KOHYA_WEIGHT_NAME) if self.has_kohya else ({}, {})


def saved_files(tmp_path_factory):
    """``get(checkpoint, train_text_encoder)``: built, attached and saved once per test module."""
    cache: dict[tuple[str, bool], Saved] = {}

    def get(checkpoint: str, train_text_encoder: bool) -> Saved:
        if (checkpoint, train_text_encoder) not in cache:
            directory = tmp_path_factory.mktemp(checkpoint) / "lora"
            cache[checkpoint, train_text_encoder] = Saved(checkpoint, train_text_encoder, directory)
        return cache[checkpoint, train_text_encoder]

    return get
