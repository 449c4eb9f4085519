"""Photos the tests make for themselves: deterministic, a few kilobytes, no download.

DreamBooth's photos (CC-BY 4.0) are never committed, and a fresh clone has none, so every test that
only needs *a* photo uses these: a "dog" and a "teapot" (portrait JPEGs, so framing crops them; the
dog has a second photo, shifted and mirrored), and a "cat" scene (a landscape JPEG: a grey cat in the
middle of a room, for the editing tests). Each is a clear coloured shape over a smooth, slightly
noisy background: distinct enough for the tiny CLIP to be made to tell them apart, textured enough
for an inversion to have something to reconstruct.

:func:`write_dreambench` lays them out as DreamBooth's ``dataset/`` folder, with a
``prompts_and_classes.txt`` in the real file's format, for the manifest reader and ``siso bench``.
The tests about the real data (see conftest's ``real_dreambench``) use the real folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SUBJECT_SIZE = (96, 128)  # width, height
# 3:2, so that framing it to the tests' 32 px lands on whole pixels (192 x 128 -> 48 x 32, crop 8 each side).
SCENE_SIZE = (192, 128)
_SCENE_DRAWN = (128, 96)  # drawn at this size, then scaled

# subject folder -> (class, photos); dog and cat are "live" subjects, the teapot an object.
SUBJECTS = {"dog": ("dog", 2), "cat": ("cat", 1), "teapot": ("teapot", 1)}
OBJECT_PROMPTS = ("a {0} {1} in the jungle", "a {0} {1} on the beach", "a red {0} {1}")
LIVE_PROMPTS = ("a {0} {1} in the jungle", "a {0} {1} wearing a red hat", "a red {0} {1}")


def _background(size: tuple[int, int], top: tuple[int, int, int], bottom: tuple[int, int, int],
                seed: int) -> Image.Image:
    """A vertical gradient from ``top`` to ``bottom`` with a little fixed noise, like a photo's backdrop."""
    width, height = size
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    colours = (1 - ramp) * np.array(top, float) + ramp * np.array(bottom, float)
    noise = np.random.default_rng(seed).normal(0.0, 6.0, (height, width, 3))
    return Image.fromarray(np.clip(np.broadcast_to(colours, (height, width, 3)) + noise, 0, 255).astype(np.uint8))


def dog(variant: int = 0) -> Image.Image:
    """A brown dog (body, head, ears, eyes, nose) on a pale blue backdrop; ``variant`` 1 is shifted and mirrored."""
    image = _background(SUBJECT_SIZE, (196, 220, 238), (120, 160, 96), seed=10 + variant)
    draw = ImageDraw.Draw(image)
    brown, dark = (150, 90, 40), (40, 25, 15)
    draw.ellipse((18, 62, 78, 112), fill=brown)  # body
    draw.ellipse((30, 26, 70, 66), fill=(170, 105, 50))  # head
    draw.ellipse((24, 30, 38, 58), fill=dark)  # ears
    draw.ellipse((62, 30, 76, 58), fill=dark)
    draw.ellipse((40, 40, 46, 46), fill=(0, 0, 0))  # eyes
    draw.ellipse((54, 40, 60, 46), fill=(0, 0, 0))
    draw.ellipse((46, 50, 54, 57), fill=(20, 10, 10))  # nose
    draw.rectangle((24, 104, 34, 122), fill=brown)  # legs
    draw.rectangle((62, 104, 72, 122), fill=brown)
    if variant:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(0, translate=(6, -4), fillcolor=(196, 220, 238))
    return image


def teapot() -> Image.Image:
    """A blue teapot (body, lid, spout, handle) on a warm backdrop."""
    image = _background(SUBJECT_SIZE, (240, 226, 200), (200, 170, 130), seed=20)
    draw = ImageDraw.Draw(image)
    blue = (40, 80, 180)
    draw.ellipse((22, 54, 74, 104), fill=blue)  # body
    draw.rectangle((38, 44, 58, 56), fill=(60, 100, 200))  # lid
    draw.ellipse((44, 36, 52, 44), fill=(230, 230, 240))  # knob
    draw.polygon([(72, 80), (92, 56), (94, 62), (76, 90)], fill=blue)  # spout
    draw.arc((4, 62, 34, 94), 90, 270, fill=blue, width=6)  # handle
    return image


def cat_scene() -> Image.Image:
    """A room: a grey cat in the middle of the frame on a wooden floor, a window behind."""
    image = _background(_SCENE_DRAWN, (230, 214, 180), (205, 190, 160), seed=30)
    draw = ImageDraw.Draw(image)
    for y in range(60, _SCENE_DRAWN[1], 8):  # floorboards
        draw.rectangle((0, y, _SCENE_DRAWN[0], y + 6), fill=(140 + y % 24, 100, 60))
    draw.rectangle((86, 8, 120, 40), fill=(150, 200, 240), outline=(250, 250, 250), width=3)  # window
    grey, dark = (128, 128, 136), (60, 60, 66)
    draw.ellipse((44, 46, 86, 80), fill=grey)  # body
    draw.ellipse((50, 24, 76, 50), fill=(140, 140, 148))  # head
    draw.polygon([(50, 32), (54, 16), (60, 28)], fill=dark)  # ears
    draw.polygon([(66, 28), (72, 16), (76, 32)], fill=dark)
    draw.ellipse((56, 34, 60, 38), fill=(90, 200, 90))  # eyes
    draw.ellipse((66, 34, 70, 38), fill=(90, 200, 90))
    draw.arc((78, 50, 104, 80), 200, 340, fill=dark, width=4)  # tail
    return image.resize(SCENE_SIZE, Image.Resampling.BICUBIC)


def photo(subject: str, index: int = 0) -> Image.Image:
    if subject == "dog":
        return dog(index)
    return {"cat": cat_scene, "teapot": teapot}[subject]()


def prompts_and_classes() -> str:
    """A short prompts_and_classes.txt in the shape of DreamBooth's (a class table, then two prompt lists)."""

    def prompt_list(templates):
        lines = [f"'{t}'.format(unique_token, class_token)," for t in templates]
        lines[-1] = lines[-1].rstrip(",")
        return "prompt_list = [\n" + "\n".join(lines) + "\n]\n"

    table = "".join(f"{name},{cls}\n" for name, (cls, _) in SUBJECTS.items())
    return (f"Classes\n\nsubject_name,class\n{table}\nPrompts\n\nObject Prompts\n\n{prompt_list(OBJECT_PROMPTS)}"
            f"\nLive Subject Prompts\n\n{prompt_list(LIVE_PROMPTS)}")


def write_dreambench(root: Path) -> Path:
    """``root/dataset``: DreamBooth's layout (``<subject>/00.jpg ...`` and ``prompts_and_classes.txt``)."""
    dataset = Path(root) / "dataset"
    for name, (_, count) in SUBJECTS.items():
        (dataset / name).mkdir(parents=True)
        for index in range(count):
            photo(name, index).save(dataset / name / f"{index:02d}.jpg", quality=95)
    (dataset / "prompts_and_classes.txt").write_text(prompts_and_classes())
    return dataset
