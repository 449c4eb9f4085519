"""The benchmark manifest: one JSON object per line, one line per subject.

Generation items::

    {"id": "dog", "class": "dog", "images": ["dataset/dog/00.jpg", ...], "prompts": ["a dog in the jungle", ...]}

Editing items carry the scene to edit instead of prompts, the class of the object in it to replace
(found by CLIP when left out) and optionally that object's mask (white on the object; found by
Grounding DINO + SAM when left out)::

    {"id": "dog-on-bench", "class": "dog", "images": ["dog.jpg"], "scene": "bench.jpg", "scene_class": "cat",
     "mask": "bench-cat-mask.png"}

Relative paths are relative to the manifest file. ``id`` names the item's output folder; it
defaults to ``subject``, which defaults to the name of the first image's folder. SISO is a
single-image method: the first image is the one optimised against and compared with.

:func:`dreambench_items` builds the generation manifest from a checkout of the public
DreamBooth dataset (``dataset/<subject>/*.jpg`` and ``dataset/prompts_and_classes.txt``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SisoError
from ..files import atomic_path

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# DreamBooth's "live subjects" (its second prompt list: outfits, hats) are its 9 cats and dogs.
LIVE_CLASSES = frozenset({"cat", "dog"})
DREAMBENCH_FILE = "prompts_and_classes.txt"


@dataclass(frozen=True)
class BenchItem:
    id: str
    class_name: str
    images: tuple[Path, ...]
    prompts: tuple[str, ...] = ()
    subject: str = ""
    scene: Path | None = None
    scene_class: str | None = None
    scene_mask: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def subject_photo(self) -> Path:
        return self.images[0]

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id, "subject": self.subject, "class": self.class_name,
                                  "images": [str(p) for p in self.images]}
        if self.prompts:
            record["prompts"] = list(self.prompts)
        if self.scene is not None:
            record["scene"] = str(self.scene)
            record["scene_class"] = self.scene_class
            if self.scene_mask is not None:
                record["mask"] = str(self.scene_mask)
        return {**self.extra, **record}

    @classmethod
    def from_record(cls, record: dict[str, Any], base: Path = Path("."), where: str = "manifest") -> BenchItem:
        if not isinstance(record, dict):
            raise SisoError(f"{where}: each line must be a JSON object, got {type(record).__name__}.")
        _check_types(record, where)
        images = record.get("images") or ([record["image"]] if record.get("image") else [])
        if isinstance(images, str):
            images = [images]
        if not images:
            raise SisoError(f'{where}: no subject photo; give "images": ["path/to/photo.jpg", ...].')
        paths = tuple(_resolve(base, p) for p in images)
        subject = str(record.get("subject") or paths[0].parent.name)
        item_id = str(record.get("id") or subject)
        if not ID_PATTERN.fullmatch(item_id):  # fullmatch: "$" alone would let "dog\n" through
            raise SisoError(f'{where}: id {item_id!r} must be letters, digits, "_", "." or "-" (it names a folder).')
        class_name = record.get("class") or record.get("class_name")
        if not isinstance(class_name, str) or not class_name.strip():
            raise SisoError(f'{where}: item {item_id} has no "class" (the subject\'s class name, e.g. "dog").')
        prompts = record.get("prompts") or ()
        if not all(p.strip() for p in prompts):
            raise SisoError(f'{where}: item {item_id}: "prompts" must be a list of non-empty strings.')
        scene = _resolve(base, record["scene"]) if record.get("scene") else None
        mask = _resolve(base, record["mask"]) if record.get("mask") else None
        known = {"id", "subject", "class", "class_name", "images", "image", "prompts", "scene", "scene_class", "mask"}
        return cls(id=item_id, class_name=class_name.strip(), images=paths, prompts=tuple(prompts), subject=subject,
                   scene=scene, scene_class=record.get("scene_class"), scene_mask=mask,
                   extra={k: v for k, v in record.items() if k not in known})


_TEXT_FIELDS = ("id", "subject", "class", "class_name", "image", "scene", "scene_class", "mask")
_LIST_FIELDS = ("images", "prompts")


def _check_types(record: dict[str, Any], where: str) -> None:
    """Every known field has its JSON type (a wrong one would otherwise surface as a TypeError later)."""
    for name in _TEXT_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise SisoError(f'{where}: "{name}" must be a string, got {json.dumps(value)[:60]}.')
    for name in _LIST_FIELDS:
        value = record.get(name)
        if value is None or (name == "images" and isinstance(value, str)):
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SisoError(f'{where}: "{name}" must be a list of strings, got {json.dumps(value)[:60]}.')


def _resolve(base: Path, path: str) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else (base / path)


def read_manifest(path: str | Path) -> list[BenchItem]:
    path = Path(path)
    if not path.is_file():
        raise SisoError(f"The manifest {path} does not exist; pass a JSONL file (one subject per line) "
                        "or --dreambench PATH.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise SisoError(f"{path}, line {line}: not UTF-8 text (byte {err.object[err.start]:#04x}); save the manifest "
                        "as UTF-8 JSON Lines.") from err
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SisoError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
        items.append(BenchItem.from_record(record, path.parent.resolve(), f"{path}, line {number}"))
    return check_items(items, str(path))


def check_items(items: Sequence[BenchItem], where: str) -> list[BenchItem]:
    if not items:
        raise SisoError(f"{where} lists no items.")
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise SisoError(f'{where}: the id {item.id!r} appears twice; give each item its own "id".')
        seen.add(item.id)
    return list(items)


def write_manifest(items: Iterable[BenchItem], path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(item.to_record()) + "\n" for item in items))
    return Path(path)


def select(items: Sequence[BenchItem], subjects: Sequence[str] | None = None,
           max_prompts: int | None = None) -> list[BenchItem]:
    """Keep the named items (by id or subject) and at most ``max_prompts`` prompts of each."""
    if subjects:
        wanted = set(subjects)
        unknown = wanted - {i.id for i in items} - {i.subject for i in items}
        if unknown:
            raise SisoError(f"--subjects names {', '.join(sorted(unknown))}, which the manifest does not have.")
        items = [i for i in items if i.id in wanted or i.subject in wanted]
    if max_prompts is not None:
        items = [BenchItem(**{**i.__dict__, "prompts": i.prompts[:max_prompts]}) for i in items]
    return list(items)


# -- the DreamBooth dataset -----------------------------------------------------------------------

@dataclass(frozen=True)
class DreamBenchPrompts:
    classes: dict[str, str]  # subject folder -> class name
    object_prompts: tuple[str, ...]  # templates with {0} (unique token) and {1} (class)
    live_prompts: tuple[str, ...]


_PROMPT_LINE = re.compile(r"""^\s*(['"])(.*)\1\s*\.format\(""")


def parse_prompts_and_classes(text: str, where: str = DREAMBENCH_FILE) -> DreamBenchPrompts:
    """Read DreamBooth's prompts_and_classes.txt: a "subject_name,class" table, then two Python-like
    ``prompt_list = ['a {0} {1} in the jungle'.format(unique_token, class_token), ...]`` blocks,
    the first for objects and the second for live subjects."""
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {}
    section = None
    in_table = False
    for raw in text.splitlines():
        line = raw.strip()
        lowered = line.lower()
        if lowered == "subject_name,class":
            in_table = True
            continue
        if in_table:
            if not line:
                if classes:
                    in_table = False
                continue
            if "," in line:
                name, class_name = (part.strip() for part in line.split(",", 1))
                classes[name] = class_name
                continue
            in_table = False
        if lowered.endswith("prompts") and "prompt_list" not in lowered:
            section = "live" if "live" in lowered else "object"
            lists.setdefault(section, [])
            continue
        match = _PROMPT_LINE.match(line)
        if match and section is not None:
            lists[section].append(match.group(2))
    if not classes or not lists.get("object") or not lists.get("live"):
        raise SisoError(
            f"{where} does not look like DreamBooth's prompts_and_classes.txt (expected a subject_name,class "
            "table and 'Object Prompts' / 'Live Subject Prompts' lists)."
        )
    return DreamBenchPrompts(classes, tuple(lists["object"]), tuple(lists["live"]))


def fill_prompt(template: str, class_name: str, token: str = "") -> str:
    """'a {0} {1} in the jungle' -> 'a dog in the jungle': siso needs no unique token, just the class."""
    return " ".join(template.format(token, class_name).split())


def dreambench_items(path: str | Path) -> list[BenchItem]:
    """The generation manifest of the DreamBooth dataset: 30 subjects x 25 prompts.

    ``path`` is the dataset/ folder or the checkout containing it.
    """
    path = Path(path).expanduser()
    dataset = path / "dataset" if (path / "dataset" / DREAMBENCH_FILE).is_file() else path
    prompts_file = dataset / DREAMBENCH_FILE
    if not prompts_file.is_file():
        raise SisoError(f"--dreambench {path} has no {DREAMBENCH_FILE}; pass the dataset/ folder of a "
                        "google/dreambooth checkout (git clone https://github.com/google/dreambooth).")
    try:
        text = prompts_file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SisoError(f"{prompts_file} is not UTF-8 text; is it the DreamBooth dataset's file?") from err
    parsed = parse_prompts_and_classes(text, str(prompts_file))
    items = []
    for subject, class_name in parsed.classes.items():
        folder = dataset / subject
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not photos:
            raise SisoError(f"{prompts_file} lists the subject {subject!r}, but {folder} has no photos.")
        live = class_name in LIVE_CLASSES
        templates = parsed.live_prompts if live else parsed.object_prompts
        items.append(BenchItem(id=subject, class_name=class_name, images=tuple(p.resolve() for p in photos),
                               prompts=tuple(fill_prompt(t, class_name) for t in templates), subject=subject,
                               extra={"live": live}))
    return check_items(items, str(prompts_file))
