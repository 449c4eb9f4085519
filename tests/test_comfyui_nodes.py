"""siso's ComfyUI node pack in a real ComfyUI, driven over its HTTP API as a user's workflow would be.

ComfyUI 0.3.75 (tests/comfy_support) starts on loopback with the pack linked into its custom_nodes and a
base directory of the test's own. Its models: the smallest SD 1.5 that ComfyUI's detection accepts, as a
diffusers folder in models/diffusers (what SISO optimises) and as one checkpoint file in
models/checkpoints (what KSampler samples from), with the same weights; a tiny DINOv2 for the loss.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from comfy_support import HERE, ComfyServer, run_in_comfyui
from comfy_support.workflows import api_to_ui
from PIL import Image

from siso.config import EditConfig, GenerateConfig
from siso.knobs import knobs
from siso.lora import KOHYA_WEIGHT_NAME

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "comfyui-siso"
WORKFLOWS = PACK / "workflows"
MODEL = "siso-sd15"
SIDE = 64  # the fixture model's images: fast on the CPU


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui")
    diffusers_dir = base / "models" / "diffusers" / MODEL
    tiny.diffusion.sd15_comfyui_pipeline().to(torch.float16).save_pretrained(diffusers_dir)
    (base / "models" / "checkpoints").mkdir(parents=True)
    checkpoint = base / "models" / "checkpoints" / f"{MODEL}.safetensors"
    run_in_comfyui(HERE / "single_file.py", str(diffusers_dir), str(checkpoint))
    tiny.similarity.dino_model().save_pretrained(base / "dino")
    unsupported = base / "models" / "diffusers" / "kandinsky"
    unsupported.mkdir(parents=True)
    (unsupported / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    (base / "input").mkdir()
    Image.new("RGB", (96, 128), (150, 95, 40)).save(base / "input" / "subject.png")
    scene = Image.new("RGBA", (SIDE, SIDE), (90, 120, 160, 255))
    alpha = np.full((SIDE, SIDE), 255, np.uint8)
    alpha[16:48, 16:48] = 0  # LoadImage's MASK is 1 - alpha: the object to replace
    scene.putalpha(Image.fromarray(alpha))
    scene.save(base / "input" / "scene.png")
    with ComfyServer(base, {PACK.name: PACK}) as server:
        server.dino = str(base / "dino")
        yield server


def tiny_personalize(comfy, **changes) -> dict:
    """The example workflow with what this machine can run: the fixture model, 64 px, a few iterations."""
    workflow = json.loads((WORKFLOWS / "personalize_api.json").read_text())
    workflow["2"]["inputs"].update({"model": MODEL, "resolution": SIDE, "max_steps": 3, "learning_rate": 5e-3,
                                    "dino_model": comfy.dino, "ir_model": "none", **changes})
    workflow["4"]["inputs"]["ckpt_name"] = f"{MODEL}.safetensors"
    workflow["8"]["inputs"].update(width=SIDE, height=SIDE)
    workflow["9"]["inputs"].update(steps=1, sampler_name="euler", scheduler="normal")
    return workflow


def run(comfy, workflow: dict) -> dict:
    prompt_id = comfy.post("/prompt", {"prompt": workflow})["prompt_id"]
    return comfy.wait_for(prompt_id)


def output_image(comfy, entry: dict) -> np.ndarray:
    return np.asarray(Image.open(comfy.base / "output" / entry["subfolder"] / entry["filename"]))


def runs_of(comfy, lora_name: str) -> list[Path]:
    return sorted((comfy.base / "output" / "siso").glob(f"{lora_name}-*"))


def test_object_info_lists_the_nodes_with_their_declared_inputs(comfy):
    info = comfy.get("/object_info")
    personalize, edit = info["SISOPersonalize"], info["SISOEdit"]
    assert personalize["category"] == edit["category"] == "SISO"
    assert personalize["display_name"] == "SISO Personalize" and edit["display_name"] == "SISO Edit"
    assert personalize["output"] == ["IMAGE", "IMAGE", "IMAGE", "*"]
    assert personalize["output_name"] == ["best", "iterations", "loss_curve", "lora_name"]
    required = personalize["input"]["required"]
    assert required["subject"][0] == "IMAGE"
    assert MODEL in required["model"][0] and "stabilityai/sdxl-turbo" in required["model"][0]
    assert "kandinsky" in required["model"][0]  # listed: siso refuses it with its own message
    declared = knobs(GenerateConfig)
    for name in ("seed", "max_steps", "resolution", "early_stop_patience", "learning_rate"):
        kind, options = required[name]
        assert options["tooltip"].startswith(declared[name].help)
        preset = declared[name].preset is not None
        assert options["default"] == (0 if preset else declared[name].default)
        assert kind == {int: "INT", float: "FLOAT"}[declared[name].value_type]
    assert personalize["input"]["optional"]["dino_model"][1]["default"] == declared["dino_model"].default
    assert edit["input"]["optional"]["mask"][0] == "MASK"
    assert edit["input"]["required"]["bg_weight"][1]["default"] == knobs(EditConfig)["bg_weight"].default
    assert edit["output"] == ["IMAGE", "MASK", "*"]


def test_personalize_then_lora_loader_then_ksampler(comfy):
    """The example workflow runs to its saved images; the LoRA it wrote into models/loras is the run's
    kohya file, which ComfyUI's LoraLoader applies whole and which changes what KSampler samples."""
    workflow = tiny_personalize(comfy)
    entry = run(comfy, workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    [siso_run] = runs_of(comfy, "siso-dog")
    record = json.loads((siso_run / "run.json").read_text())
    assert record["status"] == "finished" and len(record["losses"]) == 3
    installed = comfy.base / "models" / "loras" / "siso-dog.safetensors"
    assert installed.read_bytes() == (siso_run / "lora" / KOHYA_WEIGHT_NAME).read_bytes()
    assert "lora key not loaded" not in comfy.log.read_text()
    best = output_image(comfy, entry["outputs"]["3"]["images"][0])
    assert best.shape == (SIDE, SIDE, 3)
    assert np.array_equal(best, np.asarray(Image.open(siso_run / "best.png")))
    with_lora = output_image(comfy, entry["outputs"]["11"]["images"][0])
    # The same sampling without the LoRA (strength 0): another image, so the LoRA was applied.
    workflow["5"]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    workflow["11"]["inputs"]["filename_prefix"] = "no-lora"
    plain = run(comfy, workflow)
    without = output_image(comfy, plain["outputs"]["11"]["images"][0])
    assert np.abs(with_lora.astype(int) - without.astype(int)).max() > 0


def test_each_iteration_shows_live_as_the_nodes_preview(comfy):
    """What a browser tab receives: ComfyUI's progress for the SISO node, iteration by iteration, and each
    iteration's image as a preview (a JPEG that ComfyUI scales to its preview size, 512 px)."""
    import io

    workflow = {key: value for key, value in tiny_personalize(comfy, lora_name="watched").items()
                if key in ("1", "2", "3")}
    messages, previews = comfy.run_watched(workflow)
    progress = [m["data"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "2"]
    assert [(p["value"], p["max"]) for p in progress] == [(1, 3), (2, 3), (3, 3)]
    assert len(previews) == 3 and any(m["type"] == "execution_success" for m in messages)
    [siso_run] = runs_of(comfy, "watched")
    for step, preview in enumerate(previews):
        saved = Image.open(siso_run / "steps" / f"{step:04d}.png").convert("RGB")
        shown = Image.open(io.BytesIO(preview)).convert("RGB")
        assert shown.size == (512, 512)
        shown = np.asarray(shown.resize(saved.size, Image.Resampling.BOX), dtype=float)
        assert np.abs(shown - np.asarray(saved, dtype=float)).mean() < 8  # the run's image, not another one


def test_cancel_stops_after_the_current_iteration_and_keeps_the_best(comfy):
    workflow = tiny_personalize(comfy, max_steps=400, early_stop_patience=400, lora_name="cancelled")
    workflow = {key: workflow[key] for key in ("1", "2", "3")}  # the subject, SISO, its best image
    prompt_id = comfy.post("/prompt", {"prompt": workflow})["prompt_id"]
    deadline = time.time() + 300
    while time.time() < deadline:
        found = runs_of(comfy, "cancelled")
        if found and len(list((found[0] / "steps").glob("*.png"))) >= 2:
            break
        time.sleep(0.2)
    comfy.post("/interrupt")
    entry = comfy.wait_for(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert any(kind == "execution_interrupted" for kind, _ in entry["status"]["messages"])
    [siso_run] = runs_of(comfy, "cancelled")
    record = json.loads((siso_run / "run.json").read_text())
    assert record["stop_reason"] == "interrupted" and 2 <= len(record["losses"]) < 400
    assert (siso_run / "best.png").is_file() and record["lora_step"] == record["best_step"]
    installed = comfy.base / "models" / "loras" / "cancelled.safetensors"
    assert installed.read_bytes() == (siso_run / "lora" / KOHYA_WEIGHT_NAME).read_bytes()


def test_edit_swaps_the_masked_object_and_keeps_the_rest(comfy):
    workflow = json.loads((WORKFLOWS / "edit_api.json").read_text())
    workflow["3"]["inputs"].update(model=MODEL, resolution=SIDE, max_steps=2, dino_model=comfy.dino, ir_model="none")
    entry = run(comfy, workflow)
    assert entry["status"]["status_str"] == "success", entry["status"]
    edited = output_image(comfy, entry["outputs"]["4"]["images"][0])
    mask = output_image(comfy, entry["outputs"]["6"]["images"][0])
    assert edited.shape[:2] == mask.shape[:2] == (SIDE, SIDE)
    assert mask[32, 32].min() == 255 and mask[2, 2].max() == 0  # the alpha's hole is what was replaced
    [siso_run] = runs_of(comfy, "siso-edit")
    assert json.loads((siso_run / "run.json").read_text())["mask"]["source"] == "user"
    assert (comfy.base / "models" / "loras" / "siso-edit.safetensors").is_file()


def error_of(entry: dict) -> str:
    [message] = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    return message["exception_message"]


def test_bad_inputs_show_sisos_message(comfy):
    unsupported = run(comfy, {key: value for key, value in tiny_personalize(comfy, model="kandinsky").items()
                              if key in ("1", "2", "3")})
    assert "KandinskyPipeline" in error_of(unsupported) and "supported pipelines" in error_of(unsupported)
    Image.new("L", (SIDE + 16, SIDE), 255).save(comfy.base / "input" / "wide-mask.png")
    workflow = json.loads((WORKFLOWS / "edit_api.json").read_text())
    workflow["3"]["inputs"].update(model=MODEL, resolution=SIDE, max_steps=1, dino_model=comfy.dino, ir_model="none",
                                   mask=["7", 0])
    workflow["7"] = {"class_type": "LoadImageMask", "inputs": {"image": "wide-mask.png", "channel": "red"}}
    wrong_size = run(comfy, workflow)
    assert error_of(wrong_size).startswith("The mask (mask input) is 80x64 pixels, but the scene photo is 64x64")
    bad_name = run(comfy, {key: value for key, value in tiny_personalize(comfy, lora_name="../escape").items()
                           if key in ("1", "2", "3")})
    assert "is not a file name" in error_of(bad_name)


def test_the_ui_workflows_are_the_api_ones_laid_out(comfy):
    info = comfy.get("/object_info")
    for name in ("personalize", "edit"):
        api = json.loads((WORKFLOWS / f"{name}_api.json").read_text())
        assert json.loads((WORKFLOWS / f"{name}.json").read_text()) == api_to_ui(api, info), (
            f"regenerate {name}.json: python tests/comfy_support/make_workflows.py")


def test_the_pack_declares_what_the_comfy_registry_and_comfyui_manager_read():
    import tomllib

    project = tomllib.loads((PACK / "pyproject.toml").read_text())
    assert project["project"]["name"] == "comfyui-siso" and project["project"]["version"]
    assert any(dependency.startswith("siso") for dependency in project["project"]["dependencies"])
    assert {"PublisherId", "DisplayName"} <= set(project["tool"]["comfy"])
    requirements = [line for line in (PACK / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert requirements == ["siso>=0.1.0"]
