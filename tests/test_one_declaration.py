"""A knob is declared once: change its default in that one line and every surface follows.

A copy of siso's source is edited in exactly one line per knob (generation's ``max_steps``, editing's
``bg_weight``, Sana's preset learning rate) and run from that copy in fresh processes: each command's
``--help``, docs/cli.md as generated, the web app's controls and what a run without the flag records in
run.json show the new value. Nothing else was edited, so nothing else needs to be.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RESOLUTION

SRC = Path(__file__).resolve().parents[1] / "src" / "siso"
EDITS = {  # file: (the one declaration as written, the same line with another default)
    "config.py": [("max_steps: int = knob(50,", "max_steps: int = knob(37,"),
                  ("bg_weight: float = knob(10.0,", "bg_weight: float = knob(4.5,")],
    "presets.py": [('family="sana", title="Sana", learning_rate=8e-4,',
                    'family="sana", title="Sana", learning_rate=9e-4,')],
}


@pytest.fixture(scope="module")
def edited(tmp_path_factory) -> Path:
    """A copy of src/siso with one line changed per knob; the directory to put on PYTHONPATH."""
    root = tmp_path_factory.mktemp("edited-src")
    shutil.copytree(SRC, root / "siso", ignore=shutil.ignore_patterns("__pycache__"))
    for name, changes in EDITS.items():
        path = root / "siso" / name
        text = path.read_text()
        for old, new in changes:
            assert text.count(old) == 1, f"{name}: the declaration {old!r} must appear exactly once"
            text = text.replace(old, new)
        path.write_text(text)
    return root


def run(edited: Path, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "PYTHONPATH": str(edited), "COLUMNS": "400", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return " ".join((done.stdout + done.stderr).split())


def test_the_copy_is_what_runs(edited):
    assert run(edited, "-c", "import siso; print(siso.__file__)").startswith(str(edited))


@pytest.mark.parametrize("command,expected", [
    ("generate", ["--max-steps INT Most optimisation iterations. [default: 37]", "Sana 9e-4"]),
    ("edit", ["[default: 37]", "--bg-weight FLOAT Weight of the background loss", "(0 turns it off). [default: 4.5]"]),
    ("bench", ["Most optimisation iterations. [default: 37]", "(0 turns it off). [default: 4.5]", "Sana 9e-4"]),
    ("app", ["Most optimisation iterations, the page's default. [default: 37]"]),
])
def test_every_commands_help_shows_the_new_default(edited, command, expected):
    text = run(edited, "-m", "siso.cli", command, "--help")
    for words in expected:
        assert words in text, words
    assert "[default: 50]" not in text and "[default: 10]" not in text


def test_the_generated_reference_shows_the_new_defaults(edited, tmp_path):
    run(edited, "-m", "siso.cli.reference", str(tmp_path / "cli.md"))
    text = (tmp_path / "cli.md").read_text()
    assert "| `--max-steps` | 37 |" in text and "| `--bg-weight` | 4.5 |" in text and "Sana 9e-4" in text
    assert "| `--max-steps` | 50 |" not in text


def test_the_web_apps_controls_show_the_new_defaults(edited, tmp_path):
    script = (
        "from pathlib import Path; from siso.app import AppSettings, build_app\n"
        f"demo = build_app(AppSettings(runs_dir=Path({str(tmp_path / 'runs')!r})))\n"
        "values = {c.elem_id: c.value for c in demo.blocks.values() if getattr(c, 'elem_id', None)}\n"
        "print(values['max-steps'], values['edit-max-steps'], values['edit-bg-weight'])\n"
    )
    assert run(edited, "-c", script).split()[-3:] == ["37", "37", "4.5"]


def test_runs_without_the_flag_record_the_new_defaults(edited, tmp_path, sd_dir, dino_dir, subject_photo,
                                                       scene_photo):
    common = ["--model", str(sd_dir), "--dino-model", str(dino_dir), "--resolution", str(RESOLUTION),
              "--device", "cpu"]
    run(edited, "-m", "siso.cli", "generate", "--subject", str(subject_photo), "--prompt", "a photo of a dog",
        "--out", str(tmp_path / "gen"), "--early-stop-patience", "1", *common)
    assert json.loads((tmp_path / "gen" / "run.json").read_text())["config"]["max_steps"] == 37
    mask = tmp_path / "mask.png"
    from PIL import Image

    size = Image.open(scene_photo).size
    picture = Image.new("L", size, 0)
    picture.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    picture.save(mask)
    run(edited, "-m", "siso.cli", "edit", "--subject", str(subject_photo), "--input", str(scene_photo),
        "--subject-class", "dog", "--input-class", "cat", "--mask", str(mask), "--out", str(tmp_path / "edit"),
        "--max-steps", "1", *common)
    config = json.loads((tmp_path / "edit" / "run.json").read_text())["config"]
    assert config["bg_weight"] == 4.5 and config["max_steps"] == 1
