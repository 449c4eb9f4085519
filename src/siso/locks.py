"""One writer per directory: an OS lock held while a process writes a run or a benchmark directory.

The lock is ``flock`` on a small file inside the directory, ``.siso-lock``, which also says who holds it
(process, host, command, since when) for the message a second writer gets. The OS drops the lock when
its process ends, however it ends, so a SIGKILL never leaves a directory locked: a later writer simply
takes it over. The file moves with its directory (``--overwrite`` swaps directories by renaming), so a
directory being written is locked under whatever name it has. Where the OS has no ``flock`` (Windows),
nothing is locked.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import SisoError

LOCK_FILE = ".siso-lock"

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


class DirectoryLock:
    """The lock on one directory, held by this process until :meth:`release` (or until it exits)."""

    def __init__(self, directory: Path, fd: int | None) -> None:
        self.directory = directory
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode())
        return (f" (process {info['pid']} on {info['host']}, since {info['since']}: "
                f"{info['command'][:120]})")
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _busy(directory: Path, what: str, fd: int) -> SisoError:
    return SisoError(f"{what} {directory} is being written by another siso process{_holder(fd)}; wait for it to "
                     "finish or stop it, or choose another directory. (A stopped or killed process holds no lock.)")


def lock_directory(directory: Path, what: str = "--out") -> DirectoryLock:
    """Take the lock on ``directory`` (which exists), or refuse with who holds it."""
    if fcntl is None:
        return DirectoryLock(directory, None)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        error = _busy(directory, what, fd)
        os.close(fd)
        raise error from err
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return DirectoryLock(directory, fd)


def check_not_locked(directory: Path, what: str = "--out") -> None:
    """Refuse a directory another process is writing now; creates nothing (used before models load)."""
    if fcntl is None or not (directory / LOCK_FILE).is_file():
        return
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            raise _busy(directory, what, fd) from err
    finally:
        os.close(fd)


def only_the_lock(directory: Path) -> bool:
    """Whether ``directory`` holds nothing but a lock file (a start that was stopped before writing)."""
    return all(entry.name == LOCK_FILE for entry in directory.iterdir())
