"""Loading a backbone: the pipeline from its Hub id or directory, frozen, in its dtype, on its device."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from ..errors import SisoError
from .base import Backbone


def load_pipeline_as(cls: type[Backbone], model: str, device: torch.device, dtype: torch.dtype) -> Backbone:
    """Load a diffusers checkpoint by Hub id or directory as a ``cls`` backbone, frozen, on ``device`` in ``dtype``."""
    pipeline, variant = _load_pipeline(model, dtype)
    vae = getattr(pipeline, "vae", None)
    if dtype == torch.float16 and vae is not None and getattr(vae.config, "force_upcast", False):
        # This VAE overflows in fp16 (SDXL's does); keep it in fp32 as diffusers does when decoding.
        vae.to(torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    backbone = cls(pipeline, model, weights_variant=variant)
    backbone.place_on(device)  # the adapter may pick memory savers for the GPU first (FLUX does)
    return backbone


HALF_VARIANT = "fp16"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _load_pipeline(model: str, dtype: torch.dtype) -> tuple[DiffusionPipeline, str | None]:
    """The pipeline from its fp16 weight files or its full ones, whichever :func:`weight_variants`
    puts first; the other when those are missing. Returns the pipeline and the variant loaded."""
    order = weight_variants(model, dtype)
    errors = []
    for variant in order:
        try:
            return DiffusionPipeline.from_pretrained(model, dtype=dtype, variant=variant), variant
        except (OSError, ValueError) as err:
            # diffusers says ValueError("... variant=fp16, but no such modeling files are available") when
            # no component has the variant, and OSError("Error no file named ...") when a component has
            # only variant files; anything else fails the same way with either order.
            errors.append(err)
    # Both failed: the full files' error is the one that describes the repository.
    err = errors[order.index(None)]
    raise SisoError(f"Could not load the pipeline {model!r}: {err}") from err


def weight_variants(model: str, dtype: torch.dtype, hub_cache: str | Path | None = None) -> tuple[str | None, ...]:
    """Which weight files to try first: the fp16 variant (half the download: SDXL-Turbo ~7 GB instead
    of ~14) when the frozen weights are half precision anyway, else the full files.

    Loading fp16 files into bf16 rounds the weights twice (fp32 -> fp16 -> bf16), which differs from
    one rounding by at most one bf16 step, rarely; in fp32 the full files are the exact weights. A Hub
    model whose full files are already in the local cache keeps using them: no second download.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return (None, HALF_VARIANT)
    folder = Path(model) if Path(model).is_dir() else _cached_snapshot(model, hub_cache)
    if folder is not None and _has_weights(folder, variant=None) and not _has_weights(folder, HALF_VARIANT):
        return (None, HALF_VARIANT)
    return (HALF_VARIANT, None)


def _cached_snapshot(model: str, hub_cache: str | Path | None) -> Path | None:
    """The local Hub cache's snapshot of ``model`` (files downloaded before), if there is one."""
    from huggingface_hub import try_to_load_from_cache

    try:
        index = try_to_load_from_cache(model, "model_index.json", cache_dir=hub_cache)
    except ValueError:  # not a valid repo id
        return None
    return Path(index).parent if isinstance(index, str) else None


def _has_weights(folder: Path, variant: str | None) -> bool:
    """Whether any component folder holds weight files of ``variant`` (None: the full files)."""
    for path in folder.glob("*/*"):
        if not path.name.endswith(_WEIGHT_SUFFIXES) or not path.exists():  # exists(): a cache symlink may dangle
            continue
        parts = path.name.split(".")
        is_variant = len(parts) > 2 and parts[-2].split("-")[0] == HALF_VARIANT
        if is_variant == (variant == HALF_VARIANT):
            return True
    return False
