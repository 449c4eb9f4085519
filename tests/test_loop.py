"""The loop's semantics on a synthetic problem: early stopping, best tracking, NaN, stopping."""

from __future__ import annotations

import math

import pytest
import torch

from siso.loop import EarlyStopping, LoopSettings, Optimization


def reference_rule(losses: list[float], pct: float, patience: int) -> int | None:
    """The authors' early stopping, restated from their code (siso_generation_*.py): on their loss
    -(sum of weighted cosines), an iteration improves when ``loss < best * (1 + pct / 100)``, ``best``
    being the loss of the last improvement (inf at first). Returns the iteration that stops the run."""
    best, count = math.inf, 0
    for step, loss in enumerate(losses):
        if loss < best * (1 + pct / 100):
            best, count = loss, 0
        else:
            count += 1
        if count >= patience:
            return step
    return None


def test_early_stopping_measures_pct_of_the_summed_cosines_as_the_reference_does():
    """DINO + IR (offset 2): siso's total 0.60 is the reference's -1.40. Iteration 1 cuts the total by
    5 %, which a rule on siso's (1 - cos) distances would call an improvement; it raises the summed
    cosines by 2.1 % only, so the reference's rule (3 % of them) does not, and neither does siso's."""
    stopper = EarlyStopping(pct=3.0, patience=3, offset=2.0)
    assert not stopper.update(0.60) and stopper.reference == pytest.approx(-1.40)
    assert 0.57 < 0.60 * (1 - 0.03)  # 3 % better by the distances ...
    assert not stopper.update(0.57) and stopper.stale == 1  # ... but -1.43 is not below -1.40 * 1.03 = -1.442
    assert not stopper.update(0.56) and stopper.stale == 2  # -1.44: still not
    assert not stopper.update(0.55) and stopper.stale == 0  # -1.45 < -1.442: improved
    assert stopper.reference == pytest.approx(-1.45)
    assert not stopper.update(0.555) and stopper.stale == 1
    assert not stopper.update(0.50) and stopper.stale == 0  # -1.50 < -1.45 * 1.03 = -1.4935: improved


@pytest.mark.fidelity("loop.early_stopping_rule")
def test_early_stopping_is_the_reference_rule_step_by_step():
    totals = [0.60, 0.57, 0.56, 0.55, 0.555, 0.56, 0.545]
    stopper = EarlyStopping(pct=3.0, patience=3, offset=2.0)
    # The reference's losses: -1.40 (first: improves), -1.43, -1.44 (neither beats -1.442), -1.45 (beats it),
    # -1.445, -1.44, -1.455 (none beats -1.45 * 1.03 = -1.4935): the third of these stops the run.
    assert [stopper.update(t) for t in totals] == [False, False, False, False, False, False, True]
    assert reference_rule([t - 2.0 for t in totals], 3.0, 3) == 6


@pytest.mark.fidelity("loop.early_stopping_loss")
@pytest.mark.parametrize("offset", [1.0, 2.0, 1.5])
def test_early_stopping_stops_exactly_where_the_reference_stops(offset):
    """On random loss curves, siso's stopper (fed siso's totals) stops at the reference's iteration."""
    gen = torch.Generator().manual_seed(int(offset * 10))
    stops = []
    for _ in range(50):
        totals = (0.6 + 0.05 * torch.randn(40, generator=gen).cumsum(0) / 4).clamp(0.01, 1.9).tolist()
        expected = reference_rule([t - offset for t in totals], 3.0, 7)
        stopper = EarlyStopping(pct=3.0, patience=7, offset=offset)
        stopped = next((step for step, total in enumerate(totals) if stopper.update(total)), None)
        assert stopped == expected
        stops.append(stopped)
    assert len(set(stops)) > 3, "the curves must stop at varied iterations for this to mean something"


def test_zero_percent_threshold_accepts_any_improvement():
    stopper = EarlyStopping(pct=0.0, patience=1, offset=1.0)
    assert not stopper.update(0.5)
    assert not stopper.update(0.499)
    assert stopper.update(0.499)


def scripted_problem(losses: list[float], settings: LoopSettings, offset: float = 2.0):
    """A one-parameter problem whose loss at iteration i is ``losses[i]`` (and differentiable)."""
    weight = torch.nn.Parameter(torch.zeros(1))
    calls = {"render": 0}

    def render():
        calls["render"] += 1
        return torch.full((1, 3, 4, 4), 0.5) + weight.view(1, 1, 1, 1) * 0

    def loss_fn(image):
        value = losses[calls["render"] - 1]
        total = (image.mean() - 0.5) + weight.sum() * 0 + value
        return {"dino": total, "total": total}

    def snapshot():
        return {"step": calls["render"] - 1}

    return Optimization(render=render, loss_fn=loss_fn, params=[weight], snapshot=snapshot, settings=settings,
                        early_stop_offset=offset), calls


def test_loop_stops_early_and_keeps_the_lowest_loss():
    losses = [1.0, 0.8, 0.79, 0.795, 0.81, 0.9, 0.7]
    opt, _ = scripted_problem(losses, LoopSettings(max_steps=50, early_stop_pct=3, early_stop_patience=3))
    events = list(opt)
    assert [e.step for e in events] == [0, 1, 2, 3, 4]
    assert opt.stop_reason == "early_stop"
    assert opt.best_step == 2 and opt.best_lora == {"step": 2}
    assert [e.is_best for e in events] == [True, True, True, False, False]
    assert [e.best_step for e in events] == [0, 1, 2, 2, 2]
    assert [h["total"] for h in opt.history] == pytest.approx(losses[:5])


