"""The iteration benchmark's CPU smoke test: it runs siso's loop and reports every field (no timing claims)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_iteration.py"), "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=1500,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["results"]
    assert {r["backbone"] for r in report["results"]} == {"sd-turbo", "sdxl-turbo"}
    for result in report["results"]:
        assert result["iterations"] == 3
        assert result["median_seconds_per_iteration"] > 0 and result["seconds_to_first_iteration"] > 0
    settings = {(r["backbone"], r["setting"].split(" ")[0]) for r in report["results"]}
    eager = {"default", "checkpoint-vae", "low-memory", "naive"}
    # Tiny mode compiles one backbone (inductor's C++ builds are slow on a small CPU); the GPU-only
    # settings (no CUDA graphs, compiled + low-memory, layout optimisation) need CUDA.
    assert settings == {(b, s) for b in ("sd-turbo", "sdxl-turbo") for s in eager} | {
        ("sd-turbo", "compiled-cold"), ("sd-turbo", "compiled-warm")}
    by_setting = {(r["backbone"], r["setting"].split(" ")[0]): r for r in report["results"]}
    for (backbone, setting), result in by_setting.items():
        if setting == "naive":
            assert "speedup_vs_naive" not in result
        else:  # the ratio is the two medians' (not a number made up beside them)
            naive = by_setting[backbone, "naive"]["median_seconds_per_iteration"]
            assert result["speedup_vs_naive"] == pytest.approx(naive / result["median_seconds_per_iteration"])
        compiled = setting.startswith("compiled")
        assert result["compile"]["enabled"] is compiled
        assert (result["tflop_per_iteration"] > 0) if not compiled else result["tflop_per_iteration"] is None
        tier = {"checkpoint-vae": "checkpoint-vae", "low-memory": "checkpoint-all"}.get(setting, "plain")
        assert result["memory"]["tier"] == tier
        if compiled:
            assert result["compile"]["mode"] == "default" and result["compile_seconds"] >= 0
            # The compiled iteration is the eager one (fp32 on the CPU): image, loss and LoRA gradients.
            vs_eager = result["vs_eager"]
            assert vs_eager["max_abs_image_diff"] <= 1e-5 and vs_eager["loss_diff"] <= 1e-5
            assert vs_eager["max_relative_grad_diff"] <= 1e-3
    # A warm cache compiles faster than a cold one (minutes against seconds, even on a busy CPU).
    assert by_setting["sd-turbo", "compiled-warm"]["compile_seconds"] < by_setting["sd-turbo", "compiled-cold"][
        "compile_seconds"]
