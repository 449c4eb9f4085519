"""The one command a lent GPU machine runs: every GPU claim of siso, measured in priority order, in a budget.

On the GPU machine (Python 3.12, torch 2.11, no package index) it first installs the wheels that
``benchmarks/gpu/fetch_wheels.py`` put in ``.whl/`` into a scratch site directory, puts siso's
``src/`` on the path, and then measures, writing the JSON report after EACH measurement (so a run
stopped at its limit still returns all it measured) and stopping by itself before ``--budget``:

1. correctness on CUDA, every backbone (SD-Turbo, SDXL-Turbo, FLUX.1-schnell, Sana, SD3.5, Sana-Sprint,
   FLUX.2 [klein], Z-Image): the real architecture with random weights built directly on the GPU in
   bf16 (``benchmarks/architectures.py``; no download, no CPU initialisation), DINOv2-L and the IR tower
   at their real shapes, 3 SISO iterations at 512 px through siso's own loop. Checked: every loss
   finite, the LoRA updated, the frozen weights unchanged (bit for bit), and the memory tier siso
   chose; timed: seconds per iteration and peak GPU memory;
2. SD-Turbo: the naive configuration (fp32, text-encoder LoRA), siso's default (eager), each memory
   tier and ``--compile`` (cold compile timed apart; CUDA graphs), in one process, with compiled-vs-eager
   exactness (``benchmarks/bench_iteration.py``'s measurements);
3. SDXL-Turbo: the same, as far as the budget goes.

The report names the GPU, the torch/diffusers/transformers versions and the git commit, and for every
figure its setting and how many iterations it is the median of.

    python3 benchmarks/gpu/measure.py --out "$OUT"                    # on the GPU machine (8 min budget)
    python benchmarks/gpu/measure.py --tiny --out /tmp/gpu-tiny.json   # the CPU smoke test the suite runs
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / ".whl"
SITE = Path(tempfile.gettempdir()) / "siso-gpu-site"

#: the families of stage 1, by siso family, and the tiny builder of each for --tiny (tests/tiny)
TINY_BUILDERS = {
    "sd-turbo": ("diffusion", "sd_pipeline"), "sdxl-turbo": ("diffusion", "sdxl_pipeline"),
    "flux-schnell": ("transformer", "flux_pipeline"), "sana": ("transformer", "sana_pipeline"),
    "sd3.5-turbo": ("flow", "sd3_pipeline"), "sana-sprint": ("flow", "sana_sprint_pipeline"),
    "flux2-klein": ("flow", "flux2_klein_pipeline"), "z-image-turbo": ("flow", "z_image_pipeline"),
}
#: seconds a setting of stage 2/3 is expected to take on an H100-class GPU; a setting is started only
#: where the budget still holds it (the reference H200 run compiled SD-Turbo for 217 s)
EXPECTED_SECONDS = {"eager": 40, "compiled": 300}


def bootstrap(tiny: bool) -> None:
    """Install the carried wheels into a scratch site directory once, then run again with it on the path."""
    if tiny or os.environ.get("SISO_GPU_SITE") or not WHEELS.is_dir():
        return
    wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels], check=True)
    env = {**os.environ, "SISO_GPU_SITE": str(SITE),
           "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


class Report:
    """The JSON report, rewritten whole (atomically) after every measurement."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.data = {**header, "measurements": [], "stopped": None}
        self.write()

    def add(self, measurement: dict) -> None:
        self.data["measurements"].append(measurement)
        self.write()
        print(json.dumps(measurement), flush=True)

    def stop(self, reason: str) -> None:
        self.data["stopped"] = reason
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(f".{self.path.name}.partial")
        partial.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(partial, self.path)


def build_backbone(family: str, tiny: bool, device, dtype):
    import architectures

    from siso.backbones import BACKBONES

    if tiny:
        module, name = TINY_BUILDERS[family]
        pipeline = getattr(importlib.import_module(f"tiny.{module}"), name)().to(device=device, dtype=dtype)
    else:
        pipeline = architectures.build_pipeline(architectures.CHECKPOINTS[family][0], device=device, dtype=dtype)
    backbone_class = next(cls for cls in BACKBONES if type(pipeline).__name__ in cls.pipeline_classes)
    return backbone_class(pipeline, family)


