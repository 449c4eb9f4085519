"""Seconds and memory per SISO iteration, on the real architectures with random weights.

The models are built from the configs in benchmarks/configs/ (no download) and handed to siso's own
code through a ModelCache, so what is timed is the library's loop (prepare_generation + Optimization),
not a copy of it. Per backbone and setting it reports the median seconds per iteration (steady state),
the time to the first finished iteration, the compile time (first iteration minus the steady state),
peak GPU memory, TFLOP per iteration (torch's FLOP counter; eager settings) and the ratios against
the naive configuration (fp32 everywhere, text-encoder LoRA) measured in the same process.

Settings: naive; siso's default, eager; the two memory savers (VAE decoder checkpointed, then the
denoiser too: --low-memory); compiled with a cold compile cache (an empty directory) and again warm
(the same directory, after dynamo forgot everything: what a second run on the machine sees); on CUDA
also compiled without CUDA graphs and compiled with --low-memory.

    python benchmarks/bench_iteration.py --out benchmarks/results/       # a GPU machine: ~25 min on an H100
    python benchmarks/bench_iteration.py --tiny                          # CPU smoke test (CI), no timing claims

Most of the GPU run is compiling (the reference H200 run compiled SD-Turbo for 217 s): about 10 min
for --backbones sd-turbo alone.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny-model builders and the local CLIP tokenizer

from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir  # noqa: E402

from siso import speed  # noqa: E402
from siso.backbones import StableDiffusionBackbone, StableDiffusionXLBackbone  # noqa: E402
from siso.backbones.memory import MemoryPlan  # noqa: E402
from siso.config import GenerateConfig  # noqa: E402
from siso.generation import prepare_generation  # noqa: E402
from siso.models import ModelCache  # noqa: E402
from siso.similarity import DinoSimilarity, IRSimilarity  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    dtype: torch.dtype
    train_text_encoder: bool | None  # None: the backbone's default (on for SDXL-Turbo, as the paper ran it)
    memory: str = "plain"  # a siso.backbones.memory.MEMORY_TIERS tier
    compile_mode: str | None = None  # None: eager; "auto": what siso picks for the device
    #: compiled settings: "cold" (an empty compile cache), "warm" (what the cold setting left, for the same
    #: graphs) or "shared" (that cache, though these graphs differ: mostly a cold compile)
    cache: str | None = None
    gpu_only: bool = False
    #: inductor's channels-last layout optimisation, which siso turns off (inexact on the CPU; see siso.speed)
    layout_optimization: bool = False


NAIVE = Setting("naive (fp32, text-encoder LoRA)", torch.float32, True)
DEFAULT = Setting("default (bf16 frozen, fp32 LoRA, the backbone's text-encoder LoRA setting), eager", torch.bfloat16,
                  None)
SETTINGS = [
    DEFAULT,
    Setting("checkpoint-vae (default + checkpointed VAE decoder)", torch.bfloat16, None, "checkpoint-vae"),
    Setting("low-memory (default + checkpointed VAE decoder and denoiser: --low-memory)", torch.bfloat16, None,
            "checkpoint-all"),
    Setting("compiled-cold (default + --compile, empty compile cache)", torch.bfloat16, None, compile_mode="auto",
            cache="cold"),
    Setting("compiled-warm (default + --compile, the cache the cold run filled)", torch.bfloat16, None,
            compile_mode="auto", cache="warm"),
    Setting("compiled-no-cudagraphs (default + --compile, mode default)", torch.bfloat16, None,
            compile_mode="default", cache="shared", gpu_only=True),
    Setting("compiled-low-memory (--compile --low-memory)", torch.bfloat16, None, "checkpoint-all",
            compile_mode="auto", cache="shared", gpu_only=True),
    Setting("compiled-layout-opt (--compile with inductor's layout optimisation back on: exact on this GPU?)",
            torch.bfloat16, None, compile_mode="auto", cache="shared", gpu_only=True, layout_optimization=True),
]
#: tiny (CPU) mode compiles one backbone only: inductor's C++ builds take minutes on a small CPU
TINY_COMPILED_BACKBONES = ("sd-turbo",)


def build_pipeline(backbone: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    import tiny
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if tiny:
        pipe = tiny.diffusion.sd_pipeline() if backbone == "sd-turbo" else tiny.diffusion.sdxl_pipeline()
        return pipe.to(device=device, dtype=dtype)
    configs = json.loads((HERE / "configs" / f"{backbone}.json").read_text())
    with torch.device(device):  # allocate (and randomly initialise) directly on the GPU
        unet = UNet2DConditionModel.from_config(configs["unet"]).to(dtype)
        vae = AutoencoderKL.from_config(configs["vae"]).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).to(dtype)
        parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny.diffusion.clip_tokenizer(),
                     scheduler=EulerDiscreteScheduler.from_config(configs["scheduler"]))
        if backbone == "sd-turbo":
            return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"])).to(dtype)
        return StableDiffusionXLPipeline(**parts, text_encoder_2=text_encoder_2,
                                         tokenizer_2=tiny.diffusion.clip_tokenizer(), add_watermarker=False)


def build_similarity(tiny: bool, device: torch.device, dtype: torch.dtype):
    import tiny
    from transformers import Dinov2Config, Dinov2Model

    from siso.similarity.ir import SisoIRConfig, SisoIRModel

    if tiny:
        dino_model = tiny.similarity.dino_model()
        ir_config = SisoIRConfig(hidden_size=32, intermediate_size=64, projection_dim=24, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=38, embedding_dim=16)
    else:
        dino_config = json.loads((HERE / "configs" / "similarity.json").read_text())["dinov2-large"]
        dino_model = Dinov2Model(Dinov2Config(**dino_config))
        ir_config = SisoIRConfig()  # the defaults are the real IR tower
    ir_model = SisoIRModel(ir_config)
    dino = DinoSimilarity(dino_model.to(device, dtype).eval().requires_grad_(False))
    ir = IRSimilarity(ir_model.to(device, dtype).eval().requires_grad_(False))
    return dino, ir


def measure(backbone_name: str, setting: Setting, args, subject: Path, device: torch.device,
            compile_cache: Path) -> dict:
    dtype = setting.dtype if device.type == "cuda" else torch.float32
    pipeline = build_pipeline(backbone_name, args.tiny, device, dtype)
    cls = StableDiffusionBackbone if backbone_name == "sd-turbo" else StableDiffusionXLBackbone
    cache = ModelCache()
    cache.add_backbone(backbone_name, device, dtype, cls(pipeline.to(device), backbone_name))
    dino, ir = build_similarity(args.tiny, device, dtype)
    cache.add_similarity("dino", "dinov2-large", device, dtype, dino)
    cache.add_similarity("ir", "ir", device, dtype, ir)
    compiled = setting.compile_mode is not None
    config = GenerateConfig(
        subjects=(subject,), prompt="a photo of a dog", model=backbone_name, dino_model="dinov2-large",
        ir_model="ir", resolution=args.resolution, max_steps=args.iterations + 1,
        early_stop_patience=args.iterations + 10, train_text_encoder=setting.train_text_encoder,
        low_memory=setting.memory == "checkpoint-all", compile=compiled,
        device=device.type, dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype],
    )
    if setting.compile_mode not in (None, "auto"):
        os.environ[speed.MODE_ENV] = setting.compile_mode
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with temporary_cache_dir(str(compile_cache)) if compiled else contextlib.nullcontext():
        started = time.perf_counter()
        session = prepare_generation(config, cache=cache)
        # The middle tier has no config value: set it as the auto choice would.
        plan = MemoryPlan(setting.memory, "benchmark setting")
        session.backbone.apply_memory_plan(plan)
        if compiled:  # compiling is lazy: inductor reads its config at the first call
            torch._inductor.config.layout_optimization = setting.layout_optimization
        seconds = []
        first = None
        for event in session:
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(event.seconds)
            if first is None:
                first = time.perf_counter() - started
            if len(seconds) == args.iterations:
                break
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        exactness = compare_with_eager(session) if compiled else None
    os.environ.pop(speed.MODE_ENV, None)
    # CUDA graphs record on the first calls after warm-up: the steady state is the later iterations.
    steady = statistics.median(seconds[2:] if len(seconds) >= 4 else seconds[1:] or seconds)
    tflop = None
    if not compiled:
        # FLOPs of one whole iteration (render, loss, backward), counted separately: counting slows it down.
        opt = session.optimization
        with FlopCounterMode(display=False) as counter:
            opt.loss_fn(opt.render())["total"].backward()
        for p in opt.parameters:
            p.grad = None
        tflop = counter.get_total_flops() / 1e12
    result = {
        "backbone": backbone_name, "setting": setting.name, "dtype": str(dtype).replace("torch.", ""),
        "resolution": args.resolution, "iterations": len(seconds),
        "median_seconds_per_iteration": steady,
        "seconds_to_first_iteration": first, "peak_gpu_memory_gib": peak,
        "tflop_per_iteration": tflop,
        "memory": plan.to_record(),
        "compile": session.compiled.to_record() | {"cache": setting.cache},
        "compile_seconds": max(seconds[0] - steady, 0.0) if compiled else None,
        "vs_eager": exactness,
    }
    del session, cache, pipeline, dino, ir
    release(device)
    return result


def compare_with_eager(session) -> dict:
    """One iteration compiled and eagerly at the same LoRA: how far image, loss and LoRA gradients differ
    (tests/test_speed.py asserts this on the CPU in fp32; here it is measured on the benchmark's device)."""
    optimization = session.optimization
    modules = speed.iteration_modules(session.backbone, session.similarity)
    calls = {name: module._compiled_call_impl for name, module in modules.items()}

    def one() -> tuple[torch.Tensor, float, list[torch.Tensor]]:
        image = optimization.render()
        total = optimization.loss_fn(image)["total"]
        total.backward()
        grads = [p.grad.detach().float().clone() for p in optimization.parameters]
        for p in optimization.parameters:
            p.grad = None
        return image.detach().float(), float(total.detach()), grads

    image, total, grads = one()
    for module in modules.values():
        speed.set_compiled(module, None)
    eager_image, eager_total, eager_grads = one()
    for name, module in modules.items():
        module._compiled_call_impl = calls[name]
    relative = [float((g - e).norm() / e.norm()) for g, e in zip(grads, eager_grads, strict=True) if e.norm() > 0]
    return {"max_abs_image_diff": float((image - eager_image).abs().max()), "loss_diff": abs(total - eager_total),
            "max_relative_grad_diff": max(relative, default=0.0),
            "median_relative_grad_diff": statistics.median(relative) if relative else 0.0}


def release(device: torch.device) -> None:
    """Forget compiled code and CUDA-graph pools, and free the GPU, before the next setting."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def git_hash() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test, no timing claims")
    parser.add_argument("--backbones", default="sd-turbo,sdxl-turbo")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--out", type=Path, default=None, help="directory (or .json file) for the results")
    parser.add_argument("--settings", default="", help="comma-separated setting names (prefixes) to run; "
                        "default: all (naive always runs: the ratios need it)")
    args = parser.parse_args()
    if args.tiny:
        args.resolution, args.iterations = 32, min(args.iterations, 3)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        subject = Path(tmp) / "subject.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(subject)
        results = []
        for backbone in args.backbones.split(","):
            compile_cache = Path(tmp) / f"compile-cache-{backbone}"  # empty until the cold setting fills it
            naive = measure(backbone, NAIVE, args, subject, device, compile_cache)
            for setting in SETTINGS:
                if setting.gpu_only and device.type != "cuda":
                    continue
                if args.tiny and setting.compile_mode is not None and backbone not in TINY_COMPILED_BACKBONES:
                    continue
                if args.settings and not any(setting.name.startswith(f) for f in args.settings.split(",")):
                    continue
                result = measure(backbone, setting, args, subject, device, compile_cache)
                result["speedup_vs_naive"] = naive["median_seconds_per_iteration"] / result[
                    "median_seconds_per_iteration"]
                if naive["peak_gpu_memory_gib"]:
                    result["memory_ratio_vs_naive"] = result["peak_gpu_memory_gib"] / naive["peak_gpu_memory_gib"]
                results.append(result)
                print(json.dumps(result, indent=1), flush=True)
            results.append(naive)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    report = {
        "device": device_name, "tiny": args.tiny, "torch": torch.__version__, "git": git_hash(),
        "date": time.strftime("%Y-%m-%d"), "results": results,
    }
    if args.out is not None:
        path = args.out if args.out.suffix == ".json" else args.out / (
            f"iteration-{'tiny' if args.tiny else device_name.replace(' ', '_')}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {path}")
    else:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
