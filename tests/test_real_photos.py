"""The real DreamBooth photos (CC-BY 4.0, never committed) through siso: every one loads, and a
generation and an edit run end to end on them with the tiny models.

Every other test makes its own photos (tests/tiny/photos.py). These need the dataset: they run where
it is found (SISO_DREAMBENCH, or the project's shared folder beside the checkout) and are skipped,
saying why, where it is not; CI sets SISO_REQUIRE_DREAMBENCH=1, which turns the skip into a failure.
"""

from __future__ import annotations

import json

import numpy as np
from conftest import RESOLUTION
from PIL import Image

from siso.eval.manifest import IMAGE_SUFFIXES
from siso.images import MAX_WORKING_SIDE, load_image, working_copy


def test_every_dreambench_photo_loads(real_dreambench):
    photos = sorted(p for p in real_dreambench.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    assert len({p.parent.name for p in photos}) == 30 and len(photos) >= 150
    for path in photos:
        image = working_copy(load_image(path))
        assert image.mode == "RGB" and max(image.size) <= MAX_WORKING_SIDE, path


def test_generate_on_a_real_photo(run_siso, tmp_path, sd_dir, dino_dir, real_dreambench):
    photo = real_dreambench / "dog" / "00.jpg"
    out = tmp_path / "run"
    code, text = run_siso("generate", "--subject", photo, "--prompt", "a photo of a dog", "--out", out,
                          "--model", sd_dir, "--dino-model", dino_dir, "--resolution", RESOLUTION, "--device", "cpu",
                          "--max-steps", "2")
    assert code == 0, text
    record = json.loads((out / "run.json").read_text())
    assert record["config"]["subjects"] == [str(photo)] and len(record["losses"]) == 2
    assert Image.open(out / "best.png").size == (RESOLUTION, RESOLUTION)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_edit_on_real_photos(run_siso, tmp_path, sd_dir, dino_dir, real_dreambench):
    subject, scene = real_dreambench / "dog" / "00.jpg", real_dreambench / "cat" / "00.jpg"
    width, height = Image.open(scene).size
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "run"
    code, text = run_siso("edit", "--subject", subject, "--input", scene, "--mask", tmp_path / "mask.png",
                          "--subject-class", "dog", "--input-class", "cat", "--out", out, "--model", sd_dir,
                          "--dino-model", dino_dir, "--resolution", RESOLUTION, "--device", "cpu", "--max-steps", "2")
    assert code == 0, text
    record = json.loads((out / "run.json").read_text())
    assert record["mask"]["object_fraction"] == 0.25 and len(record["losses"]) == 2
    assert {"input.png", "mask.png", "reconstruction.png", "best.png"} <= {p.name for p in out.iterdir()}
