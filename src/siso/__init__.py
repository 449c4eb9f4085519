"""siso: Single Image Subject Optimization.

Personalise a text-to-image model from one photo of a subject, at inference time::

    import siso
    result = siso.generate("dog.jpg", "a photo of a dog", out="runs/dog")
    image = siso.render("stabilityai/sdxl-turbo", "a dog on the moon", lora=result.lora_dir)
"""

from __future__ import annotations

from .config import GenerateConfig, RenderConfig
from .errors import SisoError
from .generation import GenerateResult, GenerationSession, generate, optimize, run_generation
from .optimize import StepEvent
from .rendering import render

__version__ = "0.1.0"

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
