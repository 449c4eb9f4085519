"""DINOv2 through transformers: the CLS token after the final layer norm (``pooler_output``)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, PretrainedConfig

from ..errors import SisoError
from ..sources import check_source
from .base import Preprocessing, SimilarityModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoSimilarity(SimilarityModel):
    name = "dino"

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # timm's eval recipe for DINOv2 (crop_pct 1.0): shorter side to the model's native size
        # (518 for facebook/dinov2-*), centre crop, ImageNet statistics.
        size = int(model.config.image_size)
        self.preprocessing = Preprocessing(resize=size, crop=size, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output

    @classmethod
    def check_source(cls, source: str) -> None:
        """A local path must exist, and the config (small; downloaded first for a Hub id) must be DINOv2's."""
        check_source(source, "--dino-model")
        if (Path(source).expanduser() / "model_index.json").is_file():
            raise SisoError(f"--dino-model {source} is a diffusers pipeline (it has a model_index.json), not DINOv2; "
                            "pass e.g. facebook/dinov2-large, or a directory of it saved with save_pretrained.")
        try:
            model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
        except Exception as err:  # hub errors come in many types; the message is what matters
            raise SisoError(
                f"Could not find the DINO model {source!r} ({err.__class__.__name__}). Pass a Hub id such as "
                "facebook/dinov2-large or a local directory with --dino-model; the first use of a Hub id needs "
                "internet access to download it."
            ) from err
        if model_type != "dinov2":
            what = f"a {model_type} model" if model_type else (
                "not a transformers model (its config.json names no model_type: a diffusers model?)")
            raise SisoError(f"--dino-model {source} is {what}, not DINOv2; pass e.g. facebook/dinov2-large.")

    @classmethod
    def from_pretrained(cls, source: str, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> DinoSimilarity:
        cls.check_source(source)
        try:
            model = AutoModel.from_pretrained(source, dtype=dtype)
        except Exception as err:  # hub errors come in many types; the message is what matters
            raise SisoError(
                f"Could not load the DINO model {source!r} ({err.__class__.__name__}: {err}). Pass a Hub id "
                "such as facebook/dinov2-large or a local directory with --dino-model."
            ) from err
        return cls(model.to(device).eval().requires_grad_(False))
