"""The memory figures siso plans with are counted, and the counts are right and current.

benchmarks/count_memory.py counts, on the meta device, what every supported checkpoint keeps on the GPU
(weights exactly, and the activations autograd saves for backward); benchmarks/results/memory-512px.json
holds the counts; each adapter's ``activation_gib_512`` and docs/performance.md's table are those counts.
Here: the counter against a hand computation and against the same count on real tensors; the committed
file against a fresh count; the adapters and the docs against the file; and what the streaming rule
decides for the real checkpoints on common GPU sizes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import tiny
import torch

from siso.backbones import BACKBONES, memory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import architectures  # noqa: E402
import count_memory  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "memory-512px.json"
GPU_24GB = 23.6  # what torch reports for a 24 GB card (RTX 4090, L4: 22.0; A10: 22.2), in GiB


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads(RESULTS.read_text())


def test_the_counter_adds_up_what_autograd_saves_as_a_hand_computation_does():
    """Linear (frozen) -> GELU -> Linear (frozen), input requiring grad: the frozen layers save only their
    weights (not activations), GELU its input; attention keeps q, k, v, its output and a float32 log-sum-exp."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).requires_grad_(False)
    x = torch.randn(3, 5, 8, requires_grad=True)
    counted = count_memory.count_activations(mlp, lambda: mlp(x), blocks=[])
    assert counted.plain == 3 * 5 * 32 * 4  # the GELU's input, fp32

    q, k, v = (torch.randn(2, 4, 7, 16, requires_grad=True) for _ in range(3))
    attention = torch.nn.Identity()
    counted = count_memory.count_activations(
        attention, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), blocks=[])
    assert counted.plain == 4 * (2 * 4 * 7 * 16 * 4) + 2 * 4 * 7 * 4
    with torch.no_grad():
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with count_memory.fused_attention():  # the counting stand-in computes the real attention
        assert torch.equal(torch.nn.functional.scaled_dot_product_attention(q, k, v), expected)


def test_checkpointing_keeps_the_block_inputs_and_one_block_at_a_time():
    blocks = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)) for _ in range(3))
    model = torch.nn.Module()
    model.blocks = blocks
    model.requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)

    def run():
        h = x
        for block in blocks:
            h = torch.tanh(block(h))  # tanh between the blocks saves its output: outside any block
        return h

    counted = count_memory.count_activations(model, run)
    per_block, between, block_input = 4 * 32 * 4, 4 * 8 * 4, 4 * 8 * 4
    assert counted.plain == 3 * per_block + 3 * between
    assert counted.checkpointed == 3 * between + 3 * block_input + per_block


def test_the_meta_count_equals_the_count_on_real_tensors():
    """The meta device saves what a real forward saves: a tiny SD3 transformer (LoRA attached, as counted)
    and a tiny VAE decoder, counted on real CPU tensors and on meta copies of themselves."""
    from peft import LoraConfig, inject_adapter_in_model

    pipeline = tiny.flow.sd3_pipeline()
    real = {"transformer": pipeline.transformer, "vae": pipeline.vae}
    with torch.device("meta"):
        meta = {name: type(module).from_config(module.config) for name, module in real.items()}
    counts = {}
    for device, modules in (("cpu", real), ("meta", meta)):
        transformer, vae = modules["transformer"], modules["vae"]
        inject_adapter_in_model(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), transformer)
        cfg = transformer.config
        x = torch.zeros(1, cfg.in_channels, 8, 8, device=device, requires_grad=True)
        context = torch.zeros(1, 12, cfg.joint_attention_dim, device=device)
        pooled = torch.zeros(1, cfg.pooled_projection_dim, device=device)
        t = torch.ones(1, device=device)
        z = torch.zeros(1, vae.config.latent_channels, 8, 8, device=device, requires_grad=True)
        counts[device] = (
            count_memory.count_activations(transformer, lambda tr=transformer, x=x, c=context, p=pooled, t=t: tr(
                hidden_states=x, timestep=t, encoder_hidden_states=c, pooled_projections=p)),
            count_memory.count_activations(vae.decoder, lambda v=vae, z=z: v.decode(z)),
        )
    assert counts["meta"] == counts["cpu"]
    assert all(c.plain > c.checkpointed > 0 for c in counts["cpu"])


def test_the_committed_counts_are_current(report):
    """A fresh count of every checkpoint equals benchmarks/results/memory-512px.json (rerun the script after
    changing a LoRA target, a preset's steps or prompt length, or a config)."""
    similarity = count_memory.count_similarity()
    fresh = [count_memory.count_checkpoint(result["checkpoint"], similarity) for result in report["results"]]
    assert fresh == report["results"]
    assert [r["checkpoint"] for r in fresh] == [n for names in architectures.CHECKPOINTS.values() for n in names]


def test_every_adapter_plans_with_the_counts(report):
    counted: dict[str, dict[float, dict[str, float]]] = {}
    for result in report["results"]:
        size = result["parameters_billion"].get("unet", result["parameters_billion"].get("transformer"))
        tiers = {tier: round(gib, 2) for tier, gib in result["activations_gib"]["tiers"].items()}
        counted.setdefault(result["backbone"], {})[size] = tiers
        assert result["weights_gib"]["similarity (DINOv2-L + IR)"] == pytest.approx(memory.SIMILARITY_WEIGHTS_GIB,
                                                                                    abs=0.005)
    assert {cls.__name__: dict(cls.activation_gib_512) for cls in BACKBONES} == counted


def test_the_docs_table_is_the_counts(report):
    text = (ROOT / "docs" / "performance.md").read_text()
    assert count_memory.markdown(report) in text


def meta_backbone(checkpoint: str):
    pipeline = architectures.build_pipeline(checkpoint)
    cls = next(c for c in BACKBONES if type(pipeline).__name__ in c.pipeline_classes)
    return cls(pipeline, checkpoint)


@pytest.mark.parametrize("checkpoint,streams_on_24gb", [
    ("flux-schnell", True), ("sd3.5-large-turbo", True), ("flux2-klein-9b", True),
    ("flux2-klein-4b", False), ("z-image-turbo", False), ("sana-sprint-1.6b", False), ("sdxl-turbo", False),
])
def test_what_the_real_checkpoints_do_on_a_24gb_card_and_on_an_80gb_one(monkeypatch, report, checkpoint,
                                                                        streams_on_24gb):
    """On the real architectures' weights: the families too large for a 24 GB card stream there and
    nowhere larger; and by the same estimates, every checkpoint then fits the card."""
    backbone = meta_backbone(checkpoint)
    gpu = torch.device("cuda")
    for size, streams in ((GPU_24GB, streams_on_24gb), (80.0, False)):
        monkeypatch.setattr(memory, "cuda_memory_gib", lambda device, size=size: size)
        assert backbone.needs_streaming(gpu) == streams, size
    result = next(r for r in report["results"] if r["checkpoint"] == checkpoint)
    assert count_memory.plan(result)["smallest_gpu"] < GPU_24GB


def test_the_readme_gives_each_checkpoints_counted_figures(report):
    """The README's models table: the smallest GPU and the loop without savers, as counted."""
    readme = (ROOT / "README.md").read_text()
    for result in report["results"]:
        planned = count_memory.plan(result)
        assert f"{math.ceil(planned['smallest_gpu'])} / ~{planned['plain']:.0f}" in readme, result["checkpoint"]
