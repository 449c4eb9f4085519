"""What one SISO iteration keeps in GPU memory, counted on the real architectures on the meta device.

For each checkpoint in benchmarks/configs/: the weights of every component (exact: parameter counts in
bf16), and the activations autograd keeps for backward in one differentiated step of the denoiser, in
the VAE decoder and in the two similarity models, at 512 px in bf16 with siso's LoRA attached (the
preset's targets, rank 4). Nothing is computed: the models run on the meta device, where every tensor
has a shape and a dtype and no data, and a saved-tensor hook adds up the bytes of what autograd saves
(each tensor once; the frozen weights themselves are not activations). Attention is counted as the GPU
runs it, with a flash / memory-efficient kernel that keeps q, k, v, its output and the log-sum-exp, not
the attention matrix.

Gradient checkpointing (the ``checkpoint-all`` tier for the denoiser, ``checkpoint-vae`` for the VAE
decoder) is counted from the same pass: a checkpointed block keeps only its inputs, and backward
recomputes one block at a time, so the part's total becomes what lies outside its blocks, plus every
block's inputs, plus the largest block's own activations.

    python benchmarks/count_memory.py --out benchmarks/results/memory-512px.json   # ~1 min on a laptop

These are **estimates**: the CUDA context (~0.5 GiB), the allocator's fragmentation and backward's
transients come on top (siso keeps ``memory_margin_gib`` free for them), and a GPU run measures the
real peak (benchmarks/bench_iteration.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import architectures  # noqa: E402

from siso.backbones import BACKBONES  # noqa: E402
from siso.backbones.memory import ACTIVATION_HEADROOM  # noqa: E402
from siso.lora import attach_lora  # noqa: E402

GIB = 2**30
RESOLUTION = 512
LORA_RANK = 4
#: Z-Image's prompt is not padded: its chat-templated tokens, in multiples of 32 (a short prompt fits 64)
Z_IMAGE_PROMPT_TOKENS = 64


# -- counting ----------------------------------------------------------------------------------------------


@dataclass
class SavedBytes:
    """Bytes autograd saves for backward while it is active, each storage once, parameters excluded."""

    excluded: set[int] = field(default_factory=set)
    total: int = 0
    _seen: dict[int, torch.Tensor] = field(default_factory=dict)

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor if tensor._base is None else tensor._base
        key = id(base)
        if key not in self.excluded and key not in self._seen:
            self._seen[key] = base  # held, so the id is not reused while counting
            self.total += base.numel() * base.element_size()
        return tensor

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
            yield self


class _FlashAttention(torch.autograd.Function):
    """scaled_dot_product_attention as a fused GPU kernel keeps it for backward: q, k, v, the output and
    the log-sum-exp per query (fp32), no attention matrix. The output is the real attention."""

    @staticmethod
    def forward(ctx, query, key, value, kwargs):
        with torch.no_grad():
            out = _ORIGINAL_SDPA(query, key, value, **kwargs)
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - counting never runs backward
        raise NotImplementedError


_ORIGINAL_SDPA = functional.scaled_dot_product_attention


@contextlib.contextmanager
def fused_attention() -> Iterator[None]:
    def sdpa(query, key, value, attn_mask=None, **kwargs):
        if attn_mask is not None:
            kwargs["attn_mask"] = attn_mask
        return _FlashAttention.apply(query, key, value, kwargs)

    functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = _ORIGINAL_SDPA


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def checkpointed_blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks diffusers' gradient checkpointing wraps: the denoiser's repeated blocks (its ModuleList
    children), a VAE decoder's mid block and up blocks."""
    blocks = [m for child in module.children() if isinstance(child, torch.nn.ModuleList) for m in child]
    mid = getattr(module, "mid_block", None)
    return blocks + ([mid] if isinstance(mid, torch.nn.Module) else [])


@dataclass(frozen=True)
class Activations:
    plain: int  # bytes kept for backward without checkpointing
    checkpointed: int  # with every block checkpointed

    def to_record(self) -> dict[str, float]:
        return {"plain_gib": round(self.plain / GIB, 3), "checkpointed_gib": round(self.checkpointed / GIB, 3)}


