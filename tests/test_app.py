"""The web app served on loopback with tiny models, driven in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import RESOLUTION
from diffusers import DiffusionPipeline
from PIL import Image

from siso.app import STOPPING
from siso.images import pil_to_tensor

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Flags for a sandboxed machine without network: no background connections, no GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(sd_dir, dino_dir, tmp_path_factory):
    from siso.app import AppSettings, build_app

    runs = tmp_path_factory.mktemp("app-runs")
    settings = AppSettings(model=str(sd_dir), edit_model=str(sd_dir), dino_model=str(dino_dir),
                           resolution=RESOLUTION, max_steps=400, device="cpu", runs_dir=runs,
                           max_job_steps=100_000)  # the tests run jobs that only Stop ends
    demo = build_app(settings)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(runs)], max_file_size="25mb")
    yield f"http://127.0.0.1:{port}/", runs
    demo.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium: the system's (Debian's `chromium`, what CI installs), else the one
    `playwright install chromium` downloaded (the README's test command)."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as p:
        options = {"args": CHROMIUM_ARGS}
        if Path(CHROMIUM).exists():
            options["executable_path"] = CHROMIUM
        try:
            browser = p.chromium.launch(**options)
        except playwright_api.Error as err:
            pytest.fail(f"No Chromium to drive ({err}): run `playwright install chromium`, or install your "
                        "distribution's (e.g. `sudo apt-get install chromium`); see the README's test command")
        yield browser
        browser.close()


def status_text(page) -> str:
    return page.inner_text("#status")


def iteration_shown(page) -> int:
    match = re.search(r"Iteration (\d+)", status_text(page))
    return int(match.group(1)) if match else -1


def start_run(page, url: str, photo: Path, max_steps: int, patience: int) -> None:
    page.goto(url)
    # The page's scripts may still be mounting the upload widget; retry the upload until it is listed.
    for attempt in range(3):
        page.set_input_files("#subject-photos input[type=file]", str(photo))
        try:
            page.wait_for_selector(f"#subject-photos >> text={photo.name}", timeout=20_000)
            break
        except Exception:
            if attempt == 2:
                raise
    page.click("text=Advanced settings")
    page.fill("#max-steps input", str(max_steps))
    page.fill("#early-stop-patience input", str(patience))
    page.click("#start")


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_generate_watch_stop_and_download_the_lora(served_app, browser, subject_photo, sd_dir, tmp_path):
    url, runs = served_app
    page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
    start_run(page, url, subject_photo, max_steps=100_000, patience=100_000)

    # At least two iteration images appear while it runs.
    wait_until(lambda: iteration_shown(page) >= 1 and page.locator("#iterations img").count() >= 2, 120,
               "two iterations in the live view")
    page.click("#stop")
    # Stop answers with a notice; the status line is the run's own, so whichever of the two reaches
    # the page first, it ends at "Finished" (an answer written into the status could land after it).
    page.wait_for_selector(f"text={STOPPING}", timeout=60_000)
    page.wait_for_function("document.querySelector('#status').innerText.includes('Finished')", timeout=120_000)
    assert "interrupted" in status_text(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app-generate.png"), full_page=True)

    # Both LoRA files are offered, each labelled by where it loads.
    label = page.inner_text("#downloads")
    assert "LoRA for diffusers" in label and "LoRA for ComfyUI / A1111" in label
    lora_dir = tmp_path / "downloaded"
    lora_dir.mkdir()
    for name in ("pytorch_lora_weights.safetensors", "siso_lora_kohya.safetensors"):
        with page.expect_download() as download_info:
            page.click(f"#downloads a[download='{name}']")
        download_info.value.save_as(lora_dir / name)

    # Each downloaded LoRA, in plain diffusers, renders the run's best image again.
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir() and "generate" in p.name]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stop_reason"] == "interrupted" and record["status"] == "finished"
    assert len(record["losses"]) >= 2
    for name in ("pytorch_lora_weights.safetensors", "siso_lora_kohya.safetensors"):
        pipe = DiffusionPipeline.from_pretrained(sd_dir)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(lora_dir, weight_name=name)
        with torch.no_grad():
            image = pipe("a photo of a dog", num_inference_steps=1, guidance_scale=0.0, height=RESOLUTION,
                         width=RESOLUTION, generator=torch.Generator("cpu").manual_seed(42),
                         output_type="pil").images[0]
        assert torch.equal(pil_to_tensor(image), pil_to_tensor(Image.open(run_dir / "best.png"))), name
    page.close()


def test_two_sessions_share_the_gpu_queue(served_app, browser, subject_photo):
    url, runs = served_app
    before = {p.name for p in runs.iterdir()}
    first = browser.new_context().new_page()
    second = browser.new_context().new_page()
    start_run(first, url, subject_photo, max_steps=100_000, patience=100_000)
    wait_until(lambda: iteration_shown(first) >= 0, 120, "the first session to start")
    start_run(second, url, subject_photo, max_steps=6, patience=400)
    # The second waits in the queue, and is told so, while the first runs.
    wait_until(lambda: "queue" in second.inner_text("body").lower(), 120, "a queue position in the second tab")
    assert iteration_shown(second) == -1 and "Finished" not in status_text(first)
    first.click("#stop")
    for page in (first, second):
        page.wait_for_function("document.querySelector('#status').innerText.includes('Finished')", timeout=180_000)
    new_runs = sorted(p for p in runs.iterdir() if p.name not in before)
    assert len(new_runs) == 2
    records = {p: json.loads((p / "run.json").read_text()) for p in new_runs}
    by_reason = {r["stop_reason"]: (p, r) for p, r in records.items()}
    assert set(by_reason) == {"interrupted", "max_steps"}
    assert len(by_reason["max_steps"][1]["losses"]) == 6
    for run_dir, record in records.items():
        assert len(list((run_dir / "steps").iterdir())) == len(record["losses"])
        assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    # Each tab shows its own run.
    assert str(by_reason["interrupted"][0]) in status_text(first)
    assert str(by_reason["max_steps"][0]) in status_text(second)


def test_edit_tab_shows_the_mask_and_streams_the_edit(served_app, browser, subject_photo, scene_photo, tmp_path):
    """The Edit tab in the browser: subject, scene and mask in, the overlay and iterations out."""
    import numpy as np

    url, runs = served_app
    scene = scene_photo
    width, height = Image.open(scene).size
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    mask_path = tmp_path / "mask.png"
    Image.fromarray(mask).save(mask_path)

    page = browser.new_page(viewport={"width": 1400, "height": 1400})
    page.goto(url)
    page.click("button[role=tab]:has-text('Edit')")
    uploads = [("#edit-subject", subject_photo), ("#edit-scene", scene), ("#edit-mask", mask_path)]
    for selector, path in uploads:
        page.set_input_files(f"{selector} input[type=file]", str(path))
        page.wait_for_selector(f"{selector} img", timeout=30_000)
    page.get_by_label("Subject class (empty: recognised)").fill("dog")
    page.get_by_label("Object to replace (empty: recognised)").fill("cat")
    page.click("#edit-start")
    page.wait_for_function("document.querySelector('#edit-status').innerText.includes('Finished')",
                           timeout=180_000)
    assert page.locator("#edit-overlay img").count() == 1
    assert page.locator("#edit-iterations img").count() >= 2
    page.screenshot(path=str(ARTIFACTS / "app-edit.png"), full_page=True)
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir() and "-edit-" in p.name]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["stop_reason"] in ("max_steps", "early_stop")
    assert all("bg" in entry for entry in record["losses"])
    assert {"input.png", "mask.png", "reconstruction.png", "best.png"} <= {p.name for p in run_dir.iterdir()}
    page.close()
