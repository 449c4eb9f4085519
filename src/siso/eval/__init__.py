"""Measuring SISO like the paper, at catalogue scale: metrics and a resumable benchmark runner.

Metrics (torchmetrics metrics: (B, 3, H, W) images in [0, 1] in, a number out)::

    from siso.eval import DINOScore, CLIPTScore, CMMD
    dino = DINOScore.from_pretrained("facebook/dinov2-large", cropper=GroundingDinoCropper.from_pretrained())
    dino.update(images, subject_photo, labels="dog"); dino.compute()

The benchmark (``siso bench`` on the command line)::

    from siso.eval import BenchSettings, dreambench_items, run_bench
    run_bench(dreambench_items("dreambooth/dataset"), BenchSettings(baseline="plain"), "bench/sdxl-turbo")

torchmetrics (metrics) and ray (``executor="ray"``) are the optional ``eval`` extra; everything is
imported on first use, so ``import siso.eval`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # metrics
    "PerImageMetric": "metrics", "IdentitySimilarity": "metrics", "DINOScore": "metrics", "IRScore": "metrics",
    "CLIPIScore": "metrics", "CLIPTScore": "metrics", "BackgroundLPIPS": "metrics", "DiversityMSE": "metrics",
    "FID": "distribution", "KID": "distribution", "CMMD": "distribution", "mmd_rbf": "distribution",
    "Precomputed": "distribution", "InceptionFeatures": "distribution", "EmbedderFeatures": "distribution",
    "CLIPEmbedder": "clip",
    "Cropper": "cropping", "GroundingDinoCropper": "cropping", "FixedBoxCropper": "cropping",
    "crop_to_boxes": "cropping",
    # the benchmark
    "BenchItem": "manifest", "read_manifest": "manifest", "write_manifest": "manifest",
    "dreambench_items": "manifest", "parse_prompts_and_classes": "manifest",
    "BenchSettings": "settings", "ExecutorSettings": "settings", "RememberingCropper": "cropping",
    "run_bench": "runner", "BenchReport": "runner", "read_results": "results",
    "summarise": "summary", "write_summary": "summary",
    "ItemWorker": "worker", "ItemOutputs": "worker", "TASK_RUNNERS": "worker",
}

__all__ = [
    "BackgroundLPIPS", "BenchItem", "BenchReport", "BenchSettings", "CLIPEmbedder", "CLIPIScore", "CLIPTScore",
    "CMMD", "Cropper", "DINOScore", "DiversityMSE", "EmbedderFeatures", "ExecutorSettings", "FID",
    "FixedBoxCropper", "GroundingDinoCropper", "IRScore", "IdentitySimilarity", "InceptionFeatures", "ItemOutputs",
    "ItemWorker", "KID", "PerImageMetric", "Precomputed", "RememberingCropper", "TASK_RUNNERS", "crop_to_boxes",
    "dreambench_items", "mmd_rbf", "parse_prompts_and_classes", "read_manifest", "read_results", "run_bench",
    "summarise", "write_manifest", "write_summary",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'siso.eval' has no attribute {name!r}")
