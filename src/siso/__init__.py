"""siso: Single Image Subject Optimization.

Personalise a text-to-image model from one photo of a subject, at inference time::

    import siso
    result = siso.generate("dog.jpg", "a photo of a dog", out="runs/dog")
    image = siso.render("stabilityai/sdxl-turbo", "a dog on the moon", lora=result.lora_dir)

The heavy libraries (torch, diffusers) load on first use, so ``siso --help`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "GenerateConfig": "config",
    "RenderConfig": "config",
    "SisoError": "errors",
    "GenerateResult": "generation",
    "GenerationSession": "generation",
    "generate": "generation",
    "optimize": "generation",
    "run_generation": "generation",
    "StepEvent": "optimize",
    "render": "rendering",
}

__all__ = [
    "GenerateConfig",
    "GenerateResult",
    "GenerationSession",
    "RenderConfig",
    "SisoError",
    "StepEvent",
    "generate",
    "optimize",
    "render",
    "run_generation",
]

if TYPE_CHECKING:
    from .config import GenerateConfig, RenderConfig
    from .errors import SisoError
    from .generation import GenerateResult, GenerationSession, generate, optimize, run_generation
    from .optimize import StepEvent
    from .rendering import render


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'siso' has no attribute {name!r}")
