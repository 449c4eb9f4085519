"""The real architectures of every backbone siso supports, built from benchmarks/configs/ (no download).

Each ``configs/<name>.json`` holds one checkpoint's component configs as its Hub repository has them
(``_source`` says where each number comes from): diffusers models by ``_class_name``, transformers
models by ``architectures``, tokenizers by ``_tokenizer`` (the tests' local ones: the benchmarks feed
no real text, only the real sequence lengths), and the pipeline class in ``_pipeline``. Built on
``device`` directly (``torch.device("meta")`` for shapes only, a GPU for timing), never initialised on
the CPU first.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny tokenizers

#: the checkpoints with a config here, by siso family (the first is the one the family's preset is for)
CHECKPOINTS: dict[str, tuple[str, ...]] = {
    "sd-turbo": ("sd-turbo",),
    "sdxl-turbo": ("sdxl-turbo",),
    "flux-schnell": ("flux-schnell",),
    "sana": ("sana",),
    "sd3.5-turbo": ("sd3.5-large-turbo",),
    "sana-sprint": ("sana-sprint-1.6b", "sana-sprint-0.6b"),
    "flux2-klein": ("flux2-klein-4b", "flux2-klein-9b"),
    "z-image-turbo": ("z-image-turbo",),
}


def load_config(name: str) -> dict[str, Any]:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def tokenizer(kind: str):
    import tiny

    return {"clip": tiny.diffusion.clip_tokenizer, "t5": tiny.transformer.t5_tokenizer,
            "gemma": tiny.transformer.gemma_tokenizer, "qwen": tiny.flow.qwen_tokenizer}[kind]()


def build_component(spec: dict[str, Any], device: torch.device | str, dtype: torch.dtype):
    """One component from its config entry, its weights allocated on ``device`` in ``dtype``."""
    import diffusers
    import transformers

    spec = dict(spec)
    if "_tokenizer" in spec:
        return tokenizer(spec["_tokenizer"])
    if "_class_name" in spec:
        cls = getattr(diffusers, spec.pop("_class_name"))
        if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):  # a scheduler
            return cls.from_config(spec)
        with torch.device(device):
            return cls.from_config(spec).to(dtype).eval().requires_grad_(False)
    cls = getattr(transformers, spec.pop("architectures")[0])
    spec.pop("model_type", None)
    with torch.device(device):
        return cls(cls.config_class(**spec)).to(dtype).eval().requires_grad_(False)


def build_pipeline(name: str, device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16,
                   skip: tuple[str, ...] = ()):
    """The checkpoint ``name``'s pipeline at its real shapes, random weights; components in ``skip`` are None
    (where the pipeline allows it)."""
    import diffusers

    config = load_config(name)
    parts = {key: None if key in skip else build_component(spec, device, dtype)
             for key, spec in config.items() if not key.startswith("_")}
    pipeline_class = getattr(diffusers, config["_pipeline"])
    extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False} \
        if config["_pipeline"] == "StableDiffusionPipeline" else {}
    if config["_pipeline"] == "StableDiffusionXLPipeline":
        extra = {"add_watermarker": False}
    return pipeline_class(**parts, **config.get("_pipeline_kwargs", {}), **extra)


def similarity_models(device: torch.device | str = "meta", dtype: torch.dtype = torch.bfloat16):
    """DINOv2-L and the IR tower at their real shapes (the paper's two similarity models)."""
    from transformers import Dinov2Config, Dinov2Model

    from siso.similarity.ir import SisoIRConfig, SisoIRModel

    with torch.device(device):
        dino = Dinov2Model(Dinov2Config(**load_config("similarity")["dinov2-large"]))
        ir = SisoIRModel(SisoIRConfig())  # its defaults are the real IR tower
    return {name: model.to(dtype).eval().requires_grad_(False) for name, model in (("dino", dino), ("ir", ir))}
