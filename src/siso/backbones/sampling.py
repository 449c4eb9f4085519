"""The one differentiable sampler: which denoising steps carry gradients is decided here and nowhere else."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .base import Backbone, Conditioning


@dataclass(frozen=True)
class StartPoint:
    """Where a render resumes part-way instead of starting from the seed's noise (editing: an
    inverted photo).

    ``scheduler`` stands in for the pipeline's own during these steps (editing's samplers), and
    ``step_kwargs`` holds one mapping per timestep (an ancestral sampler's fixed step noise), or
    nothing.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor  # the steps still to run, noisiest first
    scheduler: Any
    step_kwargs: tuple[Mapping[str, Any], ...] = ()


@contextlib.contextmanager
def scheduler_swapped(backbone: Backbone, scheduler: Any) -> Iterator[None]:
    """Run with ``scheduler`` in place of the pipeline's own; the original comes back afterwards.

    Set on the instance directly: ``DiffusionPipeline.__setattr__`` would also rewrite the
    pipeline's config, and a cached pipeline must come out exactly as it went in.
    """
    pipeline = backbone.pipeline
    original = pipeline.scheduler
    object.__setattr__(pipeline, "scheduler", scheduler)
    try:
        yield
    finally:
        object.__setattr__(pipeline, "scheduler", original)


def render(backbone: Backbone, cond: Conditioning, seed: int, resolution: int,
           num_steps: int, grad_steps: int, start: StartPoint | None = None) -> torch.Tensor:
    """Sample an image from the seed's fixed noise; only the last ``grad_steps`` steps carry autograd.

    This is the only place in siso that decides which denoising steps are differentiated: the
    earlier steps run under ``no_grad`` (their LoRA effect is real, but not optimised through),
    and nothing is differentiated at all when the caller disabled gradients.

    With ``start``, sampling resumes from its latents with its scheduler and runs its timesteps
    (``num_steps`` must be their number; ``seed`` and ``resolution`` are not used).
    """
    if not 0 <= grad_steps <= num_steps:
        raise ValueError(f"grad_steps must be in [0, {num_steps}], got {grad_steps}")
    if start is None:
        latents, step_kwargs = backbone.initial_latents(seed, resolution, cond)
        timesteps = backbone.set_timesteps(num_steps, resolution)
        per_step: Sequence[Mapping[str, Any]] = [step_kwargs] * len(timesteps)
        sampler = contextlib.nullcontext()
    else:
        if len(start.timesteps) != num_steps or len(start.step_kwargs) not in (0, num_steps):
            raise ValueError(f"the start point has {len(start.timesteps)} timesteps and "
                             f"{len(start.step_kwargs)} step kwargs; num_steps is {num_steps}")
        latents, timesteps = start.latents, start.timesteps
        per_step = start.step_kwargs or [{}] * num_steps
        sampler = scheduler_swapped(backbone, start.scheduler)
    first_grad_step = len(timesteps) - grad_steps
    want_grad = torch.is_grad_enabled()
    with sampler:
        for index, timestep in enumerate(timesteps):
            with torch.set_grad_enabled(want_grad and index >= first_grad_step):
                latents = backbone.denoise_step(latents, timestep, cond, per_step[index])
    with torch.set_grad_enabled(want_grad and grad_steps > 0):
        return backbone.decode(latents)
