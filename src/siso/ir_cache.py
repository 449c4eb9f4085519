"""Where the IR model lives once converted, and how ``--ir-model auto`` finds it.

The paper's loss is DINO + IR. The IR weights are a Kaggle dataset, not a Hub model, so they are
fetched and converted once (``siso convert-ir --download``) into siso's cache directory; from then
on ``--ir-model auto`` (the default) picks the conversion up. Without it a run is DINO-only, and
says so once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from .config import IR_AUTO, RunSettings
from .errors import SisoError
from .model_ids import IR_KAGGLE_DATASET as KAGGLE_DATASET
from .user_cache import cache_dir

Settings = TypeVar("Settings", bound=RunSettings)
IR_SUBDIR = "ir-guie-vit-h-14"

GET_IR = (
    "Get the IR model once with `siso convert-ir --download` (needs `pip install kagglehub` and a Kaggle "
    "account), or pass --ir-model DIR (a directory made by `siso convert-ir CHECKPOINT`)."
)
DINO_ONLY_NOTICE = (
    "Similarity: DINO only, not the paper's DINO + IR loss (no converted IR model in the cache). " + GET_IR
)


def default_ir_dir() -> Path:
    """Where ``siso convert-ir --download`` writes the converted IR model."""
    return cache_dir() / IR_SUBDIR


def cached_ir_dir() -> Path | None:
    """The cached conversion, if a complete one is there."""
    from .similarity.ir import CONFIG_FILE, WEIGHTS_FILE

    path = default_ir_dir()
    return path if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file() else None


def resolve_ir_model(value: str | None) -> str | None:
    """``auto`` -> the cached conversion or None (DINO only); anything else is kept as given."""
    if value != IR_AUTO:
        return value
    cached = cached_ir_dir()
    return str(cached) if cached is not None else None


def resolve_ir(config: Settings) -> Settings:
    """``config`` with ``ir_model`` ``auto`` replaced by the cached IR conversion, or None (DINO only)."""
    ir_model = resolve_ir_model(config.ir_model)
    if ir_model is None and config.similarity is not None and "ir" in config.similarity:
        raise SisoError(f"{config.flag('similarity')} includes ir, but --ir-model {config.ir_model} found no IR "
                        f"model. {GET_IR}")
    return replace(config, ir_model=ir_model)


def is_dino_only(config: RunSettings) -> bool:
    """Whether a run of ``config`` will miss the paper's IR loss because no IR model was found
    (what the one-line notice warns about; a run that chose ``--similarity dino`` is not told)."""
    return config.similarity is None and config.ir_model == IR_AUTO and resolve_ir_model(IR_AUTO) is None


def download_ir_checkpoint() -> Path:
    """Fetch the published checkpoint with kagglehub (its own cache; Kaggle credentials where Kaggle
    asks for them) and return the path of its ``.pth`` file."""
    try:
        import kagglehub
    except ImportError as err:
        raise SisoError(
            "`siso convert-ir --download` needs the kagglehub package: pip install 'siso[ir]' "
            "(or pip install kagglehub), then run it again."
        ) from err
    try:
        location = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as err:  # network, authentication and HTTP errors come in many types
        raise SisoError(
            f"Could not download the Kaggle dataset {KAGGLE_DATASET} ({err.__class__.__name__}: {err}). Check the "
            "internet connection and your Kaggle credentials (https://github.com/Kaggle/kagglehub#authenticate), "
            "or download the .pth file by hand and run `siso convert-ir FILE`."
        ) from err
    candidates = sorted(location.rglob("*.pth")) if location.is_dir() else [location]
    if len(candidates) != 1 or not candidates[0].is_file():
        found = ", ".join(p.name for p in candidates) or "no .pth file"
        raise SisoError(
            f"The Kaggle dataset {KAGGLE_DATASET} downloaded to {location} holds {found}; expected one .pth "
            "checkpoint. Pass the right file yourself: `siso convert-ir FILE`."
        )
    return candidates[0]
