"""Seconds and memory per SISO iteration, on the real architectures with random weights.

The models are built from the configs in benchmarks/configs/ (no download) and handed to siso's own
code through a ModelCache, so what is timed is the library's loop (prepare_generation + Optimization),
not a copy of it. Per configuration it reports the median seconds per iteration (steady state), the
time to the first finished iteration, peak GPU memory, TFLOP per iteration (torch's FLOP counter),
and the ratio against a naive configuration (fp32 everywhere, text-encoder LoRA) measured in the same run.

    python benchmarks/bench_iteration.py --out benchmarks/results/       # a GPU machine
    python benchmarks/bench_iteration.py --tiny                          # CPU smoke test (CI), no timing claims
"""

from __future__ import annotations

import argparse
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

from siso.backbones import StableDiffusionBackbone, StableDiffusionXLBackbone  # noqa: E402
from siso.config import GenerateConfig  # noqa: E402
from siso.generation import prepare_generation  # noqa: E402
from siso.models import ModelCache  # noqa: E402
from siso.similarity import DinoSimilarity, IRSimilarity  # noqa: E402


@dataclass(frozen=True)
class Setting:
    name: str
    dtype: torch.dtype
    train_text_encoder: bool | None  # None: the backbone's default (on for SDXL-Turbo, as the paper ran it)
    low_memory: bool = False


DEFAULT = Setting("default (bf16 frozen, fp32 LoRA, the backbone's text-encoder LoRA setting)", torch.bfloat16, None)
NAIVE = Setting("naive (fp32, text-encoder LoRA)", torch.float32, True)
LOW_MEMORY = Setting("low-memory (default + checkpointed denoiser and VAE decoder)", torch.bfloat16, None, True)


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


def measure(backbone_name: str, setting: Setting, args, subject: Path, device: torch.device) -> dict:
    dtype = setting.dtype if device.type == "cuda" else torch.float32
    pipeline = build_pipeline(backbone_name, args.tiny, device, dtype)
    cls = StableDiffusionBackbone if backbone_name == "sd-turbo" else StableDiffusionXLBackbone
    cache = ModelCache()
    cache.add_backbone(backbone_name, device, dtype, cls(pipeline.to(device), backbone_name))
    dino, ir = build_similarity(args.tiny, device, dtype)
    cache.add_similarity("dino", "dinov2-large", device, dtype, dino)
    cache.add_similarity("ir", "ir", device, dtype, ir)
    config = GenerateConfig(
        subjects=(subject,), prompt="a photo of a dog", model=backbone_name, dino_model="dinov2-large",
        ir_model="ir", resolution=args.resolution, max_steps=args.iterations + 1,
        early_stop_patience=args.iterations + 10, train_text_encoder=setting.train_text_encoder,
        low_memory=setting.low_memory,
        device=device.type, dtype={torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype],
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    session = prepare_generation(config, cache=cache)
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
    # FLOPs of one whole iteration (render, loss, backward), counted separately: counting slows it down.
    opt = session.optimization
    with FlopCounterMode(display=False) as counter:
        opt.loss_fn(opt.render())["total"].backward()
    for p in opt.parameters:
        p.grad = None
    result = {
        "backbone": backbone_name, "setting": setting.name, "dtype": str(dtype).replace("torch.", ""),
        "resolution": args.resolution, "iterations": len(seconds),
        "median_seconds_per_iteration": statistics.median(seconds[1:] or seconds),
        "seconds_to_first_iteration": first, "peak_gpu_memory_gib": peak,
        "tflop_per_iteration": counter.get_total_flops() / 1e12,
    }
    del session, cache, pipeline, dino, ir
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


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
    args = parser.parse_args()
    if args.tiny:
        args.resolution, args.iterations = 32, min(args.iterations, 3)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        subject = Path(tmp) / "subject.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(subject)
        results = []
        for backbone in args.backbones.split(","):
            naive = measure(backbone, NAIVE, args, subject, device)
            default = measure(backbone, DEFAULT, args, subject, device)
            naive_seconds = naive["median_seconds_per_iteration"]
            default["speedup_vs_naive"] = naive_seconds / default["median_seconds_per_iteration"]
            if naive["peak_gpu_memory_gib"]:
                default["memory_ratio_vs_naive"] = default["peak_gpu_memory_gib"] / naive["peak_gpu_memory_gib"]
            low_memory = measure(backbone, LOW_MEMORY, args, subject, device)
            results += [default, low_memory, naive]
            print(json.dumps(default, indent=1), flush=True)
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
