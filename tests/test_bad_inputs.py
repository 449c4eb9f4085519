"""The CLI's contract for bad input, end to end: one clear message, exit code 2, never a traceback.

Each test runs ``siso.cli.main()`` in-process with one bad input among otherwise valid ones (the tiny
models, CPU, 32 px, one step), so the failure seen is the one the test is about. A failed start must
also leave nothing behind: ``--out`` is only created once everything has loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RESOLUTION
from PIL import Image

from siso.similarity.loss import SimilarityLoss

PROMPT = "a photo of a dog"


@pytest.fixture
def siso(run_siso):
    """``siso(*argv) -> (exit code, output)``: conftest's ``run_siso``."""
    return run_siso


def error_line(code: int, output: str, *words: str) -> str:
    """Exit code 2 and one ``Error:`` line containing each of ``words``."""
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "dog.png"
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (96, 1)), np.tile(ramp[:, None], (1, 96)), 255 - np.tile(ramp, (96, 1))],
                             axis=-1)).save(path)
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "run"


@pytest.fixture
def generate(siso, photo, out, sd_dir, dino_dir):
    """``generate(*flags, **options)``: siso generate with valid values, ``options`` replacing them.

    Option names use underscores for dashes; ``None`` drops an option.
    """

    def run(*flags, **options) -> tuple[int, str]:
        values = {"subject": photo, "prompt": PROMPT, "out": out, "model": sd_dir, "dino_model": dino_dir,
                  "device": "cpu", "resolution": RESOLUTION, "max_steps": 1, **options}
        argv = ["generate"]
        for name, value in values.items():
            if value is not None:
                argv += [f"--{name.replace('_', '-')}", value]
        return siso(*argv, *flags)

    return run


def refused(generate, out, *words, flags=(), **options) -> str:
    """The run is refused with a message holding ``words``, and no run directory appears."""
    assert not out.exists()
    line = error_line(*generate(*flags, **options), *words)
    assert not out.exists(), "a failed start must not create the run directory"
    return line


# -- siso generate ---------------------------------------------------------------------------


def test_valid_arguments_run(generate, out):
    """The baseline every other test changes one thing of."""
    code, output = generate()
    assert code == 0, output
    assert json.loads((out / "run.json").read_text())["stop_reason"] == "max_steps"


def test_missing_subject(generate, out, tmp_path):
    missing = tmp_path / "no-such-dog.jpg"
    refused(generate, out, str(missing), "does not exist", "check the path", subject=missing)


def test_subject_is_a_directory(generate, out, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    refused(generate, out, str(folder), "is a directory", subject=folder)


def test_text_file_as_subject(generate, out, tmp_path):
    fake = tmp_path / "dog.jpg"
    fake.write_text("not a photo\n")
    refused(generate, out, str(fake), "not an image format", "JPEG, PNG or WebP", subject=fake)


def test_truncated_subject(generate, out, tmp_path, photo):
    whole = tmp_path / "whole.jpg"
    Image.open(photo).resize((256, 256)).save(whole, quality=95)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    refused(generate, out, str(cut), "truncated or corrupt", subject=cut)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(generate, out, prompt):
    refused(generate, out, "prompt is empty", '--prompt "a photo of a dog"', prompt=prompt)


@pytest.mark.parametrize("resolution,proposals", [(34, "try 32 or 36"), (30, "try 28 or 32"), (2, "try 4 or 8")])
def test_resolution_not_a_multiple(generate, out, resolution, proposals):
    refused(generate, out, f"--resolution {resolution}", "not a multiple of 4", proposals, resolution=resolution)


def test_resolution_zero(generate, out):
    refused(generate, out, "--resolution", ">= 1", resolution=0)


def test_model_directory_without_model_index(generate, out, tmp_path):
    folder = tmp_path / "not-a-pipeline"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    refused(generate, out, str(folder), "no model_index.json", "save_pretrained", model=folder)


def test_unsupported_pipeline(generate, out, tmp_path):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline",
                                                         "_diffusers_version": "0.42.1"}))
    refused(generate, out, "KandinskyPipeline", "does not support", "supported pipelines",
            "StableDiffusionPipeline", "StableDiffusionXLPipeline", model=folder)


