"""load_image accepts whatever a camera or an editor writes, and refuses what is not a usable photo.

Every image here is made in the test (a few kilobytes at most); refusals must be SisoErrors whose
message names the file, so the CLI can print them as one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from siso.errors import SisoError
from siso.images import MAX_SIDE, MAX_WORKING_SIDE, MIN_SIDE, load_image, pil_to_tensor, tensor_to_pil, working_copy

RED = (255, 0, 0)
WHITE = (255, 255, 255)
EXIF_ORIENTATION = 0x0112


def assert_rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert image.mode == "RGB"
    assert image.size == size
    array = np.asarray(image)
    assert array.dtype == np.uint8 and array.shape == (size[1], size[0], 3)
    return array


def close_to(pixel, expected, tolerance: int = 0) -> bool:
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(pixel, expected, strict=True))


def refused(path, *words: str) -> str:
    """load_image(path) must raise a SisoError naming the file and containing ``words``."""
    with pytest.raises(SisoError) as info:
        load_image(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message
    return message


# -- accepted ------------------------------------------------------------------------------------


def test_grayscale_becomes_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (80, 64), 100).save(path)
    array = assert_rgb(load_image(path), (80, 64))
    assert (array == 100).all()


def test_rgba_transparent_area_becomes_white(tmp_path):
    array = np.zeros((64, 96, 4), np.uint8)
    array[:, :32] = (0, 200, 0, 0)  # fully transparent, with a hidden colour that must not show
    array[:, 32:64] = (255, 0, 0, 255)  # opaque red
    array[:, 64:] = (0, 0, 0, 128)  # half-transparent black over white: mid gray
    path = tmp_path / "rgba.png"
    Image.fromarray(array, mode="RGBA").save(path)
    image = load_image(path)
    assert_rgb(image, (96, 64))
    assert image.getpixel((10, 10)) == WHITE
    assert image.getpixel((40, 10)) == RED
    assert close_to(image.getpixel((80, 10)), (127, 127, 127), tolerance=1)


def test_la_transparent_area_becomes_white(tmp_path):
    array = np.zeros((64, 64, 2), np.uint8)
    array[:, 32:, 1] = 255  # left half transparent black, right half opaque black
    path = tmp_path / "la.png"
    Image.fromarray(array, mode="LA").save(path)
    image = load_image(path)
    assert_rgb(image, (64, 64))
    assert image.getpixel((5, 5)) == WHITE
    assert image.getpixel((50, 5)) == (0, 0, 0)


def palette_image() -> Image.Image:
    image = Image.new("P", (64, 64), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 - 2) * 3)  # 0: red, 1: blue
    image.paste(1, (32, 0, 64, 64))
    return image


def test_palette_without_transparency(tmp_path):
    path = tmp_path / "palette.png"
    palette_image().save(path)
    image = load_image(path)
    assert_rgb(image, (64, 64))
    assert image.getpixel((5, 5)) == RED
    assert image.getpixel((50, 5)) == (0, 0, 255)


def test_palette_with_transparency(tmp_path):
    path = tmp_path / "palette-alpha.png"
    palette_image().save(path, transparency=1)  # the blue half is transparent
    assert Image.open(path).info.get("transparency") == 1
    image = load_image(path)
    assert_rgb(image, (64, 64))
    assert image.getpixel((5, 5)) == RED
    assert image.getpixel((50, 5)) == WHITE


@pytest.mark.parametrize(
    "mode,array,key,opaque",
    [
        ("RGB", np.array([(0, 0, 0), (255, 0, 0)], np.uint8), (0, 0, 0), RED),
        ("L", np.array([0, 200], np.uint8), 0, (200, 200, 200)),
        ("I;16", np.array([0, 40000], np.uint16), 0, (156, 156, 156)),
    ],
)
def test_colour_key_transparency_becomes_white(tmp_path, mode, array, key, opaque):
    # PNG optimisers replace a binary alpha channel with a tRNS colour key; it must read the same.
    pixels = np.repeat(np.repeat(array[None], 64, axis=0), 32, axis=1)  # left half: the keyed colour
    path = tmp_path / f"keyed-{mode}.png"
    Image.fromarray(pixels).save(path, transparency=key)
    with Image.open(path) as stored:
        assert stored.mode == mode and stored.info["transparency"] == key
    image = load_image(path)
    assert_rgb(image, (64, 64))
    assert image.getpixel((5, 5)) == WHITE
    assert close_to(image.getpixel((50, 5)), opaque, tolerance=1)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(path, quality=95)  # red in print colours
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert_rgb(image, (64, 64))
    assert close_to(image.getpixel((32, 32)), RED, tolerance=20)


def test_16_bit_grayscale_png_scales_onto_8_bits(tmp_path):
    array = np.zeros((64, 96), np.uint16)
    array[:, 32:64] = 32768
    array[:, 64:] = 65535
    path = tmp_path / "gray16.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode == "I;16"
    image = load_image(path)
    assert_rgb(image, (96, 64))
    assert image.getpixel((5, 5)) == (0, 0, 0)
    assert close_to(image.getpixel((40, 5)), (128, 128, 128), tolerance=1)
    assert image.getpixel((80, 5)) == WHITE


@pytest.mark.parametrize(
    "orientation,red_corner",
    [
        (6, (119 - 10, 10)),  # "rotate 90 clockwise to display": the stored top-left ends up top-right
        (8, (10, 199 - 10)),  # "rotate 90 counter-clockwise": the stored top-left ends up bottom-left
    ],
)
@pytest.mark.fidelity("preprocess.exif_transpose")
def test_exif_rotated_jpeg_comes_back_upright(tmp_path, orientation, red_corner):
    # 200x120 rather than a 100x60 phone-like shape: sides under 64 px are refused.
    stored = Image.new("RGB", (200, 120), (128, 128, 128))
    stored.paste(RED, (0, 0, 40, 40))  # mark the stored top-left corner
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    path = tmp_path / f"rotated-{orientation}.jpg"
    stored.save(path, exif=exif, quality=95)

    image = load_image(path)
    assert_rgb(image, (120, 200))
    assert close_to(image.getpixel(red_corner), RED, tolerance=30)
    # The other three corners are gray: the red block moved exactly where the tag says.
    corners = [(10, 10), (109, 10), (10, 189), (109, 189)]
    corners.remove(red_corner)
    for corner in corners:
        assert close_to(image.getpixel(corner), (128, 128, 128), tolerance=30)


def test_format_is_read_from_the_content_not_the_name(tmp_path):
    path = tmp_path / "really-a-jpeg.png"
    Image.new("RGB", (64, 64), RED).save(path, format="JPEG", quality=95)
    assert close_to(load_image(path).getpixel((32, 32)), RED, tolerance=10)


def test_smallest_and_largest_accepted_sides(tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (MIN_SIDE, MIN_SIDE)).save(small)
    assert load_image(small).size == (MIN_SIDE, MIN_SIDE)
    wide = tmp_path / "wide.png"
    Image.new("1", (MAX_SIDE, MIN_SIDE), 1).save(wide)  # 1-bit: a few hundred bytes on disk
    assert_rgb(load_image(wide), (MAX_SIDE, MIN_SIDE))


# -- refused -------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    refused(tmp_path / "no-such-photo.jpg", "does not exist")


def test_directory(tmp_path):
    refused(tmp_path, "is a directory")


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a photo\n")
    refused(path, "not an image format")


def test_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    whole = tmp_path / "whole.jpg"
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(whole, quality=90)
    data = whole.read_bytes()
    path = tmp_path / "half.jpg"
    path.write_bytes(data[: len(data) // 2])
    refused(path, "truncated or corrupt")


def test_role_is_named(tmp_path):
    with pytest.raises(SisoError, match="reference photo"):
        load_image(tmp_path / "missing.png", role="reference photo")


@pytest.mark.parametrize("size", [(MIN_SIDE - 1, 100), (100, MIN_SIDE - 1), (10, 10)])
def test_too_small(tmp_path, size):
    path = tmp_path / "tiny.png"
    Image.new("RGB", size).save(path)
    refused(path, f"{size[0]}x{size[1]}", f"at least {MIN_SIDE} px")


@pytest.mark.parametrize("size", [(MAX_SIDE + 1, MIN_SIDE), (MIN_SIDE, 9000)])
def test_too_large(tmp_path, size):
    path = tmp_path / "huge.png"
    Image.new("1", size).save(path)  # 1-bit and uniform: compresses to almost nothing
    assert path.stat().st_size < 10_000
    refused(path, f"{size[0]}x{size[1]}", f"over {MAX_SIDE} px")


@pytest.mark.parametrize(
    "size",
    [
        (200, 200),  # over twice the limit: PIL raises DecompressionBombError
        (120, 100),  # between one and two times the limit: PIL only warns, siso still refuses
    ],
)
def test_decompression_bomb(tmp_path, monkeypatch, size):
    path = tmp_path / "bomb.png"
    Image.new("L", size).save(path)
    # No real bomb fits under the 8192 px side limit at PIL's default (~89 Mpx), so lower the limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    refused(path, "decompression bomb")


# -- conversions ---------------------------------------------------------------------------------


def test_pil_tensor_round_trip_is_exact():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    array[0, 0], array[0, 1] = 0, 255  # both ends of the range
    tensor = pil_to_tensor(Image.fromarray(array))
    assert tensor.shape == (1, 3, 37, 53)
    assert tensor.dtype == torch.float32
    assert tensor.min() == 0.0 and tensor.max() == 1.0
    assert np.array_equal(np.asarray(tensor_to_pil(tensor)), array)
    assert np.array_equal(np.asarray(tensor_to_pil(tensor[0])), array)  # (3, H, W) as well


def test_tensor_to_pil_clamps_out_of_range_values():
    tensor = torch.tensor([-0.5, 0.5, 1.5]).view(3, 1, 1).expand(3, 2, 2)
    assert tensor_to_pil(tensor).getpixel((0, 0)) == (0, 128, 255)


@pytest.mark.parametrize("size,expected", [((3000, 1500), (2048, 1024)), ((1200, 3000), (819, 2048))])
def test_working_copy_shrinks_the_long_side(size, expected):
    assert MAX_WORKING_SIDE == 2048
    shrunk = working_copy(Image.new("RGB", size, RED))
    assert shrunk.size == expected
    assert close_to(shrunk.getpixel((10, 10)), RED, tolerance=1)


def test_working_copy_leaves_small_images_alone():
    image = Image.new("RGB", (2048, 100))
    assert working_copy(image) is image
