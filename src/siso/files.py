"""Atomic writes: a file either has its old content or its complete new content, never half.

Files get the permissions any program's files get (0666 less the umask), not mkstemp's private
0600: a run directory is meant to be read by the user's other tools and colleagues.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from safetensors import SafetensorError

#: what a write can raise: the OS's errors (PIL and json raise those too), and safetensors' own, which is not one
WRITE_ERRORS: tuple[type[Exception], ...] = (OSError, SafetensorError)


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


UMASK = _umask()
FILE_MODE = 0o666 & ~UMASK
DIR_MODE = 0o777 & ~UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def make_private_dir_public(path: Path) -> Path:
    """mkdtemp makes 0700 directories; a run's directories get the usual permissions."""
    os.chmod(path, DIR_MODE)
    return path


def write_png(image: Image.Image, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def strict_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None, so the file is strict JSON
    (the JSON standard has no NaN; Python's json module writes a token other parsers reject)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def write_json(data: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(strict_json(data), indent=2, default=str, allow_nan=False) + "\n")


def check_name_lengths(path: str | Path, what: str) -> None:
    """Refuse a path with a name longer than its filesystem allows, saying which: the OS would say only
    "File name too long", and only once models had loaded."""
    from .errors import SisoError

    path = Path(path)
    existing = path.absolute().parent
    while not os.path.isdir(existing) and existing != existing.parent:  # isdir: False, never raising
        existing = existing.parent
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or no limit known
        limit = 255
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise SisoError(f"{what} {str(path)[:80]}...: the name {part[:40]}... is {size} bytes long, and this "
                            f"filesystem allows {limit}; choose a shorter name.")