def test_unreachable_hub_is_one_message_at_once(generate, out, monkeypatch):
    """A Hub id not in the cache, on a machine that cannot reach the Hub: no ~25 s of retries and
    retry lines before the answer, just siso's message."""
    import socket
    import time

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    started = time.monotonic()
    code, output = generate(model="someone/never-downloaded")
    assert time.monotonic() - started < 10
    error_line(code, output, "'someone/never-downloaded' is not in the local Hugging Face cache", endpoint,
               "cannot be reached", "internet access", "local directory")
    assert "Retrying" not in output and "local_dir_use_symlinks" not in output
    assert not out.exists()


@pytest.mark.parametrize("status,hub_error,expected", [
    (403, "GatedRepo", ("is a gated model on the Hugging Face Hub", "accept its licence", "hf auth login")),
    (401, "RepoNotFound", ("is neither a local directory nor a model on the Hugging Face Hub", "Check the id")),
])
def test_a_hub_model_the_hub_will_not_give_says_why(generate, out, monkeypatch, status, hub_error, expected):
    """The real Hub client against a loopback server that answers as the Hub does for a gated repository
    (403, X-Error-Code GatedRepo) or a missing one (401, RepoNotFound): one message saying what to do,
    not diffusers' "not a valid model identifier"."""
    import http.server
    import threading

    from huggingface_hub import constants

    class RefusingHub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            if self.path == "/":  # siso's reachability check
                self.send_response(200)
            else:
                self.send_response(status)
                self.send_header("X-Error-Code", hub_error)
                self.send_header("X-Error-Message", "Access restricted" if status == 403 else "Repository not found")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        code, output = generate(model="stabilityai/stable-diffusion-3.5-large-turbo")
    finally:
        server.shutdown()
    error_line(code, output, *expected)
    assert not out.exists()


def test_ir_model_without_weights(generate, out, tmp_path, ir_dir):
    folder = tmp_path / "ir-half"
    folder.mkdir()
    shutil.copy(ir_dir / "config.json", folder)
    refused(generate, out, str(folder), "missing model.safetensors", "siso convert-ir", ir_model=folder)


def test_similarity_ir_without_ir_model(generate, out):
    refused(generate, out, "--similarity includes ir", "--ir-model", similarity="ir")


@pytest.mark.parametrize("similarity", ["foo", "dino,foo", ","])
def test_unknown_similarity(generate, out, similarity):
    refused(generate, out, "--similarity", "dino, ir", similarity=similarity)


def test_max_steps_zero(generate, out):
    refused(generate, out, "--max-steps", ">= 1", "got 0", max_steps=0)


def test_more_grad_steps_than_denoise_steps(generate, out):
    refused(generate, out, "--grad-steps (2) cannot exceed --denoise-steps (1)", grad_steps=2, denoise_steps=1)


def test_unknown_device(generate, out):
    refused(generate, out, "--device", "auto, cpu, cuda, mps", "'tpu'", device="tpu")


def test_out_is_a_file(generate, tmp_path):
    target = tmp_path / "run.txt"
    target.write_text("keep me\n")
    error_line(*generate(out=target), str(target), "is a file")
    assert target.read_text() == "keep me\n"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_not_empty_without_overwrite(generate, out):
    (out / "steps").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes\n")
    (out / "run.json").write_text('{"from": "an earlier run"}\n')
    (out / "steps" / "0000.png").write_bytes(b"an earlier image")
    before = snapshot(out)
    error_line(*generate(), str(out), "is not empty", "--overwrite")
    assert snapshot(out) == before
    assert sorted(p.name for p in out.rglob("*")) == ["0000.png", "notes.txt", "run.json", "steps"]


# -- out of memory ----------------------------------------------------------------------------


