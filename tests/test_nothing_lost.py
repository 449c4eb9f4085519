"""Nothing lost, no traceback: the overwrite contract, crash-safe LoRA, signals, full disks, exit codes.

Each case is reproduced for real where it can be (a real SIGTERM/SIGKILL to a subprocess, a
directory that really is a siso run) and with a monkeypatched write where it cannot (a full disk).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import helpers
import pytest
import torch
from conftest import RESOLUTION
from helpers import PROMPT, plain_render
from PIL import Image

from siso.images import pil_to_tensor


def generate_args(model_dir, dino_dir, subject, out, *extra):
    return helpers.generate_args(model_dir, dino_dir, subject, out, "--lr", "5e-3", *extra)  # a rate they feel


def assert_lora_renders_best_png(model_dir, out: Path) -> None:
    """best.png is the PNG of what plain diffusers renders with lora/: the pair on disk belongs together."""
    image = plain_render(model_dir, lora_dir=out / "lora")
    best = pil_to_tensor(Image.open(out / "best.png"))
    assert (image - best).abs().max().item() <= 0.5 / 255 + 1e-6  # PNG rounding only


def strict_json(path: Path) -> dict:
    def refuse(token):
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# -- the overwrite contract ---------------------------------------------------------------------------


def test_overwrite_replaces_a_siso_run_whole(run_siso, tmp_path, sd_dir, dino_dir, subject_photo):
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "3",
                                         "--early-stop-patience", "10"))
    assert code == 0, text
    assert (out / "steps" / "0002.png").is_file() and (out / "lora" / "siso_lora_kohya.safetensors").is_file()
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1", "--overwrite",
                                         "--lora-format", "diffusers"))
    assert code == 0, text
    # Nothing of the first run is left: no stale step images, no kohya file of the other run.
    assert sorted(p.name for p in (out / "steps").iterdir()) == ["0000.png"]
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["README.md", "best.png",
                                                                 "pytorch_lora_weights.safetensors"]
    assert len(strict_json(out / "run.json")["losses"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no half-moved or backup directories


def test_overwrite_refuses_when_an_input_lies_inside_the_run(run_siso, monkeypatch, tmp_path, sd_dir, dino_dir,
                                                            subject_photo):
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1"))
    assert code == 0, text
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    from siso import backbones

    monkeypatch.setattr(backbones, "load_backbone", lambda *a, **k: pytest.fail("a model was loaded"))
    code, text = run_siso(*generate_args(sd_dir, dino_dir, out / "best.png", out, "--max-steps", "1", "--overwrite"))
    assert code == 2 and "lies inside --out" in text and "best.png" in text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_output_files_get_the_usual_permissions(run_siso, tmp_path, sd_dir, dino_dir, subject_photo):
    from siso.files import FILE_MODE

    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1"))
    assert code == 0, text
    umask = os.umask(0)
    os.umask(umask)
    assert 0o666 & ~umask == FILE_MODE
    for path in [out / "run.json", out / "best.png", out / "losses.png", out / "steps" / "0000.png",
                 out / "lora" / "pytorch_lora_weights.safetensors"]:
        assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE, path


# -- the best LoRA is always on disk ---------------------------------------------------------------------


def start_run(tmp_path, sd_dir, dino_dir, subject_photo, out):
    args = generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "500", "--early-stop-patience", "500")
    return subprocess.Popen([sys.executable, "-m", "siso.cli", *args], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(process, out: Path, step: int) -> None:
    deadline = time.time() + 180
    while not (out / "steps" / f"{step:04d}.png").exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, f"the run never reached iteration {step}"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, code", [
    (signal.SIGTERM, 143),  # docker stop, timeout, Slurm, Kubernetes
    (getattr(signal, "SIGHUP", None), 129),  # the terminal closed
], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_stop_like_ctrl_c(tmp_path, sd_dir, dino_dir, subject_photo, signum, code):
    if signum is None:
        pytest.skip("no SIGHUP on Windows")
    out = tmp_path / "run"
    process = start_run(tmp_path, sd_dir, dino_dir, subject_photo, out)
    try:
        wait_for_step(process, out, 2)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == code, output
    assert "Traceback" not in output and signal.Signals(signum).name in output
    record = strict_json(out / "run.json")
    assert record["stop_reason"] == "interrupted" and record["status"] == "finished"
    assert record["lora_step"] == record["best_step"] and (out / "losses.png").is_file()
    assert_lora_renders_best_png(sd_dir, out)


def test_sigkill_leaves_a_lora_that_renders_its_best_png(tmp_path, sd_dir, dino_dir, subject_photo):
    """The OOM killer and SIGKILL give no chance to save: the best LoRA must already be on disk."""
    out = tmp_path / "run"
    process = start_run(tmp_path, sd_dir, dino_dir, subject_photo, out)
    try:
        wait_for_step(process, out, 2)  # the second iteration after the first is done
        process.kill()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    record = strict_json(out / "run.json")  # atomic rewrites: a whole record, from before the kill
    assert record["status"] == "running" and record["lora_step"] is not None
    assert_lora_renders_best_png(sd_dir, out)
    assert not [p for p in (out / "lora").iterdir() if p.name.startswith(".")]
    # One pair: best.png is lora/'s own image, which lora/ replaced whole at each new best.
    assert (out / "best.png").is_symlink() and (out / "best.png").resolve() == (out / "lora" / "best.png").resolve()


# -- failures while writing, and runs with nothing usable ----------------------------------------------


def fail_from_call(monkeypatch, owner, name: str, nth: int, error: Exception, counts=lambda *args: True) -> None:
    """``owner.name`` raises ``error`` from its ``nth`` call on, counting only the calls ``counts(*args)`` picks."""
    original, counted = getattr(owner, name), []

    def failing(*args, **kwargs):
        if counts(*args):
            counted.append(args)
            if len(counted) >= nth:
                raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


def test_a_full_disk_stops_the_run_and_keeps_the_best(run_siso, monkeypatch, tmp_path, sd_dir, dino_dir,
                                                     subject_photo):
    from siso import run_directory as runs

    fail_from_call(monkeypatch, runs, "write_png", 3, OSError(errno.ENOSPC, "No space left on device"),
                   counts=lambda image, path: Path(path).parent.name == "steps")
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "10",
                                         "--early-stop-patience", "10"))
    assert code == 2, text
    assert "No space left on device" in text and "Free some space" in text and "best.png and lora/" in text
    record = strict_json(out / "run.json")
    assert record["status"] == "failed" and record["stop_reason"] == "write_error"
    assert record["lora_step"] == record["best_step"] is not None and "No space left" in record["error"]
    assert len(record["losses"]) == 3  # the third iteration ran; writing its image failed
    assert_lora_renders_best_png(sd_dir, out)


def test_a_nan_first_iteration_exits_3_with_advice(run_siso, monkeypatch, tmp_path, sd_dir, dino_dir, subject_photo):
    from siso.similarity import loss as loss_module

    original = loss_module.SimilarityLoss.forward

    def always_nan(self, images):
        losses = original(self, images)
        losses["total"] = losses["total"] * float("nan")
        return losses

    monkeypatch.setattr(loss_module.SimilarityLoss, "forward", always_nan)
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "5"))
    assert code == 3, text
    assert "NaN at the first iteration" in text and "--dtype" in text and "Done" not in text
    assert not (out / "best.png").exists() and not (out / "lora").exists()
    record = strict_json(out / "run.json")  # NaN is written as null: strict JSON
    assert record["status"] == "failed" and record["stop_reason"] == "nan"
    assert record["losses"][0]["total"] is None


# -- problems found before any model loads -------------------------------------------------------------


def test_out_below_a_file(run_siso, no_model_loads, tmp_path, sd_dir, dino_dir, subject_photo):
    (tmp_path / "file.txt").write_text("x")
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, tmp_path / "file.txt" / "run"))
    assert code == 2 and "which is a file" in text
    code, text = run_siso("render", "--model", sd_dir, "--prompt", PROMPT, "--out", tmp_path / "file.txt" / "a.png",
                          "--device", "cpu")
    assert code == 2 and "which is a file" in text


def test_out_on_a_read_only_filesystem(run_siso, no_model_loads, monkeypatch, tmp_path, sd_dir, dino_dir,
                                      subject_photo):
    from siso import run_directory as runs

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(runs.tempfile, "NamedTemporaryFile", read_only)
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, tmp_path / "run"))
    assert code == 2 and "Read-only file system" in text and not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value, words", [
    ("--resolution", "100000", "at most 2048"),
    ("--seed", str(2**70), "2**64 - 1"),
    ("--lr", "inf", "finite number"),
    ("--early-stop-pct", "nan", "finite number"),
])
def test_numbers_out_of_range(run_siso, no_model_loads, tmp_path, sd_dir, dino_dir, subject_photo, flag, value, words):
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, tmp_path / "run", flag, value))
    assert code == 2 and words in text


def test_a_missing_local_model_directory_is_missing_not_a_download(run_siso, tmp_path, dino_dir, subject_photo):
    code, text = run_siso(*generate_args(tmp_path / "no-such-model", dino_dir, subject_photo, tmp_path / "run"))
    assert code == 2 and "does not exist" in text and "internet" not in text


def test_the_dino_and_ir_sources_are_checked_before_the_backbone(run_siso, no_model_loads, tmp_path, sd_dir,
                                                                 dino_dir, subject_photo):
    code, text = run_siso(*generate_args(sd_dir, tmp_path / "no-dino", subject_photo, tmp_path / "run"))
    assert code == 2 and "--dino-model" in text and "does not exist" in text
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, tmp_path / "run", "--ir-model",
                                         tmp_path / "no-ir"))
    assert code == 2 and "IR model directory" in text


def test_ir_model_truncated_or_given_the_raw_checkpoint(run_siso, tmp_path, ir_dir, sd_dir, dino_dir, subject_photo):
    import shutil

    broken = tmp_path / "ir"
    shutil.copytree(ir_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, tmp_path / "run", "--ir-model", broken))
    assert code == 2 and "truncated or corrupt" in text and "convert-ir" in text
    checkpoint = tmp_path / "guie_weights.pth"
    checkpoint.write_bytes(b"not really")
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, tmp_path / "run", "--ir-model", checkpoint))
    assert code == 2 and "is a file" in text and f"siso convert-ir {checkpoint}" in text
    assert "does not exist" not in text


def test_an_empty_photo_is_called_empty(run_siso, tmp_path, sd_dir, dino_dir):
    empty = tmp_path / "dog.jpg"
    empty.write_bytes(b"")
    code, text = run_siso(*generate_args(sd_dir, dino_dir, empty, tmp_path / "run"))
    assert code == 2 and "is empty (0 bytes)" in text


def test_a_corrupt_lora_is_called_corrupt(run_siso, tmp_path, sd_dir, dino_dir, subject_photo):
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1"))
    assert code == 0, text
    weights = out / "lora" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code, text = run_siso("render", "--model", sd_dir, "--lora", out / "lora", "--prompt", PROMPT, "--out",
                          tmp_path / "a.png", "--device", "cpu", "--resolution", RESOLUTION)
    assert code == 2 and "truncated or corrupt" in text and "does not fit" not in text


def test_a_lora_of_nan_weights_is_refused_not_rendered_black(run_siso, tmp_path, sd_dir, dino_dir, subject_photo):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1"))
    assert code == 0, text
    weights = out / "lora" / "pytorch_lora_weights.safetensors"
    state = load_file(weights)
    first = sorted(state)[0]
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, weights)
    code, text = run_siso("render", "--model", sd_dir, "--lora", out / "lora", "--prompt", PROMPT, "--out",
                          tmp_path / "a.png", "--device", "cpu", "--resolution", RESOLUTION)
    assert code == 2 and "not numbers (NaN or infinite) in 1 of its tensors" in " ".join(text.split()), text
    assert not (tmp_path / "a.png").exists()


class Anything:
    """Any class at all: unpickling it would run code that weights_only=True refuses to run."""


def test_an_unsafe_pickle_is_refused_without_torchs_advice(run_siso, tmp_path):
    checkpoint = tmp_path / "evil.pth"
    torch.save({"module.fc1.weight": Anything()}, checkpoint)
    code, text = run_siso("convert-ir", checkpoint, "--out", tmp_path / "ir")
    assert code == 2 and "refused for safety" in text
    assert "weights_only=False" not in text and "weights_only" not in text.lower().replace("weights_only=true", "")


# -- the benchmark's manifests -----------------------------------------------------------------------------


@pytest.mark.parametrize("record, words", [
    ({"id": "dog\n", "images": ["a.jpg"], "class": "dog", "prompts": ["p"]}, "must be letters, digits"),
    ({"images": ["a.jpg"], "class": "dog", "prompts": 5}, '"prompts" must be a list of strings'),
    ({"images": [5], "class": "dog", "prompts": ["p"]}, '"images" must be a list of strings'),
    ({"images": ["a.jpg"], "class": "dog", "scene": "s.jpg", "mask": 7}, '"mask" must be a string'),
    ({"images": ["a.jpg"], "class": 3, "prompts": ["p"]}, '"class" must be a string'),
])
def test_manifest_fields_of_the_wrong_type(run_siso, tmp_path, record, words):
    manifest = tmp_path / "items.jsonl"
    manifest.write_text(json.dumps(record) + "\n")
    code, text = run_siso("bench", manifest, "--out", tmp_path / "bench")
    assert code == 2 and words in text and "line 1" in text


def test_manifest_that_is_not_utf8(run_siso, tmp_path):
    manifest = tmp_path / "items.jsonl"
    manifest.write_bytes(b'{"images": ["a.jpg"], "class": "dog"}\n{"class": "caf\xe9"}\n')
    code, text = run_siso("bench", manifest, "--out", tmp_path / "bench")
    assert code == 2 and "line 2" in text and "UTF-8" in text


# -- the shared web app ---------------------------------------------------------------------------------


def test_app_refuses_bad_settings_before_serving(run_siso, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, text = run_siso("app", "--port", port, "--runs-dir", tmp_path / "runs")
        assert code == 2 and "--port" in text and str(port) in text
        code, text = run_siso("app", "--host", "0.0.0.0", "--port", port, "--runs-dir", tmp_path / "runs")
        assert code == 2 and "NO login" in text and "--auth USER:PASSWORD" in text and "--model-allowlist" in text
    code, text = run_siso("app", "--port", "70000")
    assert code == 2 and "from 1 to 65535" in text
    (tmp_path / "file").write_text("x")
    code, text = run_siso("app", "--runs-dir", tmp_path / "file")
    assert code == 2 and "is a file" in text
    code, text = run_siso("app", "--max-upload-mb", "-5")
    assert code == 2 and "--max-upload-mb" in text
    code, text = run_siso("app", "--auth", "nopassword")
    assert code == 2 and "USER:PASSWORD" in text


def test_app_limits_jobs_and_models(sd_dir, dino_dir, subject_photo, tmp_path):
    """An upper bound on iterations, a time limit per job, and only the allowed models."""
    from types import SimpleNamespace

    import gradio as gr

    from siso.app import AppSettings, SisoApp

    settings = AppSettings(model=str(sd_dir), dino_model=str(dino_dir), resolution=RESOLUTION, max_steps=5,
                           device="cpu", runs_dir=tmp_path / "runs", max_job_steps=6, max_job_minutes=1e-6,
                           model_allowlist=(str(sd_dir),))
    app = SisoApp(settings)
    request = SimpleNamespace(session_hash="tab")
    with pytest.raises(gr.Error, match="at most 6 iterations"):
        list(app.start(request, [str(subject_photo)], PROMPT, str(sd_dir), 42, RESOLUTION, 7, 5e-3, None))
    with pytest.raises(gr.Error, match="only runs"):
        list(app.start(request, [str(subject_photo)], PROMPT, "/etc", 42, RESOLUTION, 5, 5e-3, None))
    views = list(app.start(request, [str(subject_photo)], PROMPT, str(sd_dir), 42, RESOLUTION, 5, 5e-3, None))
    status = views[-1][4]
    assert "limit of 1e-06 minutes per job" in status and "interrupted" in status
    assert len(app.session(request).events) == 1  # the time limit let the first iteration finish, no more
    views = list(app.resume(request))  # Continue: 5 more allowed, but the 6-iteration cap leaves 5
    assert len(app.session(request).run.session.optimization.history) == 2  # the time limit again stopped it
    from siso.errors import SisoError

    with pytest.raises(SisoError, match="--max-job-steps"):
        AppSettings(max_steps=300)  # beyond the default cap of 200 per job


def test_a_lora_write_error_from_safetensors_is_one_clear_message(run_siso, monkeypatch, tmp_path, sd_dir,
                                                                  dino_dir, subject_photo):
    """safetensors raises its own error, not an OSError, when the disk is full under it."""
    from safetensors import SafetensorError

    from siso import lora

    full = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')
    fail_from_call(monkeypatch, lora, "save_file", 3, full)
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "10",
                                         "--early-stop-patience", "10", "--lr", "5e-2"))
    assert code == 2, text
    text = " ".join(text.split())
    assert "Writing the run failed (No space left on device)" in text and "Free some space" in text
    record = strict_json(out / "run.json")
    assert record["status"] == "failed" and record["stop_reason"] == "write_error"
    assert (out / "losses.png").is_file()
    saved = record["lora_step"]
    assert saved is not None and f"iteration {saved}" in text.lower()  # what is really on disk
    assert_lora_renders_best_png(sd_dir, out)


def test_a_disk_turned_read_only_names_the_iteration_on_disk(run_siso, monkeypatch, tmp_path, sd_dir, dino_dir,
                                                              subject_photo):
    from siso import run_directory as runs

    # The second best's image (written into its fresh lora/) meets a disk turned read-only.
    fail_from_call(monkeypatch, runs, "write_png", 2, OSError(errno.EROFS, "Read-only file system"),
                   counts=lambda image, path: Path(path).name == "best.png")
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "10",
                                         "--early-stop-patience", "10", "--lr", "5e-2"))
    assert code == 2, text
    text = " ".join(text.split())
    record = strict_json(out / "run.json")
    assert "Read-only file system" in text and "writable disk" in text and "Free some space" not in text
    assert record["status"] == "failed" and record["lora_step"] == 0  # the first best is what is on disk
    assert "Iteration 0's image and LoRA (best.png and lora/)" in text and "could not be written" in text
    assert_lora_renders_best_png(sd_dir, out)


LONG = "x" * 256  # one byte more than ext4, XFS, btrfs and tmpfs allow in a name


@pytest.mark.parametrize("where", ["generate --out", "generate --subject", "render --out", "bench --out"])
def test_a_name_too_long_for_the_filesystem_is_named(run_siso, no_model_loads, tmp_path, sd_dir, dino_dir,
                                                     subject_photo, where):
    command, flag = where.split()
    if command == "generate":
        out, subject = (tmp_path / LONG, subject_photo) if flag == "--out" else (tmp_path / "run", tmp_path / LONG)
        args = generate_args(sd_dir, dino_dir, subject, out)
    elif command == "render":
        args = ["render", "--model", str(sd_dir), "--prompt", PROMPT, "--out", str(tmp_path / f"{LONG}.png"),
                "--device", "cpu"]
    else:
        manifest = tmp_path / "manifest.jsonl"
        manifest.write_text(json.dumps({"id": "dog", "class": "dog", "images": [str(subject_photo)],
                                        "prompts": ["a dog"]}) + "\n")
        args = ["bench", str(manifest), "--out", str(tmp_path / LONG), "--model", str(sd_dir), "--device", "cpu"]
    code, text = run_siso(*args)
    assert code == 2, text
    assert "bytes long, and this filesystem allows 255; choose a shorter name" in " ".join(text.split())


def test_a_pipe_or_a_device_is_not_called_an_empty_photo(run_siso, no_model_loads, tmp_path, sd_dir, dino_dir):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    for subject in (fifo, Path("/dev/zero")):
        code, text = run_siso(*generate_args(sd_dir, dino_dir, subject, tmp_path / "run"))
        assert code == 2 and "is not a regular file" in text and "empty" not in text, text


KILLED_SWAPPER = """
import sys, tempfile
from pathlib import Path
from siso.files import replace_directory
target = Path(sys.argv[1])
for i in range(10**9):
    fresh = Path(tempfile.mkdtemp(prefix=".fresh-", dir=target.parent))
    (fresh / "lora.txt").write_text(str(i))
    (fresh / "best.txt").write_text(str(i))
    replace_directory(fresh, target)