def frozen_sample(backbone) -> dict[str, object]:
    """Copies of a few frozen denoiser weights (first, middle, last), to check they never move."""
    frozen = [(name, p) for name, p in backbone.denoiser.named_parameters() if "lora_" not in name]
    picks = {frozen[i][0]: frozen[i][1] for i in {0, len(frozen) // 2, len(frozen) - 1}}
    return {name: p.detach().clone() for name, p in picks.items()}


def correctness(family: str, args, subject: Path, device, dtype) -> dict:
    """Stage 1: 3 SISO iterations on the family's real architecture (random weights) through siso's loop."""
    import bench_iteration
    import torch

    from siso.config import GenerateConfig
    from siso.generation import prepare_generation
    from siso.models import ModelCache

    cache = ModelCache()
    cache.add_backbone(family, device, dtype, build_backbone(family, args.tiny, device, dtype))
    dino, ir = bench_iteration.build_similarity(args.tiny, device, dtype)
    cache.add_similarity("dino", "dinov2-large", device, dtype, dino)
    cache.add_similarity("ir", "ir", device, dtype, ir)
    config = GenerateConfig(subjects=(subject,), prompt="a photo of a dog", model=family, dino_model="dinov2-large",
                            ir_model="ir", resolution=args.resolution, max_steps=args.iterations + 1,
                            early_stop_patience=args.iterations + 10, device=device.type,
                            dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    session = prepare_generation(config, cache=cache)
    frozen = frozen_sample(session.backbone)
    lora_before = [p.detach().clone() for p in session.optimization.parameters]
    losses, seconds = [], []
    for event in session:
        losses.append(event.losses)
        seconds.append(event.seconds)
        if len(seconds) == args.iterations:
            break
    finite = all(torch.isfinite(torch.tensor(value)) for step in losses for value in step.values())
    moved = any(not torch.equal(a, p.detach()) for a, p in zip(lora_before, session.optimization.parameters,
                                                             strict=True))
    kept = all(torch.equal(copy, dict(session.backbone.denoiser.named_parameters())[name])
               for name, copy in frozen.items())
    result = {
        "stage": "correctness", "backbone": family, "checkpoint": family if args.tiny else
        __import__("architectures").CHECKPOINTS[family][0], "dtype": str(dtype).replace("torch.", ""),
        "resolution": args.resolution, "iterations": len(seconds),
        "ok": bool(finite and moved and kept), "losses_finite": bool(finite), "lora_updated": bool(moved),
        "frozen_unchanged": bool(kept), "memory": session.memory.to_record(),
        "median_seconds_per_iteration": statistics.median(seconds[1:] or seconds), "median_of": len(seconds[1:]),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "losses": losses,
    }
    del session, cache, dino, ir
    bench_iteration.release(device)
    return result


def speed_matrix(backbone: str, args, subject: Path, device, report: Report, deadline: float) -> None:
    """Stages 2 and 3: bench_iteration's settings for one backbone, each started only if the budget holds it."""
    import bench_iteration

    settings = [bench_iteration.NAIVE, *bench_iteration.SETTINGS]
    naive = None
    with tempfile.TemporaryDirectory() as tmp:
        compile_cache = Path(tmp) / f"compile-cache-{backbone}"
        for setting in settings:
            compiled = setting.compile_mode is not None
            if (setting.gpu_only and device.type != "cuda") or (args.tiny and compiled):
                continue  # tiny mode: compiling is the iteration benchmark's own CPU test (minutes on a CPU)
            expected = EXPECTED_SECONDS["compiled" if compiled else "eager"]
            if not args.tiny and time.monotonic() + expected > deadline:
                report.add({"stage": "speed", "backbone": backbone, "setting": setting.name,
                            "skipped": f"the budget left under {expected} s for it"})
                continue
            try:
                result = bench_iteration.measure(backbone, setting, args, subject, device, compile_cache)
            except Exception as err:  # noqa: BLE001 - one setting's failure is a result, not the end of the run
                report.add({"stage": "speed", "backbone": backbone, "setting": setting.name,
                            "error": f"{type(err).__name__}: {err}"})
                bench_iteration.release(device)
                continue
            result["stage"] = "speed"
            # bench_iteration's steady state: the median after the first two iterations (one, when fewer than 4)
            result["median_of"] = result["iterations"] - 2 if result["iterations"] >= 4 else max(
                result["iterations"] - 1, 1)
            if naive is None:
                naive = result
            else:
                result["speedup_vs_naive"] = naive["median_seconds_per_iteration"] / result[
                    "median_seconds_per_iteration"]
            report.add(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the suite's smoke test")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds of wall time to stay within")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="directory (or .json file) for the report")
    parser.add_argument("--iterations", type=int, default=3, help="iterations of each correctness run")
    parser.add_argument("--speed-iterations", type=int, default=10, help="iterations of each speed setting")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--backbones", default=",".join(TINY_BUILDERS), help="the families of stage 1")
    args = parser.parse_args()
    started = time.monotonic()
    bootstrap(args.tiny)
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks"), str(ROOT / "tests")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import bench_iteration
    import diffusers
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    if args.tiny:
        args.resolution = 32
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    path = args.out if args.out.suffix == ".json" else args.out / (
        f"gpu-{'tiny' if args.tiny else name.replace(' ', '_')}-{time.strftime('%Y-%m-%d')}.json")
    report = Report(path, {
        "what": "siso on a GPU: correctness of every backbone, then the speed matrix (benchmarks/gpu/measure.py)",
        "device": name, "tiny": args.tiny, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "git": bench_iteration.git_hash(), "date": time.strftime("%Y-%m-%d"),
        "budget_seconds": args.budget, "resolution": args.resolution,
    })
    deadline = started + args.budget - 20  # the last report write and the transfer back
    with tempfile.TemporaryDirectory() as tmp:
        subject = Path(tmp) / "subject.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(subject)
        for family in args.backbones.split(","):
            if time.monotonic() > deadline:
                report.stop(f"budget reached before the correctness run of {family}")
                return
            try:
                report.add(correctness(family, args, subject, device, dtype))
            except Exception as err:  # noqa: BLE001 - a backbone that fails is the finding; the others still run
                report.add({"stage": "correctness", "backbone": family, "ok": False,
                            "error": f"{type(err).__name__}: {err}"})
                bench_iteration.release(device)
        args.iterations = args.speed_iterations if not args.tiny else 3
        for backbone in ("sd-turbo", "sdxl-turbo"):
            speed_matrix(backbone, args, subject, device, report, deadline)
    report.stop("finished" if time.monotonic() <= deadline else "budget reached")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