def fail_with_out_of_memory(monkeypatch, on_call: int) -> None:
    """Make the similarity loss raise CUDA's out-of-memory error on its ``on_call``-th call."""
    original = SimilarityLoss.forward
    calls = []

    def forward(self, images):
        calls.append(1)
        if len(calls) == on_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, images)

    monkeypatch.setattr(SimilarityLoss, "forward", forward)


def test_out_of_memory_on_the_first_iteration(generate, out, monkeypatch):
    fail_with_out_of_memory(monkeypatch, on_call=1)
    error_line(*generate(), "ran out of memory", f"a lower --resolution (now {RESOLUTION})")
    record = json.loads((out / "run.json").read_text())
    assert record["stop_reason"] == "out_of_memory"
    assert record["losses"] == [] and record["best_step"] is None


def test_out_of_memory_later_keeps_the_best_iteration(generate, out, monkeypatch):
    fail_with_out_of_memory(monkeypatch, on_call=2)
    error_line(*generate(max_steps=3), "ran out of memory", "--resolution", "best of 1 iterations", str(out))
    record = json.loads((out / "run.json").read_text())
    assert record["stop_reason"] == "out_of_memory"
    assert len(record["losses"]) == 1 and record["best_step"] == 0
    assert (out / "best.png").is_file() and (out / "lora").is_dir()


def test_out_of_memory_while_loading(generate, out, monkeypatch):
    def load_similarity(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr("siso.models.load_similarity", load_similarity)
    refused(generate, out, "ran out of memory", "--resolution")


def test_out_of_memory_message_claims_no_save_when_nothing_was_saved(generate, out, monkeypatch):
    fail_with_out_of_memory(monkeypatch, on_call=1)
    line = error_line(*generate(), "ran out of memory")
    assert not (out / "best.png").exists()
    assert "was saved" not in line


# -- error messages are printed as they are -------------------------------------------------------


@pytest.mark.parametrize("folder,name", [(".", "[edited] dog.jpg"), ("shoot [", "] dog.jpg")])
def test_paths_with_brackets_are_named_verbatim(generate, out, tmp_path, folder, name):
    missing = tmp_path / folder / name
    refused(generate, out, str(missing), "does not exist", subject=missing)


# -- siso render ----------------------------------------------------------------------------------


@pytest.fixture
def render(siso, sd_dir, tmp_path):
    def run(**options) -> tuple[int, str]:
        values = {"model": sd_dir, "prompt": PROMPT, "out": tmp_path / "dog.png", "device": "cpu",
                  "resolution": RESOLUTION, **options}
        argv = ["render"]
        for name, value in values.items():
            argv += [f"--{name.replace('_', '-')}", value]
        return siso(*argv)

    return run


def test_render_with_missing_lora(render, tmp_path):
    missing = tmp_path / "run" / "lora"
    error_line(*render(lora=missing), f"--lora {missing} does not exist", "lora/ directory of a siso run")
    assert not (tmp_path / "dog.png").exists()


def test_render_with_lora_directory_without_weights(render, tmp_path):
    empty = tmp_path / "lora"
    empty.mkdir()
    error_line(*render(lora=empty), str(empty), "pytorch_lora_weights.safetensors")


def test_render_to_a_jpeg(render, tmp_path):
    target = tmp_path / "dog.jpg"
    error_line(*render(out=target), f"--out {target} must be a .png")
    assert not target.exists()


def test_render_with_empty_prompt(render):
    error_line(*render(prompt=" "), "prompt is empty")


# -- siso convert-ir ------------------------------------------------------------------------------


def test_convert_ir_missing_checkpoint(siso, tmp_path):
    checkpoint, target = tmp_path / "guie.pth", tmp_path / "ir"
    error_line(*siso("convert-ir", checkpoint, "--out", target), str(checkpoint), "does not exist",
               "guieweights0732")
    assert not target.exists()


def test_convert_ir_text_file(siso, tmp_path):
    checkpoint, target = tmp_path / "guie.pth", tmp_path / "ir"
    checkpoint.write_text("not a checkpoint\n")
    error_line(*siso("convert-ir", checkpoint, "--out", target), str(checkpoint), "not a PyTorch checkpoint")
    assert not target.exists()
