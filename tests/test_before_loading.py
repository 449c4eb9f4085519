"""What is checked before any model loads, and how it is said: the out directory against the current one,
a model's files (its index, its components, its config values), writability without writing into a
directory that is then refused, a Hub that cannot be reached for ANY model (not only the backbone),
and the messages for the wrong kind of model or file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import helpers
import pytest
from conftest import RESOLUTION
from helpers import PROMPT


def generate_args(model_dir, dino_dir, subject, out, *extra):
    return helpers.generate_args(model_dir, dino_dir, subject, out, "--max-steps", "1", *extra)


def fake_siso_run(directory: Path) -> Path:
    """A directory siso calls its own run (what --overwrite may replace)."""
    (directory / "steps").mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps({"task": "generate", "config": {}}))
    (directory / "best.png").write_bytes(b"old")
    return directory


def error_of(code: int, text: str, *words: str) -> None:
    assert code == 2, text
    for word in words:
        assert word in " ".join(text.split()), text


def test_overwrite_from_inside_the_run_is_refused_before_loading(run_siso, no_model_loads, monkeypatch, tmp_path,
                                                                 sd_dir, dino_dir, subject_photo):
    run = fake_siso_run(tmp_path / "run")
    (run / "steps").joinpath("0000.png").write_bytes(b"x")
    monkeypatch.chdir(run / "steps")  # deeper inside it, as well
    for out in (run, Path("..")):
        error_of(*run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--overwrite")),
                 "holds the current directory", f"cd {run.parent}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no .siso-new-* beside it
    assert sorted(p.name for p in run.iterdir()) == ["best.png", "run.json", "steps"]  # nor inside


def test_out_dot_in_an_empty_directory_is_fine(run_siso, monkeypatch, tmp_path, sd_dir, dino_dir, subject_photo):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, "."))
    assert code == 0, text
    assert (here / "run.json").is_file() and (here / "lora").is_dir()


@pytest.fixture
def write_tests(monkeypatch) -> list[Path]:
    """The directories siso's write tests probe (tempfile.NamedTemporaryFile's ``dir``)."""
    probed, original = [], tempfile.NamedTemporaryFile

    def recording(*args, **kwargs):
        probed.append(Path(kwargs["dir"]).resolve())
        return original(*args, **kwargs)

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", recording)
    return probed


def test_a_refused_directory_is_not_written_into_even_for_a_test(run_siso, no_model_loads, write_tests, tmp_path,
                                                                 sd_dir, dino_dir, subject_photo, manifest_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(mine)
    for out in (mine, link):
        error_of(*run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out)), "is not empty")
        error_of(*run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--overwrite")), "is not a siso run")
        error_of(*run_siso("bench", manifest_path, "--out", out, "--model", sd_dir, "--dino-model", dino_dir,
                           "--device", "cpu"), "is not a siso benchmark")
    assert mine.resolve() not in write_tests
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.fixture
def manifest_path(tmp_path, subject_photo) -> Path:
    path = tmp_path / "manifest.jsonl"
    item = {"id": "dog", "class": "dog", "images": [str(subject_photo)], "prompts": [PROMPT]}
    path.write_text(json.dumps(item) + "\n")
    return path


def test_overwrite_of_a_linked_run_replaces_the_run_and_keeps_the_link(tmp_path):
    from siso.run_directory import prepare_run_dir

    target = fake_siso_run(tmp_path / "runs" / "dog")
    link = tmp_path / "latest"
    link.symlink_to(target)
    out, lock = prepare_run_dir(link, overwrite=True)
    lock.release()
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert sorted(p.name for p in target.iterdir()) == [".siso-lock"]  # the fresh run, nothing old
    leftovers = [p.name for folder in (tmp_path, target.parent) for p in folder.iterdir() if ".siso-" in p.name]
    assert leftovers == []


# -- a model's files -------------------------------------------------------------------------------------------


@pytest.fixture
def broken_copy(sd_dir, tmp_path):
    """``broken_copy(change)``: a copy of the tiny SD pipeline that ``change(folder)`` damaged."""
    def make(change) -> Path:
        folder = tmp_path / f"model-{len(list(tmp_path.glob('model-*')))}"
        shutil.copytree(sd_dir, folder)
        change(folder)
        return folder
    return make


def rewrite(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("change, words", [
    (lambda f: (f / "model_index.json").write_text("{not json"), ("model_index.json", "is not valid JSON")),
    (lambda f: (f / "model_index.json").write_text("[1, 2]"), ("model_index.json", "holds a JSON list")),
    (lambda f: shutil.rmtree(f / "vae"), ("has no vae/ folder", "AutoencoderKL", "download the model again")),
    (lambda f: (f / "unet" / "config.json").write_text("{"), ("unet/config.json", "is not valid JSON")),
    (lambda f: rewrite(f / "unet" / "config.json", cross_attention_dim="banana"),
     ("unet/config.json", "sets cross_attention_dim to 'banana'", "UNet2DConditionModel takes a number")),
    (lambda f: rewrite(f / "scheduler" / "scheduler_config.json", beta_start="small"),
     ("scheduler_config.json", "sets beta_start to 'small'")),
])
def test_a_damaged_model_is_named_for_what_is_wrong_before_it_loads(run_siso, no_model_loads, broken_copy, tmp_path,
                                                                    dino_dir, subject_photo, change, words):
    model = broken_copy(change)
    error_of(*run_siso(*generate_args(model, dino_dir, subject_photo, tmp_path / "run")), *words)
    assert not (tmp_path / "run").exists()


def test_the_tiny_models_pass_the_file_checks(sd_dir, sdxl_dir, flux_dir, sana_dir):
    """The checks refuse nothing a real save_pretrained layout holds."""
    from siso.pipeline_files import check_pipeline_folder

    for folder in (sd_dir, sdxl_dir, flux_dir, sana_dir):
        assert check_pipeline_folder(Path(folder), str(folder))["_class_name"].endswith("Pipeline")


def test_a_diffusers_pipeline_as_the_dino_model_is_named(run_siso, no_model_loads, tmp_path, sd_dir, subject_photo):
    error_of(*run_siso(*generate_args(sd_dir, sd_dir, subject_photo, tmp_path / "run")),
             f"--dino-model {sd_dir} is a diffusers pipeline", "not DINOv2")
    error_of(*run_siso(*generate_args(sd_dir, sd_dir / "unet", subject_photo, tmp_path / "run")),
             "names no model_type", "not DINOv2")


# -- the Hub, for every model ----------------------------------------------------------------------------------


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path) -> str:
    """A Hub endpoint that refuses connections, an empty cache, and the Hub switched on."""
    from huggingface_hub import constants

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return endpoint


@pytest.mark.parametrize("flag, given", [
    ("--dino-model", ()),
    ("--label-model", ()),  # no classes given: CLIP names them
    ("--detector-model", ("--subject-class", "dog", "--input-class", "cat")),  # no mask: Grounding DINO finds it
    ("--segmenter-model", ("--subject-class", "dog", "--input-class", "cat", "--detector-model", "LOCAL")),
])
def test_an_unreachable_hub_is_said_at_once_for_every_model(run_siso, no_model_loads, unreachable_hub, tmp_path,
                                                           sd_dir, dino_dir, subject_photo, scene_photo, flag, given):
    given = [str(dino_dir) if value == "LOCAL" else value for value in given]  # local: only its existence counts
    models = {"--dino-model": str(dino_dir), flag: "someone/not-downloaded"}
    args = ["edit", "--subject", subject_photo, "--input", scene_photo, "--out", tmp_path / "run", "--model", sd_dir,
            "--resolution", RESOLUTION, "--device", "cpu", *given, *(x for pair in models.items() for x in pair)]
    started = time.monotonic()
    code, text = run_siso(*args)
    assert time.monotonic() - started < 10
    error_of(code, text, f"{flag} 'someone/not-downloaded' is not in the local Hugging Face cache", unreachable_hub,
             "cannot be reached")
    assert "Retrying" not in text and not (tmp_path / "run").exists()


def test_a_given_mask_and_classes_need_no_hub(run_siso, unreachable_hub, tmp_path, sd_dir, dino_dir, subject_photo,
                                              scene_photo):
    """Only the models an edit will load are asked for: with a mask and both classes, no labeller, detector
    or segmenter (their Hub defaults stay unasked on a machine without the Hub)."""
    from PIL import Image

    mask = tmp_path / "mask.png"
    width, height = Image.open(scene_photo).size
    painted = Image.new("L", (width, height), 0)
    painted.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))  # the object: the middle
    painted.save(mask)
    code, text = run_siso("edit", "--subject", subject_photo, "--input", scene_photo, "--mask", mask,
                          "--subject-class", "dog", "--input-class", "cat", "--out", tmp_path / "run", "--model",
                          sd_dir, "--dino-model", dino_dir, "--resolution", RESOLUTION, "--device", "cpu",
                          "--max-steps", "1")
    assert code == 0, text


def test_bench_checks_its_evaluation_models_before_any_worker(run_siso, no_model_loads, unreachable_hub, tmp_path,
                                                              sd_dir, dino_dir, manifest_path):
    code, text = run_siso("bench", manifest_path, "--out", tmp_path / "bench", "--model", sd_dir, "--dino-model",
                          dino_dir, "--clip-model", "someone/clip", "--device", "cpu")
    error_of(code, text, "--clip-model 'someone/clip' is not in the local Hugging Face cache")
    assert not (tmp_path / "bench").exists()


# -- siso convert-ir ---------------------------------------------------------------------------------------------


def test_convert_ir_given_a_directory_says_so(run_siso, tmp_path):
    folder = tmp_path / "guieweights0732"
    folder.mkdir()
    error_of(*run_siso("convert-ir", folder, "--out", tmp_path / "ir"), "is a directory", ".pth file")


def test_convert_ir_on_a_disk_that_refuses_the_write(run_siso, monkeypatch, tmp_path):
    """A full disk under save_pretrained (safetensors' own error) and a read-only one (an OSError): one message
    each, with what to do, and nothing left behind."""
    import errno

    from safetensors import SafetensorError
    from test_fidelity import tiny_ir_checkpoint

    from siso.similarity.ir import SisoIRModel

    checkpoint = tiny_ir_checkpoint(tmp_path / "guie.pth")
    failures = {
        "Free some space": SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                           'message: "No space left on device" })'),
        "read-only": OSError(errno.EROFS, "Read-only file system"),
    }
    for advice, failure in failures.items():
        def refuse(*_args, failure=failure, **_kwargs):
            raise failure

        monkeypatch.setattr(SisoIRModel, "save_pretrained", refuse)
        error_of(*run_siso("convert-ir", checkpoint, "--out", tmp_path / "ir"),
                 "Could not write the converted IR model", advice)
        assert not (tmp_path / "ir").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_check_writable_probes_where_it_is_told(tmp_path):
    from siso.run_directory import check_writable

    target = tmp_path / "new" / "deeper"
    check_writable(target)  # the nearest existing directory is probed: nothing stays behind
    assert os.listdir(tmp_path) == []