def test_loop_runs_to_max_steps():
    opt, calls = scripted_problem([1.0 - 0.1 * i for i in range(10)], LoopSettings(max_steps=4))
    assert len(list(opt)) == 4 and calls["render"] == 4
    assert opt.stop_reason == "max_steps" and opt.best_step == 3


def test_nan_stops_and_keeps_the_best_finite_iteration():
    opt, _ = scripted_problem([1.0, 0.5, math.nan, 0.1], LoopSettings(max_steps=10))
    events = list(opt)
    assert len(events) == 3 and opt.stop_reason == "nan"
    assert opt.best_step == 1 and not events[2].is_best


def test_request_stop_finishes_the_current_iteration():
    opt, calls = scripted_problem([1.0 - 0.01 * i for i in range(20)], LoopSettings(max_steps=20))
    seen = []
    for event in opt:
        seen.append(event.step)
        if event.step == 2:
            opt.request_stop()
    assert seen == [0, 1, 2] and calls["render"] == 3
    assert opt.stop_reason == "interrupted" and opt.best_step == 2


def test_iterating_again_continues_the_run():
    opt, _ = scripted_problem([1.0 - 0.01 * i for i in range(20)], LoopSettings(max_steps=20))
    for event in opt:
        if event.step == 1:
            opt.request_stop()
    optimizer = opt._optimizer
    steps = [event.step for event in opt]
    assert steps == list(range(2, 20)) and opt._optimizer is optimizer
    assert opt.stop_reason == "max_steps" and len(opt.history) == 20


def clipped_adamw_reference(scales, start, lr, max_norm, weight_decay=0.0):
    """The loop's update, transcribed: gradient of ``scale * |w|^2 / 2`` at each step, its norm clipped to
    ``max_norm``, then torch's AdamW (the reference's optimiser)."""
    weight = torch.nn.Parameter(torch.tensor(start))
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    for scale in scales:
        weight.grad = scale * weight.detach().clone()
        torch.nn.utils.clip_grad_norm_([weight], max_norm)
        optimizer.step()
    return weight.detach()


def scaled_problem(scales, max_norm, extra: torch.nn.Parameter | None = None):
    """A loss whose gradient is ``scale_t * w`` at iteration t, so the gradient's norm changes from step to
    step: AdamW normalises a constant scale away, so only clipping makes the steps differ from unclipped ones.
    ``extra`` joins the loss (it gets gradients) but not the optimiser, like a trainable table nobody steps."""
    weight = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    calls = iter(range(len(scales) + 1))

    def loss_fn(image):
        scale = scales[min(next(calls), len(scales) - 1)]
        total = scale * (weight**2).sum() / 2 + image.sum() * 0
        if extra is not None:
            total = total + 1e3 * (extra**2).sum()
        return {"total": total}

    opt = Optimization(render=lambda: weight.view(1, 2, 1, 1).expand(1, 2, 2, 2).sum(1, keepdim=True)
                       .expand(1, 3, 2, 2), loss_fn=loss_fn, params=[weight], snapshot=lambda: weight.detach().clone(),
                       settings=LoopSettings(max_steps=len(scales) + 1, learning_rate=0.1, adam_weight_decay=0.0,
                                             max_grad_norm=max_norm, early_stop_patience=100))
    list(opt)
    return weight.detach()


@pytest.mark.fidelity("loop.clipped_parameters")
def test_the_lora_is_updated_with_adamw_and_clipping():
    """Steps whose gradient norms differ (36, 0.36, 3.6): clipped to 1.0, AdamW moves the weights as the
    transcription above does, and differently from the same run without clipping; a parameter outside
    the optimiser (with a huge gradient of its own) changes nothing: the loop clips the LoRA only."""
    scales = [10.0, 0.1, 1.0]
    ours = scaled_problem(scales, max_norm=1.0)
    assert torch.allclose(ours, clipped_adamw_reference(scales, [3.0, -2.0], 0.1, 1.0), atol=1e-6)
    unclipped = scaled_problem(scales, max_norm=1e9)
    assert torch.allclose(unclipped, clipped_adamw_reference(scales, [3.0, -2.0], 0.1, 1e9), atol=1e-6)
    assert (ours - unclipped).abs().max() > 1e-3, "clipping must show in the trajectory for this test to mean much"
    stale = torch.nn.Parameter(torch.tensor([5.0, 5.0]))
    assert torch.allclose(scaled_problem(scales, max_norm=1.0, extra=stale), ours, atol=1e-7)
    assert torch.equal(stale.detach(), torch.tensor([5.0, 5.0]))  # not stepped


def test_extend_continues_an_early_stopped_run_with_fresh_patience():
    losses = [1.0, 1.0, 1.0, 0.5, 0.45, 0.4, 0.4]
    opt, _ = scripted_problem(losses, LoopSettings(max_steps=50, early_stop_pct=3, early_stop_patience=2))
    assert [e.step for e in opt] == [0, 1, 2] and opt.stop_reason == "early_stop"
    opt.extend(3)
    assert [e.step for e in opt] == [3, 4, 5] and opt.stop_reason == "max_steps"
    assert opt.best_step == 5
