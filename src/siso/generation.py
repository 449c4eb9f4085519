"""Generation: optimise a LoRA so the model's image of a prompt shows the subject of the photo(s).

The task the session template runs (:class:`GenerateTask`: the subject photos in, a render from the
seed's fixed noise, the similarity loss), and the library calls over it: ``optimize()`` streams the
events, ``start_generation()`` gives a :class:`~siso.run.Run` to iterate, ``generate()`` runs it to
the end and writes the run directory.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .backbones import Backbone, render
from .config import GenerateConfig
from .images import load_image, working_copy
from .lora import LoraAdapter, lora_parameter_groups
from .models import ModelCache
from .run import Run, RunResult, run_to_end, start_run
from .session import Session, Task
from .similarity import SimilarityLoss


class GenerateTask(Task):
    """A generation: render ``prompt`` from the seed's noise, ``denoise_steps`` steps with gradients
    through the last ``grad_steps``, and compare it with the subject photo(s)."""

    kind = "generate"
    config: GenerateConfig

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.config.train_text_encoder)

    def load_inputs(self) -> list[Image.Image]:
        return [working_copy(load_image(path, "subject photo")) for path in self.config.subjects]

    def prepare(self, backbone: Backbone,
                similarity: SimilarityLoss) -> tuple[Callable[[], torch.Tensor], SimilarityLoss]:
        config = self.config
        for tokenizer, tokens, kept in backbone.prompt_cuts(config.prompt):
            self.notes.append(f"The prompt is {tokens} tokens long for {tokenizer}, which reads the first {kept} "
                              f"(special tokens included); the rest is ignored. Shorten it to keep every word.")

        def render_with(cond):
            return render(backbone, cond, config.seed, config.resolution, config.denoise_steps, config.grad_steps)

        if config.train_text_encoder:
            # The text encoders are being trained, so the prompt must be encoded anew each time
            # (backbones cache what their frozen encoders compute, e.g. FLUX's T5).
            return (lambda: render_with(backbone.encode_prompt(config.prompt, config.resolution))), similarity
        with torch.no_grad():
            cond = backbone.encode_prompt(config.prompt, config.resolution)
        return (lambda: render_with(cond)), similarity

    def parameter_groups(self, adapter: LoraAdapter, denoiser_name: str) -> list[dict]:
        return lora_parameter_groups(adapter, denoiser_name, self.config.text_encoder_learning_rate,
                                     self.config.text_encoder_weight_decay)

    def memory_hints(self) -> list[str]:
        return ["dropping --train-text-encoder"] if self.config.train_text_encoder else []

    def lora_title(self) -> str:
        return f"siso LoRA: {self.config.prompt}"


def prepare_generation(config: GenerateConfig, cache: ModelCache | None = None) -> Session:
    """Load everything a generation needs, writing nothing; fails fast (before any model loads) on bad inputs."""
    return Session(GenerateTask(config), cache)


def start_generation(config: GenerateConfig, out: str | Path, overwrite: bool = False,
                     cache: ModelCache | None = None) -> Run:
    """Check ``out``, load the models, then create the run directory (a failed start leaves none).
    Iterate ``run.steps()``, then call ``run.finish()`` and ``run.close()``."""
    return start_run(GenerateTask(config), out, overwrite, cache)


def run_generation(config: GenerateConfig, out: str | Path, overwrite: bool = False,
                   cache: ModelCache | None = None) -> RunResult:
    """Prepare, optimise and write the run directory; Ctrl-C and NaN keep the best so far."""
    return run_to_end(start_generation(config, out, overwrite, cache))


def _config(subject: str | Path | list[str | Path], prompt: str, options: dict[str, Any]) -> GenerateConfig:
    subjects = tuple(subject) if isinstance(subject, (list, tuple)) else (subject,)
    return GenerateConfig(subjects=subjects, prompt=prompt, **options)


def optimize(subject: str | Path | list[str | Path], prompt: str, **options: Any) -> Session:
    """Stream a generation: ``for event in siso.optimize("dog.jpg", "a photo of a dog"): ...``.

    ``options`` are :class:`GenerateConfig` fields. Nothing is written to disk; call
    ``session.save_lora(dir)`` to keep the best LoRA.
    """
    return prepare_generation(_config(subject, prompt, options))


def generate(subject: str | Path | list[str | Path], prompt: str, out: str | Path, *, overwrite: bool = False,
             **options: Any) -> RunResult:
    """Personalise the model on the subject photo(s) and write the run directory ``out``.

    Returns the best image, the LoRA directory (loadable by ``pipe.load_lora_weights``) and the
    per-iteration losses. ``options`` are :class:`GenerateConfig` fields (``model``, ``seed``,
    ``max_steps``, ``learning_rate``, ...).
    """
    return run_generation(_config(subject, prompt, options), out, overwrite=overwrite)
