"""Atomic writes: a file either has its old content or its complete new content, never half.

Files get the permissions any program's files get (0666 less the umask), not mkstemp's private
0600: a run directory is meant to be read by the user's other tools and colleagues.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
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


def replace_directory(fresh: Path, target: Path) -> None:
    """Put the complete directory ``fresh`` where ``target`` is, in one step, and delete the old one:
    whoever looks (a reader, or what a SIGKILL leaves) finds the old directory or the new one, never a
    mixture. On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps the two at once; where the system or the
    filesystem has no exchange, the old directory is renamed aside first (an instant without ``target``,
    the old one whole beside it). ``fresh`` must be on ``target``'s filesystem (a sibling)."""
    if not target.exists():
        os.rename(fresh, target)
        return
    if _exchange(fresh, target):
        shutil.rmtree(fresh, ignore_errors=True)  # the old directory, under the fresh one's name now
        return
    aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, aside)
    os.rename(fresh, target)
    shutil.rmtree(aside, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2 (glibc 2.28+); False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # this filesystem cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(second))


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


def _describe_os_error(err: OSError) -> str:
    where = f" {err.filename}" if err.filename else ""
    return f"{err.strerror or err.__class__.__name__}{':' if where else ''}{where}"


_WRITE_ADVICE = {
    errno.ENOSPC: "Free some space and run again.",
    errno.EDQUOT: "Free some space (the disk quota is full) and run again.",
    errno.EROFS: "The disk is read-only now: run again with --out on a writable disk.",
    errno.EACCES: "siso may no longer write there: check the directory's permissions, or choose another --out.",
    errno.EPERM: "siso may no longer write there: check the directory's permissions, or choose another --out.",
    errno.ENAMETOOLONG: "A file name is too long for this filesystem: choose a shorter --out.",
}


def describe_write_error(err: BaseException) -> tuple[str, str]:
    """(what went wrong, what to do) for a failed write, whichever library raised it."""
    if isinstance(err, OSError):
        code, what = err.errno, _describe_os_error(err)
    else:  # safetensors: "Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... })"
        found = re.search(r"code: (\d+)", str(err))
        code = int(found.group(1)) if found else None
        what = os.strerror(code) if code else str(err)
    return what, _WRITE_ADVICE.get(code, "Check the disk, then run again.")
