"""siso's own cache directory: the converted IR model and the compiled code live below it."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SISO_CACHE_DIR"


def cache_dir() -> Path:
    """``$SISO_CACHE_DIR``, else the platform's user cache directory (~/.cache/siso on Linux)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("siso", appauthor=False))