"""


def test_a_directory_replaced_in_one_step_is_never_a_mixture_whenever_it_is_killed(tmp_path):
    """What a SIGKILL leaves of a pair swapped in over and over: always one iteration's two files together."""
    import random

    for attempt in range(12):
        target = tmp_path / f"pair-{attempt}"
        process = subprocess.Popen([sys.executable, "-c", KILLED_SWAPPER, str(target)])
        deadline = time.monotonic() + 60
        while not target.exists():  # swapping now, however slowly the interpreter started
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(random.random() * 0.2)
        process.kill()
        process.wait(timeout=30)
        files = {p.name: p.read_text() for p in target.iterdir()}
        assert files.keys() == {"lora.txt", "best.txt"} and files["lora.txt"] == files["best.txt"], (attempt, files)


def test_replace_directory_without_an_atomic_exchange(monkeypatch, tmp_path):
    from siso import files

    monkeypatch.setattr(files, "_exchange", lambda first, second: False)  # a filesystem without RENAME_EXCHANGE
    target = tmp_path / "lora"
    for content in ("one", "two"):
        fresh = tmp_path / f".fresh-{content}"
        fresh.mkdir()
        (fresh / "file").write_text(content)
        files.replace_directory(fresh, target)
        assert (target / "file").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # the old one deleted, nothing aside
