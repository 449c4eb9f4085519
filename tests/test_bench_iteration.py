"""The iteration benchmark's CPU smoke test: it runs siso's loop and reports every field (no timing claims)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_iteration.py"), "--tiny", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["results"]
    assert {r["backbone"] for r in report["results"]} == {"sd-turbo", "sdxl-turbo"}
    for result in report["results"]:
        assert result["iterations"] == 3
        assert result["median_seconds_per_iteration"] > 0 and result["seconds_to_first_iteration"] > 0
        assert result["tflop_per_iteration"] > 0
    assert {r["setting"].split(" ")[0] for r in report["results"]} == {"default", "low-memory", "naive"}
    defaults = [r for r in report["results"] if r["setting"].startswith("default")]
    assert all(r["speedup_vs_naive"] > 0 for r in defaults)
