"""siso: Single Image Subject Optimization.

Personalise a text-to-image model from one photo of a subject, at inference time::

    import siso
    result = siso.generate("dog.jpg", "a photo of a dog", out="runs/dog")
    run = siso.start_generation(siso.GenerateConfig(subjects=("dog.jpg",), prompt="a photo of a dog"), "runs/dog2")
    for event in run.steps(): ...  # one event per iteration: the image, the losses, whether it is the best
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
    "EditSettings": "config",
    "GenerateConfig": "config",
    "GenerateSettings": "config",
    "RenderConfig": "config",
    "SisoError": "errors",
    "generate": "generation",
    "optimize": "generation",
    "run_generation": "generation",
    "start_generation": "generation",
    "StepEvent": "loop",
    "Run": "run",
    "RunResult": "run",
    "Session": "session",
    "edit": "editing",
    "run_edit": "editing",
    "start_edit": "editing",
    "render": "rendering",
}

__all__ = [
    "EditConfig",
    "EditSettings",
    "GenerateConfig",
    "GenerateSettings",
    "RenderConfig",
    "Run",
    "RunResult",
    "Session",
    "SisoError",
    "StepEvent",
    "edit",
    "generate",
    "optimize",
    "render",
    "run_edit",
    "run_generation",
    "start_edit",
    "start_generation",
]

if TYPE_CHECKING:
    from .config import EditConfig, EditSettings, GenerateConfig, GenerateSettings, RenderConfig
    from .editing import edit, run_edit, start_edit
    from .errors import SisoError
    from .generation import generate, optimize, run_generation, start_generation
    from .loop import StepEvent
    from .rendering import render
    from .run import Run, RunResult
    from .session import Session


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'siso' has no attribute {name!r}")
