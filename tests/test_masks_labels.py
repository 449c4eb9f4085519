"""Masks (the user's, or Grounding DINO + SAM on tiny models in their real layouts) and class labels
(the user's words, or a tiny CLIP whose towers are made to agree on known photos)."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
from conftest import RESOLUTION
from PIL import Image

from siso.config import EditConfig
from siso.editing.labels import VOCABULARY, ClipLabeller, Label
from siso.editing.masks import ObjectFinder, largest_region_filled, load_user_mask, square_crop
from siso.editing.task import find_labels_and_mask
from siso.errors import SisoError
from siso.images import load_image, working_copy

CPU = torch.device("cpu")
DREAMBOOTH_CLASSES = ("backpack", "stuffed animal", "bowl", "can", "candle", "cat", "clock", "sneaker", "dog", "toy",
                      "boot", "glasses", "cartoon", "teapot", "vase")


@pytest.fixture(scope="session")
def dog_photo(subject_photo) -> Image.Image:
    return working_copy(load_image(subject_photo))


@pytest.fixture(scope="session")
def teapot_photo(dreambench) -> Image.Image:
    return working_copy(load_image(dreambench / "teapot" / "00.jpg"))


@pytest.fixture(scope="session")
def cat_scene(scene_photo) -> Image.Image:
    return square_crop(load_image(scene_photo), RESOLUTION)


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory):
    return tiny.editing.grounding_dino_dir(tmp_path_factory.mktemp("tiny-grounding-dino"))


@pytest.fixture(scope="session")
def segmenter_dir(tmp_path_factory):
    return tiny.editing.sam_dir(tmp_path_factory.mktemp("tiny-sam"))


@pytest.fixture(scope="session")
def labeller_dir(tmp_path_factory, dog_photo, teapot_photo, cat_scene):
    planted = {"dog": dog_photo, "teapot": teapot_photo, "cat": cat_scene}
    return tiny.editing.clip_dir(tmp_path_factory.mktemp("tiny-clip"), planted)


@pytest.fixture(scope="session")
def finder(detector_dir, segmenter_dir) -> ObjectFinder:
    return ObjectFinder.from_pretrained(str(detector_dir), str(segmenter_dir))


# -- Grounding DINO + SAM --------------------------------------------------------------------------


def test_detector_and_segmenter_find_the_object(finder, cat_scene):
    detections = finder.detect(cat_scene, "cat", box_threshold=0.3, text_threshold=0.25)
    assert detections and all(d.score == pytest.approx(0.5) for d in detections)  # the planted score
    assert detections[0].phrase == "a cat."
    x0, y0, x1, y1 = detections[0].box
    assert 0 <= x0 < x1 <= RESOLUTION and 0 <= y0 < y1 <= RESOLUTION
    found = finder.find(cat_scene, "cat", box_threshold=0.3, text_threshold=0.25)
    assert found.mask.shape == (1, 1, RESOLUTION, RESOLUTION)
    assert set(found.mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(found.background, 1 - found.mask)
    record = found.to_record()
    assert record["source"] == "grounding_dino+sam" and record["score"] == 0.5 and record["detections"] == 4
    assert 0 < record["object_fraction"] < 1
    assert np.array_equal(np.asarray(found.to_image()) > 127, found.mask[0, 0].numpy() > 0.5)


def test_largest_region_filled_keeps_one_region_and_fills_its_holes():
    binary = np.zeros((12, 12), dtype=bool)
    binary[1:8, 1:8] = True  # the big region ...
    binary[3:5, 3:5] = False  # ... with a hole
    binary[10:12, 1:3] = True  # a small separate region
    binary[8, 8] = True  # touches the big one only diagonally: 8-connected, as contours are traced
    expected = np.zeros_like(binary)
    expected[1:8, 1:8] = True
    expected[8, 8] = True
    assert np.array_equal(largest_region_filled(binary), expected)
    assert not largest_region_filled(np.zeros((4, 4), dtype=bool)).any()


class _ConstructedSam(torch.nn.Module):
    """Stands in for SamModel: returns three chosen low-resolution candidate masks for any box."""

    def __init__(self, candidates: torch.Tensor) -> None:
        super().__init__()
        self.candidates = candidates  # (3, h, w) logits

    def forward(self, **inputs):
        from types import SimpleNamespace

        return SimpleNamespace(pred_masks=self.candidates[None, None],
                               iou_scores=torch.tensor([[[0.9, 0.1, 0.1]]]))


@pytest.mark.fidelity("edit.mask_rule")
def test_the_mask_is_the_union_of_sams_candidates_with_the_largest_region_filled(finder, cat_scene):
    """The reference's rule: the union of SAM's candidates, then the largest contour filled. SAM's own
    favourite (highest predicted IoU) alone would be the top-left square only."""
    low = 16  # the tiny SamProcessor pads to 64 px; SAM's logits are a quarter of that
    candidates = torch.full((3, low, low), -10.0)
    candidates[0, 2:8, 2:8] = 10.0  # SAM's favourite
    candidates[1, 6:12, 6:12] = 10.0  # overlaps it: joins the region
    candidates[1, 8:10, 8:10] = -10.0  # a hole the union keeps ...
    candidates[2, 13:15, 1:3] = 10.0  # a separate speck: dropped
    stub = ObjectFinder(finder.detector, finder.detector_processor, _ConstructedSam(candidates),
                        finder.segmenter_processor)
    mask = stub.segment(cat_scene, (0.0, 0.0, 32.0, 32.0))
    scale = RESOLUTION // low  # the 16 px logits cover the 32 px scene
    expected = np.zeros((RESOLUTION, RESOLUTION), dtype=bool)
    for top, left, bottom, right in ((2, 2, 8, 8), (6, 6, 12, 12)):
        expected[top * scale:bottom * scale, left * scale:right * scale] = True  # ... and fills
    # Bilinear upsampling moves region edges by at most a pixel; the hole is filled, the speck gone.
    assert mask.dtype == bool and mask.shape == (RESOLUTION, RESOLUTION)
    assert np.abs(mask.astype(int) - expected.astype(int)).sum() <= 4 * (expected.sum() ** 0.5)
    assert mask[9 * scale, 9 * scale] and mask[4 * scale, 4 * scale] and mask[10 * scale, 10 * scale]
    assert not mask[14 * scale, 2 * scale]


def test_nothing_found_is_a_clear_error(finder, cat_scene):
    with pytest.raises(SisoError) as info:
        finder.find(cat_scene, "cat", box_threshold=0.6, text_threshold=0.25, scene="the scene cat.jpg")
    message = str(info.value)
    for words in ('no "cat"', "cat.jpg", "--box-threshold 0.6", "--input-class", "--mask"):
        assert words in message


def test_unloadable_detector_names_the_flag(segmenter_dir, tmp_path):
    with pytest.raises(SisoError, match="--detector-model.*--mask"):
        ObjectFinder.from_pretrained(str(tmp_path / "missing"), str(segmenter_dir))


# -- the user's mask -------------------------------------------------------------------------------


def save(array: np.ndarray, path, mode=None):
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_user_mask_at_the_scene_size_is_framed_like_the_scene(tmp_path):
    # A 192 x 128 scene framed to 32: the middle 128 x 128 square, a quarter the size.
    array = np.zeros((128, 192), np.uint8)
    array[:, 80:112] = 255
    mask = load_user_mask(save(array, tmp_path / "mask.png"), (192, 128), RESOLUTION)
    expected = np.zeros((RESOLUTION, RESOLUTION), np.float32)
    expected[:, 12:20] = 1  # columns 80:112 -> 20:28 at a quarter, minus the 8 cropped off the left
    assert np.array_equal(mask.mask[0, 0].numpy(), expected)
    assert mask.source == "user" and mask.to_record()["path"] == str(tmp_path / "mask.png")


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "I;16"])
def test_user_mask_of_any_mode_is_binarised_at_half(tmp_path, mode):
    gray = np.full((64, 64), 127, np.uint8)
    gray[:32] = 128
    image = Image.fromarray(gray).convert(mode) if mode != "I;16" else Image.fromarray(gray.astype(np.uint16) * 257)
    image.save(tmp_path / "mask.png")
    mask = load_user_mask(tmp_path / "mask.png", (64, 64), 64)
    assert mask.mask[0, 0, :32].eq(1).all() and mask.mask[0, 0, 32:].eq(0).all()


def test_user_mask_at_the_working_resolution_is_taken_as_is(tmp_path):
    array = np.zeros((64, 64), np.uint8)
    array[8:16, 8:24] = 255
    mask = load_user_mask(save(array, tmp_path / "mask.png"), (300, 200), 64)
    assert mask.mask.sum() == 8 * 16


def test_user_mask_of_the_wrong_size(tmp_path):
    path = save(np.full((70, 80), 255, np.uint8), tmp_path / "mask.png")
    with pytest.raises(SisoError, match=r"80x70 pixels, but the scene photo is 96x64.*32x32 over input.png"):
        load_user_mask(path, (96, 64), RESOLUTION)


@pytest.mark.parametrize("value,words", [(0, "empty"), (255, "covers the whole image")])
def test_user_mask_all_black_or_all_white(tmp_path, value, words):
    path = save(np.full((64, 64), value, np.uint8), tmp_path / "mask.png")
    with pytest.raises(SisoError, match=words):
        load_user_mask(path, (64, 64), RESOLUTION)


def test_user_mask_that_is_not_an_image(tmp_path):
    path = tmp_path / "mask.png"
    path.write_text("not a mask")
    with pytest.raises(SisoError, match="mask .* not an image format"):
        load_user_mask(path, (64, 64), RESOLUTION)


# -- labels ---------------------------------------------------------------------------------------


def test_vocabulary_holds_every_dreambooth_class():
    assert set(DREAMBOOTH_CLASSES) <= set(VOCABULARY)
    assert len(VOCABULARY) == len(set(VOCABULARY)) >= 300


def test_labeller_names_the_photos_its_towers_agree_on(labeller_dir, dog_photo, teapot_photo, cat_scene):
    labeller = ClipLabeller.from_pretrained(str(labeller_dir))
    for photo, word in ((dog_photo, "dog"), (teapot_photo, "teapot"), (cat_scene, "cat")):
        label = labeller.label(photo)
        probs = labeller.probabilities(photo)
        assert label == Label(word, "auto", pytest.approx(float(probs.max())), str(labeller_dir))
        assert probs.sum() == pytest.approx(1.0, abs=1e-5) and label.confidence > 1 / len(VOCABULARY)
    assert "recognised by CLIP" in label.describe()


def config(subject, scene, **options) -> EditConfig:
    values = dict(subject=subject, input=scene, resolution=RESOLUTION, device="cpu")
    values.update(options)
    return EditConfig(**values)


def test_user_classes_override_the_labeller(labeller_dir, detector_dir, segmenter_dir, dog_photo, cat_scene,
                                            subject_photo, scene_photo, tmp_path):
    photos = (subject_photo, scene_photo)
    # Both classes and a mask given: nothing is loaded (the model paths do not even exist).
    missing = str(tmp_path / "missing")
    user_mask = load_user_mask(save(np.tile(np.uint8([0, 255]), (64, 32)), tmp_path / "m.png"), (64, 64), 32)
    labels, mask = find_labels_and_mask(
        config(*photos, subject_class="teapot", input_class="vase", label_model=missing, detector_model=missing,
               segmenter_model=missing), dog_photo, cat_scene, user_mask, CPU, torch.float32)
    assert labels == {"subject": Label("teapot", "user"), "input": Label("vase", "user")}
    assert mask is user_mask
    assert labels["subject"].to_record() == {"text": "teapot", "source": "user"}
    # Only the subject named: CLIP names the scene's object (its crop under the mask), not the subject.
    labels, _ = find_labels_and_mask(config(*photos, subject_class="teapot", label_model=str(labeller_dir)),
                                     dog_photo, cat_scene, user_mask, CPU, torch.float32)
    assert labels["subject"] == Label("teapot", "user") and labels["input"].source == "auto"
    # Nothing named: CLIP's labels, then Grounding DINO + SAM look for the scene's object.
    labels, mask = find_labels_and_mask(
        config(*photos, label_model=str(labeller_dir), detector_model=str(detector_dir),
               segmenter_model=str(segmenter_dir)), dog_photo, cat_scene, None, CPU, torch.float32)
    assert (labels["subject"].text, labels["input"].text) == ("dog", "cat")
    assert mask.source == "grounding_dino+sam" and mask.detection.phrase == "a cat."