def count_activations(module: torch.nn.Module, run: Callable[[], Any],
                      blocks: list[torch.nn.Module] | None = None) -> Activations:
    """What ``run()`` (a forward through ``module``, inputs requiring grad) keeps for backward, plain and with
    ``blocks`` (by default :func:`checkpointed_blocks`) checkpointed."""
    blocks = checkpointed_blocks(module) if blocks is None else blocks
    counter = SavedBytes(excluded={id(p) for p in module.parameters()} | {id(b) for b in module.buffers()})
    inside: list[int] = []
    inputs: list[int] = []
    started: dict[int, int] = {}

    def before(block, args, kwargs):
        started[id(block)] = counter.total
        inputs.append(sum(t.numel() * t.element_size() for t in _tensors((args, kwargs))))

    def after(block, args, kwargs, output):
        inside.append(counter.total - started.pop(id(block)))

    handles = [h for block in blocks for h in (block.register_forward_pre_hook(before, with_kwargs=True),
                                               block.register_forward_hook(after, with_kwargs=True))]
    try:
        with fused_attention(), counter.counting():
            run()
    finally:
        for handle in handles:
            handle.remove()
    if not inside:
        return Activations(counter.total, counter.total)
    checkpointed = counter.total - sum(inside) + sum(inputs) + max(inside)
    return Activations(counter.total, min(checkpointed, counter.total))


# -- the denoisers' inputs at 512 px -------------------------------------------------------------------------


