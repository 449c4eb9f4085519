"""siso: Single Image Subject Optimization.

Personalise a text-to-image model from one photo of a subject, at inference time::

    import siso
    result = siso.generate("dog.jpg", "a photo of a dog", out="runs/dog")
    image = siso.render("stabilityai/sdxl-turbo", "a dog on the moon", lora=result.lora_dir)
    edited = siso.edit("dog.jpg", "scene.jpg", out="runs/swap")  # put the dog into the scene

The heavy libraries (torch, diffusers) load on first use, so ``siso --help`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "EditConfig": "config",
    "GenerateConfig": "config",
    "RenderConfig": "config",
    "SisoError": "errors",
    "GenerateResult": "generation",
    "GenerationSession": "generation",
    "generate": "generation",
    "optimize": "generation",
    "run_generation": "generation",
    "StepEvent": "optimize",
    "EditResult": "editing",
    "EditSession": "editing",
    "edit": "editing",
    "run_edit": "editing",
    "render": "rendering",
}

__all__ = [
    "EditConfig",
    "EditResult",
    "EditSession",
    "GenerateConfig",
    "GenerateResult",
    "GenerationSession",
    "RenderConfig",
    "SisoError",
    "StepEvent",
    "edit",
    "generate",
    "optimize",
    "render",
    "run_edit",
    "run_generation",
]

if TYPE_CHECKING:
    from .config import EditConfig, GenerateConfig, RenderConfig
    from .editing import EditResult, EditSession, edit, run_edit
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
