"""Model sources: a Hugging Face Hub id or a local directory. Telling them apart lets a missing
directory be reported as missing, not as a failed download."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import SisoError

# "name" or "owner/name": what the Hub accepts as a repository id.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def is_local_path(source: str) -> bool:
    """Whether ``source`` can only mean a path on this machine (it cannot be a Hub id)."""
    return (source.startswith(("/", ".", "~")) or "\\" in source or not _HUB_ID.fullmatch(source)
            or ".." in source.split("/"))


def check_source(source: str, flag: str) -> None:
    """Refuse, before anything loads, a local path that does not exist, and a Hub id that would have to be
    downloaded from a Hub this machine cannot reach (at once, not after huggingface_hub's retries)."""
    if is_local_path(source) or Path(source).expanduser().exists():
        if not Path(source).expanduser().exists():
            raise SisoError(f"{flag} {source} does not exist (no such file or directory); check the path, or pass a "
                            "Hugging Face Hub id such as owner/name.")
        return
    from .hub import check_downloadable

    check_downloadable(source, flag)
