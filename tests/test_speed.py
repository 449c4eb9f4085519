"""The fast path: --compile (exact against eager, cached on disk, safe on cached models) and the memory
savers chosen from the GPU's free memory (exact, recorded, forced by --low-memory / --no-low-memory).

Compiling runs inductor on the CPU: its C++ builds take minutes on a small machine the first time, so
the compiled tests share one tiny configuration (same shapes), and every compilation after the first
finds its kernels in the session's compile cache.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RESOLUTION
from helpers import is_compiled, plain_render, run_captured, tiny_config

from siso import speed
from siso.backbones import load_backbone, memory
from siso.backbones.memory import ACTIVATION_HEADROOM, MEMORY_TIERS, MemoryPlan
from siso.errors import SisoError
from siso.generation import prepare_generation, run_generation, start_generation
from siso.lora import lora_components
from siso.models import ModelCache

CPU = torch.device("cpu")


def free_memory(monkeypatch, gib: float | None) -> None:
    """Pretend the device is a GPU with ``gib`` free (the only GPU-specific input of the policy)."""
    monkeypatch.setattr(memory, "cuda_free_memory_gib", lambda device: gib)


# -- memory ----------------------------------------------------------------------------------------
def test_forced_and_non_gpu_memory_plans(sd_dir):
    backbone = load_backbone(str(sd_dir), CPU, torch.float32)
    assert backbone.choose_memory_plan(True, 512).tier == "checkpoint-all"
    assert backbone.choose_memory_plan(True, 512).reason == "--low-memory"
    assert backbone.choose_memory_plan(False, 512).tier == "plain"
    plan = backbone.choose_memory_plan(None, 512)  # the CPU: nothing to save
    assert plan.tier == "plain" and "cpu device" in plan.reason and plan.free_gib is None


def test_auto_memory_plan_takes_the_fastest_tier_that_fits(model_dir, monkeypatch):
    """Each tier is chosen exactly when the free memory covers its estimate (scaled with the pixel count
    and the dtype's size) plus the margin; below the lightest tier's need, the lightest is still chosen."""
    backbone = load_backbone(str(model_dir), CPU, torch.float32)
    estimates = backbone.activation_estimate()  # a tiny model takes the smallest counted checkpoint's
    assert estimates == min(type(backbone).activation_gib_512.items())[1]
    assert list(estimates) == list(MEMORY_TIERS)
    assert estimates["plain"] > estimates["checkpoint-vae"] > estimates["checkpoint-all"]
    for resolution in (512, 1024):
        scale = (resolution / 512) ** 2 * 2  # fp32 activations are twice bf16's
        needs = {tier: estimates[tier] * scale * ACTIVATION_HEADROOM + backbone.memory_margin_gib
                 for tier in MEMORY_TIERS}
        for index, tier in enumerate(MEMORY_TIERS):
            free_memory(monkeypatch, needs[tier])
            plan = backbone.choose_memory_plan(None, resolution)
            assert plan.tier == tier and plan.free_gib == needs[tier] and plan.reason.startswith("auto")
            free_memory(monkeypatch, needs[tier] - 0.01)
            below = MEMORY_TIERS[min(index + 1, len(MEMORY_TIERS) - 1)]
            assert backbone.choose_memory_plan(None, resolution).tier == below
        free_memory(monkeypatch, 0.5)
        assert "less than" in backbone.choose_memory_plan(None, resolution).reason
    assert (backbone.choose_memory_plan(True, 512).tier, backbone.choose_memory_plan(False, 512).tier) == (
        "checkpoint-all", "plain")  # forcing ignores the free memory


def test_auto_memory_plan_is_applied_recorded_and_reset_on_a_cached_backbone(sd_dir, dino_dir, subject_photo,
                                                                             tmp_path, monkeypatch):
    cache = ModelCache()
    with cache.lease(str(sd_dir), CPU, torch.float32) as backbone:
        pass
    scale = (RESOLUTION / 512) ** 2 * 2  # fp32
    needs = {tier: gib * scale * ACTIVATION_HEADROOM + backbone.memory_margin_gib
             for tier, gib in backbone.activation_estimate().items()}
    free_memory(monkeypatch, needs["checkpoint-all"])
    run = start_generation(tiny_config(sd_dir, subject_photo, dino_dir, max_steps=1), tmp_path / "tight", cache=cache)
    assert run.session.backbone is backbone
    assert backbone.denoiser.is_gradient_checkpointing and backbone.pipeline.vae.is_gradient_checkpointing
    result = run_captured(run).result
    memory = json.loads((result.run_dir / "run.json").read_text())["memory"]
    assert memory == {"tier": "checkpoint-all", "denoiser_checkpointing": True, "vae_checkpointing": True,
                      "reason": memory["reason"], "free_gib": round(needs["checkpoint-all"], 2)}
    assert memory["reason"].startswith(f"auto: {needs['checkpoint-all']:.1f} GiB free")
    # Handed back to the cache, the backbone has no savers of that run's any more.
    assert not backbone.denoiser.is_gradient_checkpointing and not backbone.pipeline.vae.is_gradient_checkpointing

    free_memory(monkeypatch, needs["checkpoint-vae"])
    session = prepare_generation(tiny_config(sd_dir, subject_photo, dino_dir), cache=cache)
    assert session.memory.tier == "checkpoint-vae" and session.backbone is backbone
    assert not backbone.denoiser.is_gradient_checkpointing and backbone.pipeline.vae.is_gradient_checkpointing
    free_memory(monkeypatch, needs["plain"])
    session = prepare_generation(tiny_config(sd_dir, subject_photo, dino_dir), cache=cache)
    assert session.memory.tier == "plain" and session.record()["memory"]["tier"] == "plain"
    assert not backbone.denoiser.is_gradient_checkpointing and not backbone.pipeline.vae.is_gradient_checkpointing
    session = prepare_generation(tiny_config(sd_dir, subject_photo, dino_dir, low_memory=True), cache=cache)
    assert session.memory.reason == "--low-memory" and backbone.denoiser.is_gradient_checkpointing


def test_every_memory_tier_is_exact(sd_dir, dino_dir, subject_photo):
    """Checkpointing reruns the forward in backward: each tier gives the same images and losses, step by step."""
    runs = {}
    for tier in MEMORY_TIERS:
        session = prepare_generation(tiny_config(sd_dir, subject_photo, dino_dir, max_steps=3, low_memory=False))
        session.backbone.apply_memory_plan(MemoryPlan(tier, "test"))
        assert session.backbone.denoiser.is_gradient_checkpointing == (tier == "checkpoint-all")
        assert session.backbone.pipeline.vae.decoder.gradient_checkpointing == (tier != "plain")
        events = list(session)
        runs[tier] = ([e.image for e in events], [e.losses["total"] for e in events])
    images, losses = runs["plain"]
    assert (images[-1] - images[0]).abs().max() > 1e-4, "the LoRA must move for the comparison to mean much"
    for tier in MEMORY_TIERS[1:]:
        assert runs[tier][1] == pytest.approx(losses, abs=1e-6)
        assert all((a - b).abs().max() <= 1e-5 for a, b in zip(runs[tier][0], images, strict=True))


def test_the_command_line_says_which_memory_savers_run(run_siso, tmp_path, sd_dir, dino_dir, subject_photo):
    out = tmp_path / "run"
    code, text = run_siso("generate", "--subject", subject_photo, "--prompt", "a photo of a dog", "--out", out,
                          "--model", sd_dir, "--dino-model", dino_dir, "--resolution", RESOLUTION, "--device", "cpu",
                          "--max-steps", "1", "--low-memory")
    assert code == 0, text
    text = " ".join(text.split())  # rich wraps long lines off a terminal
    assert "Memory: gradient checkpointing in the denoiser and the VAE decoder (--low-memory)" in text
    record = json.loads((out / "run.json").read_text())
    assert record["memory"]["tier"] == "checkpoint-all" and record["config"]["low_memory"] is True
    assert record["compile"] == {"enabled": False, "requested": "off", "mode": None, "modules": [], "cache_dir": None}
    code, text = run_siso("generate", "--help")
    text = " ".join(text.split())
    assert "--compile" in text and "--no-low-memory" in text and "single run" in text


# -- compile: the choices, without compiling ------------------------------------------------------
def test_compile_choices(monkeypatch):
    cuda = torch.device("cuda")
    assert speed.compile_wanted(None, cuda) and not speed.compile_wanted(None, CPU)
    assert speed.compile_wanted(True, CPU) and not speed.compile_wanted(False, cuda)
    monkeypatch.delenv(speed.MODE_ENV, raising=False)
    assert speed.compile_mode(cuda) == "reduce-overhead" and speed.compile_mode(CPU) == "default"
    monkeypatch.setenv(speed.MODE_ENV, "default")
    assert speed.compile_mode(cuda) == "default"
    monkeypatch.setenv(speed.MODE_ENV, "fastest")
    with pytest.raises(SisoError, match="SISO_COMPILE_MODE"):
        speed.compile_mode(cuda)


def test_cuda_graph_modes_mark_each_iteration(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    render = lambda: torch.zeros(1)  # noqa: E731
    graphs = speed.CompileRecord(enabled=True, requested="auto", mode="reduce-overhead")
    speed.mark_iterations(render, graphs)()
    speed.mark_iterations(render, graphs)()
    assert len(marks) == 2
    for record in (speed.CompileRecord(enabled=True, requested="on", mode="default"),
                   speed.CompileRecord(enabled=False, requested="off")):
        assert speed.mark_iterations(render, record) is render


def test_inductor_is_configured_with_its_cache_in_sisos_cache_dir(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("SISO_CACHE_DIR", str(tmp_path / "siso"))
    for inductor_default in (None, default_cache_dir()):  # unset, or set by inductor to its /tmp default
        if inductor_default is None:
            monkeypatch.delenv(speed.INDUCTOR_CACHE_ENV, raising=False)
        else:
            monkeypatch.setenv(speed.INDUCTOR_CACHE_ENV, inductor_default)
        assert speed.configure_inductor() == tmp_path / "siso" / "torch-compile"
    monkeypatch.setenv(speed.INDUCTOR_CACHE_ENV, str(tmp_path / "mine"))  # the user's choice stands
    assert speed.configure_inductor() == tmp_path / "mine"
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    assert inductor_config.layout_optimization is False  # inexact gradients (see siso.speed)


# -- compile: inductor on the CPU -----------------------------------------------------------------
def compiled_config(sd_dir, subject_photo, dino_dir, ir_dir, **overrides):
    """The one compiled configuration (tiny SD-Turbo, DINO + IR, rank 4, 32 px) every compiled test shares."""
    return tiny_config(sd_dir, subject_photo, dino_dir, ir_model=str(ir_dir), compile=True, low_memory=False,
                       **overrides)


def iteration(session) -> tuple[torch.Tensor, dict[str, float], list[torch.Tensor]]:
    """One iteration of the session's own render and loss: image, losses and the LoRA's gradients."""
    optimization = session.optimization
    image = optimization.render()
    losses = optimization.loss_fn(image)
    losses["total"].backward()
    grads = [p.grad.detach().clone() for p in optimization.parameters]
    for p in optimization.parameters:
        p.grad = None
    return image.detach(), {k: float(v.detach()) for k, v in losses.items()}, grads


def test_compiled_iterations_equal_eager(sd_dir, dino_dir, ir_dir, subject_photo, monkeypatch, tmp_path):
    """Inductor-compiled denoiser, VAE decoder and similarity towers give the eager image, losses and LoRA
    gradients, at the first LoRA and after in-place updates of it (which compiled code must see)."""
    monkeypatch.delenv(speed.INDUCTOR_CACHE_ENV, raising=False)
    session = prepare_generation(compiled_config(sd_dir, subject_photo, dino_dir, ir_dir))
    compiled = session.compiled
    assert compiled.enabled and compiled.requested == "on" and compiled.mode == "default"
    assert compiled.modules == ("denoiser", "vae_decoder", "dino", "ir")
    modules = speed.iteration_modules(session.backbone, session.loss)
    assert all(is_compiled(m) for m in modules.values())
    assert session.record()["compile"]["enabled"] is True
    params = session.optimization.parameters
    with torch.no_grad():  # B = 0 at first: give the LoRA an effect, so its A matrices get gradients too
        for p in params:
            p.add_(torch.randn_like(p) * 0.02)
    images = []
    for _ in range(3):
        image, losses, grads = iteration(session)
        for module in modules.values():
            speed.set_compiled(module, None)
        eager_image, eager_losses, eager_grads = iteration(session)
        for module in modules.values():
            speed.set_compiled(module, compiled.mode)
        assert (image - eager_image).abs().max() <= 1e-5
        assert losses == pytest.approx(eager_losses, abs=1e-5)
        for grad, eager_grad in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(grad, eager_grad, rtol=1e-3, atol=1e-6)
        images.append(image)
        with torch.no_grad():  # an Adam-sized step in place, as the optimiser takes it
            for p, g in zip(params, eager_grads, strict=True):
                p.sub_(5e-3 * g.sign())
    assert (images[-1] - images[0]).abs().max() > 1e-3, "the LoRA must move for the comparison to mean much"
    assert any((speed.compile_cache_dir() / "fxgraph").rglob("*")), "compiled code must land in siso's cache"


def test_compiled_loop_on_a_cached_backbone(sd_dir, dino_dir, ir_dir, subject_photo, tmp_path):
    """The loop itself, compiled, tracks the eager loop; a cached model is compiled once, starts the next
    run from the untouched model with its new LoRA, and runs eagerly again when a run does not compile."""
    eager = run_generation(tiny_config(sd_dir, subject_photo, dino_dir, ir_model=str(ir_dir), max_steps=3,
                                       low_memory=False), tmp_path / "eager")
    cache = ModelCache()
    first = run_generation(compiled_config(sd_dir, subject_photo, dino_dir, ir_dir, max_steps=3), tmp_path / "first",
                           cache=cache)
    assert json.loads((first.run_dir / "run.json").read_text())["compile"]["enabled"] is True
    assert first.history[0]["total"] == pytest.approx(eager.history[0]["total"], abs=1e-6)
    # Later steps follow AdamW's updates, which magnify float noise in the gradients (a sign-like step on
    # every element): close, not equal. test_compiled_iterations_equal_eager is the exact check.
    assert [h["total"] for h in first.history] == pytest.approx([h["total"] for h in eager.history], rel=1e-2)

    with cache.lease(str(sd_dir), CPU, torch.float32) as backbone:
        denoiser_call = backbone.denoiser._compiled_call_impl
    captured = run_captured(start_generation(compiled_config(sd_dir, subject_photo, dino_dir, ir_dir, max_steps=2),
                                             tmp_path / "second", cache=cache))
    second = captured.result
    assert backbone.denoiser._compiled_call_impl is denoiser_call, "a cached model must not be compiled twice"
    # Step 0 of the second run is the untouched model's image: the old LoRA is gone, the new one is zero.
    assert (captured.events[0].image - plain_render(sd_dir)).abs().max().item() <= 1e-5
    assert second.best_step is not None and json.loads((second.run_dir / "run.json").read_text())["lora_step"] == (
        second.best_step)
    assert lora_components(backbone) == []  # handed back clean

    third = run_generation(tiny_config(sd_dir, subject_photo, dino_dir, ir_model=str(ir_dir), max_steps=1),
                           tmp_path / "third", cache=cache)
    assert not is_compiled(backbone.denoiser)
    assert json.loads((third.run_dir / "run.json").read_text())["compile"]["enabled"] is False
