"""THE loop. It knows nothing of SD vs FLUX: it gets a render function, a loss function and the
LoRA parameters, and yields one event per iteration.

Everything else (run directory, progress bar, web app, Ctrl-C) hangs off the event stream.
Stopping at any point keeps the best iteration so far: the iteration with the lowest total loss,
with the LoRA that rendered it. Early stopping follows the authors' reference rule exactly, on
the reference's own loss (see :class:`EarlyStopping`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

STOP_REASONS = ("early_stop", "max_steps", "interrupted", "nan", "out_of_memory", "write_error")


@dataclass(frozen=True)
class LoopSettings:
    max_steps: int = 50
    learning_rate: float = 2e-4
    early_stop_pct: float = 3.0
    early_stop_patience: int = 7
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0

    @classmethod
    def from_config(cls, config: Any) -> LoopSettings:
        """The loop's share of a resolved run config (generation or editing: same field names)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class StepEvent:
    """One finished iteration: the image rendered with the LoRA as it was before this step's update."""

    step: int
    image: torch.Tensor  # (1, 3, H, W), CPU, float32, in [0, 1]
    losses: dict[str, float]
    is_best: bool
    best_step: int | None
    best_total: float
    seconds: float  # wall time of this iteration


class EarlyStopping:
    """Stop when the loss has not improved by ``pct`` % for ``patience`` iterations in a row: the
    authors' reference rule, applied to the reference's loss.

    siso reports distances, ``total = sum_m w_m (1 - cos_m)`` (+ ``c * bg`` when editing); the
    reference's loss is ``L_ref = -sum_m w_m cos_m`` (+ ``c * bg``), i.e. ``total - offset`` with
    ``offset = sum_m w_m``. An iteration improves when ``L_ref < ref * (1 + pct / 100)``, ``ref``
    being ``L_ref`` at the last improvement (``+inf`` at first). For a negative ``L_ref`` that asks
    for ``pct`` % of the summed cosines, not of the much smaller distances: the same iterations
    count as improvements as in the reference, so runs stop where its runs stopped.
    """

    def __init__(self, pct: float, patience: int, offset: float = 0.0) -> None:
        self.factor = 1.0 + pct / 100.0
        self.patience = patience
        self.offset = offset
        self.reference = math.inf
        self.stale = 0

    def update(self, total: float) -> bool:
        """Record siso's ``total`` loss of one iteration; True when the run should stop."""
        loss = total - self.offset
        if loss < self.reference * self.factor:  # inf * factor stays inf: the first finite loss improves
            self.reference = loss
            self.stale = 0
        else:
            self.stale += 1
        return self.stale >= self.patience


@dataclass
class Optimization:
    """An iterable optimisation: ``for event in optimization`` runs it, one event per iteration.

    ``render()`` must return an image in [0, 1] whose graph reaches ``params`` (parameters, or AdamW
    parameter groups: dicts with ``params`` and their own ``lr`` / ``weight_decay``);
    ``loss_fn(image)`` returns a dict of scalar tensors including ``total``; ``snapshot()`` copies
    the LoRA weights; ``early_stop_offset`` turns ``total`` into the reference's loss for early
    stopping (:class:`EarlyStopping`). After (or during) iteration, ``best_*``, ``history`` and
    ``stop_reason`` describe the run.
    """

    render: Callable[[], torch.Tensor]
    loss_fn: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    params: Sequence[torch.nn.Parameter] | Sequence[dict[str, Any]]
    snapshot: Callable[[], Any]
    settings: LoopSettings = field(default_factory=LoopSettings)
    early_stop_offset: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int | None = None
    best_total: float = math.inf
    best_image: torch.Tensor | None = None
    best_lora: Any = None
    stop_reason: str | None = None
    _stop_requested: bool = False
    _optimizer: torch.optim.Optimizer | None = None
    _stopper: EarlyStopping | None = None

    @property
    def parameters(self) -> list[torch.nn.Parameter]:
        """Every trained parameter, whether ``params`` lists them or groups them."""
        return [p for item in self.params for p in (item["params"] if isinstance(item, dict) else [item])]

    def extend(self, extra_steps: int) -> None:
        """Allow ``extra_steps`` more iterations with fresh early-stopping patience (Continue)."""
        self.settings = replace(self.settings, max_steps=len(self.history) + extra_steps)
        if self._stopper is not None:
            self._stopper.stale = 0

    def request_stop(self) -> None:
        """Stop after the current iteration (Ctrl-C, a Stop button); the best so far is kept."""
        self._stop_requested = True

    @property
    def stop_requested(self) -> bool:
        """A stop was asked for and the iteration in progress is the last."""
        return self._stop_requested

    def __iter__(self) -> Iterator[StepEvent]:
        s = self.settings
        # Created once: iterating again continues the run with the same optimiser state.
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(
                self.params, lr=s.learning_rate, betas=s.adam_betas, weight_decay=s.adam_weight_decay, eps=s.adam_eps
            )
            self._stopper = EarlyStopping(s.early_stop_pct, s.early_stop_patience, self.early_stop_offset)
        optimizer, stopper = self._optimizer, self._stopper
        # Clipped together, as the reference clips the denoiser's and the text encoders' LoRA.
        clipped = self.parameters
        self.stop_reason, self._stop_requested = None, False
        start_step = len(self.history)
        for step in range(start_step, s.max_steps):
            started = time.perf_counter()
            image = self.render()
            losses = self.loss_fn(image)
            total = losses["total"]
            values = {"step": step, **{name: float(value.detach()) for name, value in losses.items()}}
            self.history.append(values)
            finite = math.isfinite(values["total"])
            is_best = finite and values["total"] < self.best_total
            if is_best:
                # Snapshot before the update below: this image was made by these weights.
                self.best_step, self.best_total = step, values["total"]
                self.best_image = image.detach().float().cpu()
                self.best_lora = self.snapshot()
            if not finite:
                self.stop_reason = "nan"
            elif stopper.update(values["total"]):
                self.stop_reason = "early_stop"
            elif step == s.max_steps - 1:
                self.stop_reason = "max_steps"
            elif self._stop_requested:
                self.stop_reason = "interrupted"
            else:
                # Update before yielding, so the graph is freed while the consumer writes files.
                total.backward()
                torch.nn.utils.clip_grad_norm_(clipped, s.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            del total, losses
            event = StepEvent(
                step=step, image=image.detach().float().cpu(), losses=values, is_best=is_best,
                best_step=self.best_step, best_total=self.best_total, seconds=time.perf_counter() - started,
            )
            del image
            yield event
            if self.stop_reason is None and self._stop_requested:
                self.stop_reason = "interrupted"
            if self.stop_reason is not None:
                return
