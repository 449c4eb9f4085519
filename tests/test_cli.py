"""The command line end to end on tiny models: generate, then render with the learned LoRA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import RESOLUTION
from diffusers import DiffusionPipeline
from helpers import generate_args
from PIL import Image

from siso.images import pil_to_tensor


def test_generate_then_render(run_siso, monkeypatch, tmp_path, sd_dir, dino_dir, subject_photo):
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out,
                                                              "--max-steps", "4", "--lr", "5e-3"))
    assert code == 0, text
    assert "DINO only" in text and "Best iteration" in text
    # Where it runs, before anything loads; then the settings the backbone's preset resolved.
    assert "Device: cpu, dtype fp32" in text and "Warning: running on the CPU (--device cpu)" in text
    assert text.index("Device: cpu") < text.index("Settings:")
    assert ("Settings: lr 5.0e-3, early stop 3 % / 7 iterations, denoise/grad steps 1/1, weight decay 0.01, "
            f"max steps 4, LoRA rank 4, seed 42, resolution {RESOLUTION}, device cpu, dtype fp32") in text
    record = json.loads((out / "run.json").read_text())
    assert record["stop_reason"] == "max_steps" and len(record["losses"]) == 4
    assert record["config"]["similarity"] == ["dino"]

    # Second stage, with the same seed and one step: exactly the best image again.
    image_path = tmp_path / "again.png"
    code, text = run_siso("render", "--model", str(sd_dir), "--lora", str(out / "lora"),
                         "--prompt", "a photo of a dog", "--out", str(image_path), "--steps", "1",
                         "--resolution", str(RESOLUTION), "--device", "cpu")
    assert code == 0, text
    assert "Device: cpu, dtype fp32" in text
    rendered = pil_to_tensor(Image.open(image_path))
    best = pil_to_tensor(Image.open(out / "best.png"))
    assert torch.equal(rendered, best)

    # Any prompt and more steps: an image, and a different one from the untouched model's.
    code, text = run_siso("render", "--model", str(sd_dir), "--lora", str(out / "lora"),
                         "--prompt", "a dog on the beach", "--out", str(tmp_path / "beach.png"),
                         "--resolution", str(RESOLUTION), "--device", "cpu")
    assert code == 0, text
    pipe = DiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe("a dog on the beach", num_inference_steps=4, guidance_scale=0.0, height=RESOLUTION,
                 width=RESOLUTION, generator=torch.Generator("cpu").manual_seed(42), output_type="pt").images
    beach = pil_to_tensor(Image.open(tmp_path / "beach.png"))
    assert beach.shape == plain.shape and (beach - plain).abs().max() > 1 / 255


def test_overwrite_refuses_a_directory_that_is_not_a_siso_run(run_siso, tmp_path, sd_dir, dino_dir, subject_photo):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1", "--overwrite"))
    assert code == 2 and "not a siso run" in text
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_nan_loss_stops_and_keeps_the_best(run_siso, monkeypatch, tmp_path, sd_dir, dino_dir, subject_photo):
    from siso.similarity import loss as loss_module

    original = loss_module.SimilarityLoss.forward
    calls = {"n": 0}

    def forward_with_nan(self, images):
        calls["n"] += 1
        losses = original(self, images)
        if calls["n"] == 3:
            losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(loss_module.SimilarityLoss, "forward", forward_with_nan)
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out,
                                                              "--max-steps", "10", "--lr", "5e-3"))
    assert code == 0, text
    record = json.loads((out / "run.json").read_text())
    assert record["stop_reason"] == "nan" and len(record["losses"]) == 3
    assert record["best_step"] in (0, 1) and (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_ctrl_c_stops_after_the_current_iteration(tmp_path, sd_dir, dino_dir, subject_photo):
    out = tmp_path / "run"
    args = generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "500", "--early-stop-patience", "500")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "siso.cli", *args], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "steps" / "0002.png").exists():
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "the run never reached its third iteration"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output  # what a shell reports for Ctrl-C; the best is saved
    assert "Traceback" not in output
    record = json.loads((out / "run.json").read_text())
    assert record["stop_reason"] == "interrupted" and record["status"] == "finished"
    steps = len(record["losses"])
    assert 3 <= steps < 500
    assert len(list((out / "steps").iterdir())) == steps
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file() and (out / "losses.png").is_file()


@pytest.mark.parametrize("flags, formats", [
    ((), ["diffusers", "kohya"]),  # SD's default: both files
    (("--lora-format", "kohya"), ["diffusers", "kohya"]),
    (("--lora-format", "diffusers"), ["diffusers"]),
])
def test_lora_format_flag(run_siso, monkeypatch, tmp_path, sd_dir, dino_dir, subject_photo, flags, formats):
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1", *flags))
    assert code == 0, text
    names = {"diffusers": "pytorch_lora_weights.safetensors", "kohya": "siso_lora_kohya.safetensors"}
    assert sorted(p.name for p in (out / "lora").glob("*.safetensors")) == [names[f] for f in formats]
    assert json.loads((out / "run.json").read_text())["config"]["lora_format"] == formats
    assert ("siso_lora_kohya.safetensors  (ComfyUI: LoraLoader" in text) == ("kohya" in formats)  # the summary


def test_auto_device_without_a_gpu_says_so_before_loading(run_siso, monkeypatch, tmp_path, sd_dir, dino_dir):
    """--device auto on a machine without a GPU: a warning (not a refusal) before any model loads."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    missing = tmp_path / "no-dog.jpg"
    code, text = run_siso("generate", "--subject", missing, "--prompt", "a photo of a dog", "--out", tmp_path / "run",
                          "--model", sd_dir, "--dino-model", dino_dir)
    assert code == 2 and "does not exist" in text  # the run itself goes on to its first real problem
    assert "Device: cpu, dtype fp32" in text
    assert "Warning: running on the CPU (PyTorch sees no CUDA or MPS GPU)" in text
    assert text.index("Warning: running on the CPU") < text.index("Error:")


def test_help_states_each_familys_default_from_its_preset():
    """Every knob a backbone's preset fills says, in --help, what each family's preset holds (read from
    the presets, not typed a second time; tests/test_one_declaration.py changes one and watches it)."""
    from test_fidelity import option_help, per_family_defaults

    from siso.config import GenerateConfig
    from siso.knobs import knobs, show
    from siso.presets import PRESETS

    helps = option_help("generate")
    checked = 0
    for spec in knobs(GenerateConfig).values():
        if spec.preset is None or not spec.cli:
            continue
        shown = per_family_defaults(helps[spec.option])
        for preset in PRESETS.values():
            value = getattr(preset, spec.preset)
            expected = f"as {knobs(GenerateConfig)[spec.fallback].option}" if value is None else show(value)
            assert shown[preset.title] == expected, (spec.option, preset.title)
            checked += 1
    assert checked >= 9 * len(PRESETS)


def test_the_announced_device_names_the_gpu(monkeypatch):
    from siso.devices import describe_device

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert describe_device(torch.device("cuda", 0)) == "cuda (NVIDIA H100 80GB HBM3)"
    assert describe_device(torch.device("cpu")) == "cpu"
