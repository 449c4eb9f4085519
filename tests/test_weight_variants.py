"""Lighter first downloads: half-precision runs load a repository's fp16 weight files when it has them
(SDXL-Turbo: ~7 GB instead of ~14), the full files otherwise; fp32 runs load the full files first.

Tiny pipelines saved with ``save_pretrained(variant="fp16")`` stand in for the Hub's layouts: only fp16
files, both, none, and a mix (some components with fp16 files only, the others with full files only).
"""

from __future__ import annotations

import shutil

import pytest
import tiny
import torch

from siso.backbones import load_backbone, weight_variants

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def original():
    """The fp32 weights every layout is saved from."""
    return tiny.diffusion.sd_pipeline()


@pytest.fixture(scope="module")
def layouts(original, tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    full, half = root / "full", root / "fp16"
    original.save_pretrained(full)
    tiny.diffusion.sd_pipeline().to(torch.float16).save_pretrained(half, variant="fp16")
    both = root / "both"
    shutil.copytree(full, both)
    shutil.copytree(half, both, dirs_exist_ok=True)
    mixed = root / "mixed"  # the UNet and the VAE in fp16 files only, the text encoder in full files only
    shutil.copytree(half, mixed)
    shutil.rmtree(mixed / "text_encoder")
    shutil.copytree(full / "text_encoder", mixed / "text_encoder")
    return {"full": full, "fp16": half, "both": both, "mixed": mixed}


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


def assert_weights(backbone, original, via: dict[str, torch.dtype | None], dtype: torch.dtype) -> None:
    """Each component holds the original weights, rounded to fp16 first where ``via`` says so, in ``dtype``."""
    for name, rounding in via.items():
        loaded = weights(getattr(backbone.pipeline, name))
        for key, value in weights(getattr(original, name)).items():
            expected = (value.to(rounding) if rounding is not None else value).to(dtype)
            assert loaded[key].dtype == dtype
            assert torch.equal(loaded[key], expected), f"{name}.{key}"


COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.mark.parametrize("layout, dtype, variant, rounded", [
    ("fp16", torch.bfloat16, "fp16", COMPONENTS),   # only fp16 files: loaded, in bf16
    ("fp16", torch.float32, "fp16", COMPONENTS),    # ... and in fp32 too (the full files are missing)
    ("both", torch.bfloat16, "fp16", COMPONENTS),   # half precision prefers the lighter files
    ("both", torch.float32, None, ()),              # fp32 takes the exact full files
    ("full", torch.bfloat16, None, ()),             # no fp16 files: the full ones, cast to bf16
    ("mixed", torch.bfloat16, "fp16", ("unet", "vae")),
    ("mixed", torch.float32, "fp16", ("unet", "vae")),
])
def test_the_right_files_load_with_the_right_weights(layouts, original, layout, dtype, variant, rounded):
    backbone = load_backbone(str(layouts[layout]), CPU, dtype)
    assert backbone.weights_variant == variant
    assert_weights(backbone, original, {n: torch.float16 if n in rounded else None for n in COMPONENTS}, dtype)


def test_a_hub_model_whose_full_files_are_cached_is_not_downloaded_again(tmp_path):
    """In the Hugging Face cache layout: full files already there -> use them; otherwise the fp16 files."""
    def cache_with(repo: str, *files: str):
        folder = tmp_path / f"models--{repo.replace('/', '--')}"
        (folder / "refs").mkdir(parents=True)
        (folder / "refs" / "main").write_text("abc123")
        snapshot = folder / "snapshots" / "abc123"
        for name in ("model_index.json", *files):
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_text("{}")

    cache_with("org/full", "unet/diffusion_pytorch_model.safetensors")
    cache_with("org/half", "unet/diffusion_pytorch_model.fp16.safetensors")
    cache_with("org/sharded", "unet/diffusion_pytorch_model-00001-of-00002.safetensors")
    for dtype in (torch.bfloat16, torch.float16):
        assert weight_variants("org/full", dtype, hub_cache=tmp_path) == (None, "fp16")
        assert weight_variants("org/sharded", dtype, hub_cache=tmp_path) == (None, "fp16")
        assert weight_variants("org/half", dtype, hub_cache=tmp_path) == ("fp16", None)
        assert weight_variants("org/never-downloaded", dtype, hub_cache=tmp_path) == ("fp16", None)
    assert weight_variants("org/half", torch.float32, hub_cache=tmp_path) == (None, "fp16")
