"""Backbone registry: the adapter is chosen from the checkpoint's model_index.json."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SisoError
from ..hub import read_model_index
from ..pipeline_files import check_pipeline_folder
from ..sources import check_source
from .base import Backbone, Conditioning
from .flux import FluxBackbone
from .flux2 import Flux2KleinBackbone
from .loading import load_pipeline_as, weight_variants
from .sampling import StartPoint, render
from .sana import SanaBackbone
from .sana_sprint import SanaSprintBackbone
from .stable_diffusion import StableDiffusionBackbone
from .stable_diffusion_3 import StableDiffusion3Backbone
from .stable_diffusion_xl import StableDiffusionXLBackbone
from .z_image import ZImageBackbone

BACKBONES: list[type[Backbone]] = [
    StableDiffusionBackbone, StableDiffusionXLBackbone, FluxBackbone, SanaBackbone,
    StableDiffusion3Backbone, SanaSprintBackbone, Flux2KleinBackbone, ZImageBackbone,
]

__all__ = ["BACKBONES", "Backbone", "Conditioning", "StartPoint", "backbone_class_for", "load_backbone", "render",
           "weight_variants"]


def _supported() -> str:
    return ", ".join(name for cls in BACKBONES for name in cls.pipeline_classes)


def read_pipeline_class(model: str) -> str:
    """The ``_class_name`` in the model's model_index.json (a Hub id or a local directory)."""
    check_source(model, "--model")  # a missing directory is missing, not a failed download
    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise SisoError(
            f"{model} is not a diffusers pipeline directory (it has no model_index.json). "
            "Pass a Hub id such as stabilityai/sdxl-turbo or a directory saved with save_pretrained."
        )
    if path.exists():  # every file named before the weights load: a damaged copy is named for what it is
        return check_pipeline_folder(path, model).get("_class_name", "")
    try:
        config = read_model_index(model)  # fails fast, with its own SisoError, when the Hub is unreachable
    except SisoError:
        raise
    except Exception as err:  # huggingface_hub raises several types for "not found / offline"
        raise SisoError(
            f"Could not read the model index of {model!r}: {err.__class__.__name__}. Check the id or path; "
            "the first run of a Hub model needs internet access (or HF_HUB_OFFLINE unset) to download it."
        ) from err
    return config.get("_class_name", "")


def backbone_class_for(model: str) -> type[Backbone]:
    class_name = read_pipeline_class(model)
    for cls in BACKBONES:
        if class_name in cls.pipeline_classes:
            return cls
    raise SisoError(f"{model} is a {class_name or 'unknown'} checkpoint, which siso does not support; "
                    f"supported pipelines: {_supported()}.")


def load_backbone(model: str, device: torch.device, dtype: torch.dtype) -> Backbone:
    """Load a diffusers checkpoint by Hub id or directory, frozen, on ``device`` in ``dtype``, behind the
    adapter its model_index.json names."""
    return load_pipeline_as(backbone_class_for(model), model, device, dtype)