def _latent(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """A latent that carries gradients, as in SISO's differentiated step (they flow back to the LoRA)."""
    return torch.empty(shape, device="meta", dtype=dtype, requires_grad=True)


def _empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


def denoiser_call(pipeline_class: str, denoiser: torch.nn.Module, tokens: int) -> Callable[[], Any]:
    """One denoiser forward at 512 px with ``tokens`` prompt tokens, as the family's adapter calls it."""
    dt = denoiser.dtype
    t = _empty(1, dtype=dt)
    cfg = denoiser.config
    if pipeline_class in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        side = RESOLUTION // 8
        extra = {}
        if pipeline_class == "StableDiffusionXLPipeline":
            extra["added_cond_kwargs"] = {"text_embeds": _empty(1, 1280, dtype=dt), "time_ids": _empty(1, 6, dtype=dt)}
        return lambda: denoiser(_latent(1, cfg.in_channels, side, side, dtype=dt), t,
                                encoder_hidden_states=_empty(1, 77, cfg.cross_attention_dim, dtype=dt), **extra)
    if pipeline_class == "FluxPipeline":
        n = (RESOLUTION // 16) ** 2
        return lambda: denoiser(hidden_states=_latent(1, n, cfg.in_channels, dtype=dt), timestep=t,
                                encoder_hidden_states=_empty(1, tokens, cfg.joint_attention_dim, dtype=dt),
                                pooled_projections=_empty(1, cfg.pooled_projection_dim, dtype=dt),
                                txt_ids=_empty(tokens, 3, dtype=dt), img_ids=_empty(n, 3, dtype=dt), guidance=None)
    if pipeline_class in ("SanaPipeline", "SanaSprintPipeline"):
        side = RESOLUTION // 32
        extra = {"guidance": _empty(1, dtype=dt)} if cfg.guidance_embeds else {}
        return lambda: denoiser(_latent(1, cfg.in_channels, side, side, dtype=dt),
                                encoder_hidden_states=_empty(1, tokens, cfg.caption_channels, dtype=dt),
                                encoder_attention_mask=_empty(1, tokens, dtype=dt), timestep=t, **extra)
    if pipeline_class == "StableDiffusion3Pipeline":
        side = RESOLUTION // 8
        return lambda: denoiser(hidden_states=_latent(1, cfg.in_channels, side, side, dtype=dt), timestep=t,
                                encoder_hidden_states=_empty(1, 77 + tokens, cfg.joint_attention_dim, dtype=dt),
                                pooled_projections=_empty(1, cfg.pooled_projection_dim, dtype=dt))
    if pipeline_class == "Flux2KleinPipeline":
        n = (RESOLUTION // 16) ** 2
        return lambda: denoiser(hidden_states=_latent(1, n, cfg.in_channels, dtype=dt), timestep=t, guidance=None,
                                encoder_hidden_states=_empty(1, tokens, cfg.joint_attention_dim, dtype=dt),
                                txt_ids=_empty(1, tokens, 4, dtype=torch.int64),
                                img_ids=_empty(1, n, 4, dtype=torch.int64))
    if pipeline_class == "ZImagePipeline":
        side = RESOLUTION // 8
        return lambda: denoiser([_latent(cfg.in_channels, 1, side, side, dtype=dt)], t,
                                [_empty(tokens, cfg.cap_feat_dim, dtype=dt)])
    raise ValueError(f"no denoiser inputs for {pipeline_class}")


# -- one checkpoint ------------------------------------------------------------------------------------------


def weights_gib(module: torch.nn.Module | None) -> float:
    if not isinstance(module, torch.nn.Module):
        return 0.0
    return sum(p.numel() * p.element_size() for p in module.parameters()) / GIB


def prompt_tokens(backbone) -> int:
    if type(backbone).__name__ == "ZImageBackbone":
        return Z_IMAGE_PROMPT_TOKENS
    return backbone.prompt_max_tokens if backbone.denoiser_name == "transformer" else 77


def count_checkpoint(name: str, similarity: dict[str, Activations]) -> dict[str, Any]:
    pipeline = architectures.build_pipeline(name)
    backbone_class = next(cls for cls in BACKBONES if type(pipeline).__name__ in cls.pipeline_classes)
    backbone = backbone_class(pipeline, name)
    parameters = {key: round(sum(p.numel() for p in module.parameters()) / 1e9, 3)
                  for key, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}
    components = {key: round(weights_gib(module), 3) for key, module in pipeline.components.items()
                  if isinstance(module, torch.nn.Module)}
    train_text_encoder = bool(backbone.preset.train_text_encoder) and bool(backbone.text_encoder_names)
    attach_lora(backbone, LORA_RANK, train_text_encoder, seed=0)
    denoiser, vae = backbone.denoiser, pipeline.vae
    tokens = prompt_tokens(backbone)
    per_step = count_activations(denoiser, denoiser_call(type(pipeline).__name__, denoiser, tokens))
    latent_side = RESOLUTION // pipeline.vae_scale_factor
    decoder_input = _latent(1, vae.config.latent_channels, latent_side, latent_side, dtype=vae.dtype)
    decoder = count_activations(vae.decoder, lambda: vae.decode(decoder_input))
    if not getattr(vae, "_supports_gradient_checkpointing", False):
        decoder = Activations(decoder.plain, decoder.plain)  # e.g. Sana's DC-AE: diffusers cannot checkpoint it
    grad_steps = backbone.preset.grad_steps
    trained = {backbone.denoiser_name, "vae", *(backbone.text_encoder_names if train_text_encoder else ())}
    similarity_weights = sum(weights_gib(m) for m in architectures.similarity_models().values())
    in_loop = sum(components[k] for k in trained if k in components) + similarity_weights
    similarity_plain = sum(a.plain for a in similarity.values())
    denoiser_plain, denoiser_ckpt = per_step.plain * grad_steps, per_step.checkpointed * grad_steps
    tiers = {  # what MEMORY_TIERS keep for backward, beyond the weights
        "plain": denoiser_plain + decoder.plain + similarity_plain,
        "checkpoint-vae": denoiser_plain + decoder.checkpointed + similarity_plain,
        "checkpoint-all": denoiser_ckpt + decoder.checkpointed + similarity_plain,
    }
    blocks = checkpointed_blocks(denoiser)
    block_weights = sum(weights_gib(b) for b in blocks)
    largest_block = max((weights_gib(b) for b in blocks), default=0.0)
    return {
        "checkpoint": name, "family": backbone.preset.family, "backbone": backbone_class.__name__,
        "source": architectures.load_config(name)["_source"],
        "parameters_billion": parameters,  # as loaded, before the LoRA
        "weights_gib": components | {"similarity (DINOv2-L + IR)": round(similarity_weights, 3)},
        "prompt_tokens": tokens, "grad_steps": grad_steps, "text_encoder_lora": train_text_encoder,
        "activations_gib": {
            "denoiser_step": per_step.to_record(), "vae_decoder": decoder.to_record(),
            "similarity": {k: v.to_record() for k, v in similarity.items()},
            "tiers": {tier: round(b / GIB, 3) for tier, b in tiers.items()},
        },
        #: on the GPU during the loop: the denoiser, VAE, similarity models and any trained text encoder
        "weights_in_loop_gib": round(in_loop, 3),
        #: everything, before the frozen text encoders are parked (the prompt is encoded with them on the GPU)
        "weights_at_load_gib": round(sum(components.values()) + similarity_weights, 3),
        "streamable_block_weights_gib": round(block_weights, 3),
        "largest_block_weights_gib": round(largest_block, 3),
        "loop_gib": {tier: round(in_loop + b / GIB, 2) for tier, b in tiers.items()}
        | {"streamed": round(in_loop - block_weights + 2 * largest_block + tiers["checkpoint-all"] / GIB, 2)},
    }


def plan(result: dict[str, Any]) -> dict[str, float]:
    """What siso plans for on a GPU, from one checkpoint's counts, by the library's own rule
    (``MemorySavers.activation_need_gib`` and ``needs_streaming``): the weights, the activations with
    their headroom, the margin; and the smallest GPU it runs on."""
    backbone_class = next(cls for cls in BACKBONES if cls.__name__ == result["backbone"])
    margin = backbone_class.memory_margin_gib
    tiers = result["activations_gib"]["tiers"]
    weights = result["weights_in_loop_gib"]
    planned = {tier: weights + gib * ACTIVATION_HEADROOM + margin for tier, gib in tiers.items()}
    at_load = result["weights_at_load_gib"] + margin
    smallest = max(at_load, planned["checkpoint-all"])
    if backbone_class.streams_when_short:
        streamed_weights = weights - result["streamable_block_weights_gib"] + 2 * result["largest_block_weights_gib"]
        planned["streamed"] = streamed_weights + tiers["checkpoint-all"] * ACTIVATION_HEADROOM + margin
        at_load_streamed = at_load - result["streamable_block_weights_gib"]
        smallest = max(at_load_streamed, planned["streamed"])
    return {**{tier: round(gib, 1) for tier, gib in planned.items()}, "at_load": round(at_load, 1),
            "smallest_gpu": round(smallest, 1)}


def markdown(report: dict[str, Any]) -> str:
    """docs/performance.md's table of every counted checkpoint (tests/test_docs.py keeps them equal)."""
    lines = ["| checkpoint | weights, bf16 (denoiser / text encoders) | plain | VAE decoder checkpointed | "
             "`--low-memory` | blocks streamed | smallest GPU |", "|---|---|---|---|---|---|---|"]
    for result in report["results"]:
        weights = result["weights_gib"]
        denoiser = weights.get("unet", weights.get("transformer"))
        encoders = sum(v for k, v in weights.items() if k.startswith("text_encoder"))
        planned = plan(result)
        streamed = f"~{planned['streamed']:.1f}" if "streamed" in planned else "—"
        lines.append(f"| {result['checkpoint']} | {denoiser:.1f} / {encoders:.1f} GiB | ~{planned['plain']:.1f} | "
                     f"~{planned['checkpoint-vae']:.1f} | ~{planned['checkpoint-all']:.1f} | {streamed} | "
                     f"{math.ceil(planned['smallest_gpu'])} GiB |")
    return "\n".join(lines) + "\n"


def count_similarity() -> dict[str, Activations]:
    """DINOv2-L at 518 px (its 224-crop resized as siso feeds it) and the IR tower at its input size."""
    from siso.similarity.ir import SisoIRConfig

    models = architectures.similarity_models()
    dino_side = architectures.load_config("similarity")["dinov2-large"]["image_size"]
    ir_side = SisoIRConfig().image_size
    pixels = {"dino": dino_side, "ir": ir_side}
    result = {}
    for name, model in models.items():
        image = _latent(1, 3, pixels[name], pixels[name], dtype=torch.bfloat16)
        blocks = [layer for layer in model.modules() if isinstance(layer, torch.nn.ModuleList)][0]
        result[name] = count_activations(model, lambda m=model, x=image: m(x), list(blocks))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", default=",".join(n for names in architectures.CHECKPOINTS.values()
                                                          for n in names))
    parser.add_argument("--out", type=Path, default=None, help="a .json file for the results")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="print docs/performance.md's table from this results file, and count nothing")
    args = parser.parse_args()
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32" is about loading
    similarity = count_similarity()
    results = []
    for name in args.checkpoints.split(","):
        started = time.perf_counter()
        result = count_checkpoint(name, similarity)
        print(f"{name}: in the loop {result['loop_gib']} GiB, at load {result['weights_at_load_gib']} GiB "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
        results.append(result)
    report = {"what": "estimates: counted on the meta device (benchmarks/count_memory.py), not measured",
              "resolution": RESOLUTION, "dtype": "bfloat16", "lora_rank": LORA_RANK, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "results": results}
    text = json.dumps(report, indent=1) + "\n"
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
