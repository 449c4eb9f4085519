"""Every number a user sizes is bounded where a limit protects the machine, and long work shows its progress:
render steps (the CLI and the app's job limits), the LoRA's rank, the prompt's length."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import RESOLUTION
from helpers import PROMPT, generate_args

from siso.images import pil_to_tensor
from siso.rendering import render


def test_render_steps_are_bounded_before_the_model_loads(run_siso, no_model_loads, tmp_path, sd_dir):
    code, text = run_siso("render", "--model", sd_dir, "--prompt", PROMPT, "--out", tmp_path / "a.png",
                          "--steps", "100000", "--device", "cpu")
    assert code == 2 and "--steps 100000" in text and "at most 1000" in text
    assert not (tmp_path / "a.png").exists()


def test_a_render_reports_each_step_and_the_report_changes_nothing(sd_dir):
    seen = []
    followed = render(str(sd_dir), PROMPT, steps=3, resolution=RESOLUTION, device="cpu",
                      on_step=lambda done, total: seen.append((done, total)))
    plain = render(str(sd_dir), PROMPT, steps=3, resolution=RESOLUTION, device="cpu")
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(pil_to_tensor(followed), pil_to_tensor(plain))


def test_the_cli_render_shows_its_steps(run_siso, tmp_path, sd_dir):
    code, text = run_siso("render", "--model", sd_dir, "--prompt", PROMPT, "--out", tmp_path / "a.png",
                          "--steps", "3", "--resolution", RESOLUTION, "--device", "cpu")
    assert code == 0, text
    assert "Rendering" in text and "3/3" in text and (tmp_path / "a.png").is_file()


def test_the_apps_job_limits_cover_render(sd_dir, dino_dir, tmp_path):
    import gradio as gr

    from siso.app import AppSettings, SisoApp

    request = SimpleNamespace(session_hash="tab")
    app = SisoApp(AppSettings(model=str(sd_dir), dino_model=str(dino_dir), resolution=RESOLUTION, max_steps=2,
                              device="cpu", runs_dir=tmp_path / "runs", max_job_steps=5))
    with pytest.raises(gr.Error, match="at most 5 iterations per job; asked for 10000000"):
        app.render(request, str(sd_dir), None, False, PROMPT, 10**7, 7, RESOLUTION)
    reported = []
    path, _ = app.render(request, str(sd_dir), None, False, PROMPT, 3, 7, RESOLUTION,
                         progress=lambda fraction, desc: reported.append((fraction, desc)))
    assert reported == [((1, 3), "Rendering"), ((2, 3), "Rendering"), ((3, 3), "Rendering")] and path.endswith(".png")
    # Past the time limit a render stops at its next step (the GPU queue is shared), saying why.
    hurried = SisoApp(AppSettings(model=str(sd_dir), dino_model=str(dino_dir), resolution=RESOLUTION, max_steps=2,
                                  device="cpu", runs_dir=tmp_path / "runs", max_job_minutes=1e-6), cache=app.cache)
    with pytest.raises(gr.Error, match=r"limit of 1e-06 minutes per job, after 1 of 4 steps"):
        hurried.render(request, str(sd_dir), None, False, PROMPT, 4, 7, RESOLUTION)
    # The backbone was handed back clean: the next render is the same as a first one.
    again, _ = app.render(request, str(sd_dir), None, False, PROMPT, 3, 7, RESOLUTION)
    from PIL import Image

    assert torch.equal(pil_to_tensor(Image.open(again)), pil_to_tensor(Image.open(path)))


def test_a_lora_rank_no_layer_can_use_is_refused_before_any_lora_memory(run_siso, tmp_path, sd_dir, dino_dir,
                                                                        subject_photo):
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1", "--lora-rank",
                                         "100000"))
    assert code == 2 and "--lora-rank 100000 is more than any LoRA layer" in text and "rank" in text, text
    useful = int(text.split("have rank ")[1].split()[0])
    assert 1 <= useful < 100000 and f"--lora-rank {useful} or less" in text
    assert not out.exists()
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1", "--lora-rank",
                                         str(useful)))
    assert code == 0, text  # the bound itself is allowed


def test_a_prompt_cut_short_is_said_with_how_much_is_read(run_siso, tmp_path, sd_dir, dino_dir, subject_photo):
    import json

    long_prompt = "a photo of a dog " * 20  # the tiny CLIP tokenizer: about one token per letter
    out = tmp_path / "run"
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, out, "--max-steps", "1", "--prompt",
                                         long_prompt))
    assert code == 0, text
    from transformers import CLIPTokenizer

    tokens = len(CLIPTokenizer.from_pretrained(sd_dir / "tokenizer")(long_prompt)["input_ids"])  # with start and end
    assert tokens > 77
    line = " ".join(text.split())
    assert f"Note: The prompt is {tokens} tokens long for CLIPTokenizer, which reads the first 77" in line
    assert json.loads((out / "run.json").read_text())["notes"][0].startswith(f"The prompt is {tokens} tokens")
    code, text = run_siso(*generate_args(sd_dir, dino_dir, subject_photo, tmp_path / "short", "--max-steps", "1"))
    assert code == 0 and "Note:" not in text
    assert "notes" not in json.loads((tmp_path / "short" / "run.json").read_text())


def test_the_apps_number_controls_take_what_an_api_client_sends(sd_dir, dino_dir, subject_photo, tmp_path):
    """gradio's API takes JSON: an empty seed (None) means the default; text or a fraction is refused by name."""
    import gradio as gr

    from siso.app import AppSettings, SisoApp

    app = SisoApp(AppSettings(model=str(sd_dir), dino_model=str(dino_dir), resolution=RESOLUTION, max_steps=1,
                              device="cpu", runs_dir=tmp_path / "runs"))
    request = SimpleNamespace(session_hash="api")
    for seed, words in (("abc", "must be a whole number, got 'abc'"), (1.5, "must be a whole number, got 1.5")):
        with pytest.raises(gr.Error, match=words):
            list(app.start(request, [str(subject_photo)], PROMPT, str(sd_dir), seed, RESOLUTION, 1, 5e-3, None))
    views = list(app.start(request, [str(subject_photo)], PROMPT, str(sd_dir), None, None, 1.0, "5e-3", None))
    assert "**Finished**" in views[-1][4]
    from siso.config import GenerateConfig
    from siso.knobs import knobs

    assert app.session(request).run.session.config.seed == knobs(GenerateConfig)["seed"].default
