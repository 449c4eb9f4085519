"""The GPU machine's scripts cannot rot: the measurement runs in --tiny mode on the CPU, and the wheel check
finds what a carried wheel would miss there (the download itself needs the package index: run by hand)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURE = ROOT / "benchmarks" / "gpu" / "measure.py"
FAMILIES = {"sd-turbo", "sdxl-turbo", "flux-schnell", "sana", "sd3.5-turbo", "sana-sprint", "flux2-klein",
            "z-image-turbo"}


def run_measure(*args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, str(MEASURE), "--tiny", *args], capture_output=True, text=True,
                               timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def test_tiny_measurement_checks_every_backbone_then_times_the_speed_matrix(tmp_path):
    from siso.backbones import BACKBONES

    out = tmp_path / "gpu.json"
    run_measure("--out", str(out))
    report = json.loads(out.read_text())
    assert report["stopped"] == "finished" and report["tiny"] is True
    assert {"device", "torch", "diffusers", "transformers", "git", "date"} <= set(report)
    checks = [m for m in report["measurements"] if m["stage"] == "correctness"]
    # every backbone siso has is in the script, and each passed: finite losses, LoRA moved, frozen kept
    assert {m["backbone"] for m in checks} == FAMILIES and len(FAMILIES) == len(BACKBONES)
    for m in checks:
        assert m["ok"] and m["losses_finite"] and m["lora_updated"] and m["frozen_unchanged"], m
        assert m["iterations"] == 3 and m["median_of"] == 2 and m["memory"]["tier"]
        assert all(set(step) >= {"total", "dino", "ir"} for step in m["losses"])
    speed = [m for m in report["measurements"] if m["stage"] == "speed"]
    assert {(m["backbone"], m["setting"].split(" ")[0]) for m in speed} == {
        (b, s) for b in ("sd-turbo", "sdxl-turbo") for s in ("naive", "default", "checkpoint-vae", "low-memory")}
    for m in speed:
        assert m["median_seconds_per_iteration"] > 0 and m["median_of"] == 2
        if not m["setting"].startswith("naive"):
            assert m["speedup_vs_naive"] > 0


def test_the_measurement_stops_before_its_budget_and_keeps_the_report(tmp_path):
    out = tmp_path / "gpu.json"
    run_measure("--out", str(out), "--budget", "20")  # 20 s, less the margin for the last write: nothing fits
    report = json.loads(out.read_text())
    assert report["measurements"] == [] and report["stopped"].startswith("budget reached")


def _fake_wheel(folder: Path, name: str, version: str, *requires: str) -> None:
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        lines = [f"Name: {name}", f"Version: {version}", *(f"Requires-Dist: {r}" for r in requires)]
        archive.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(lines) + "\n")


def test_the_wheel_check_finds_what_the_gpu_machine_would_miss(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("fetch_wheels", ROOT / "benchmarks" / "gpu" / "fetch_wheels.py")
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    good = tmp_path / "good"
    good.mkdir()
    _fake_wheel(good, "diffusers", "0.42.1", "huggingface-hub>=1.0", "numpy", 'tomli; python_version < "3.11"',
                'pytest; extra == "test"')
    _fake_wheel(good, "huggingface_hub", "2.4.0", "httpx2>=2")
    _fake_wheel(good, "httpx2", "2.16.2")
    assert fetch.check(good) == 0  # markers for other Pythons and extras do not count; numpy is there
    missing = tmp_path / "missing"
    missing.mkdir()
    _fake_wheel(missing, "huggingface_hub", "2.4.0", "httpx2>=2")
    assert fetch.check(missing) == 1 and "httpx2" in capsys.readouterr().out
    too_old = tmp_path / "too-old"
    too_old.mkdir()
    _fake_wheel(too_old, "transformers", "5.24.0", "tokenizers>=0.30")  # 0.23.2 there
    assert fetch.check(too_old) == 1 and "tokenizers>=0.30 (there: 0.23.2" in capsys.readouterr().out
    twice = tmp_path / "twice"
    twice.mkdir()
    _fake_wheel(twice, "peft", "0.21.2")
    _fake_wheel(twice, "peft", "0.20.0")
    assert fetch.check(twice) == 1 and "two versions" in capsys.readouterr().out
