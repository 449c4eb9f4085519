"""A model's ``model_index.json``, from a directory or the Hugging Face Hub, failing fast when the Hub
cannot be reached.

Asked for a Hub id on a machine without internet, huggingface_hub retries five times with backoff
(about 25 s of "Retrying in 8s" lines) before giving up. Here a model already in the local cache is read
from it without any request, and otherwise one quick request checks that the Hub answers before the
usual download path runs; if it does not, one clear SisoError says so at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SisoError

REACHABLE_TIMEOUT_S = 10.0


def read_model_index(model: str) -> dict[str, Any]:
    """The model index (a dict with ``_class_name``) of a pipeline directory or Hub id.

    Raises whatever diffusers raises for a model it cannot read, except for an unreachable Hub:
    that is a SisoError naming the endpoint and what to do.
    """
    from diffusers import DiffusionPipeline

    if Path(model).exists():
        return DiffusionPipeline.load_config(model)
    try:
        return DiffusionPipeline.load_config(model, local_files_only=True)  # downloaded before: no request
    except Exception:  # not in the cache (diffusers raises OSError/EnvironmentError types)
        pass
    check_hub_reachable(model)
    try:
        return DiffusionPipeline.load_config(model)
    except Exception as err:
        refusal = hub_refusal(model, err)
        if refusal is None:
            raise
        raise SisoError(refusal) from err


def hub_refusal(model: str, err: BaseException) -> str | None:
    """What to do when the Hub answered but would not give ``model``: gated (accept its licence and log in)
    or not there (a typo, or a private repository). diffusers rewraps both into one vague OSError; the
    Hub's own error is in its context. None for anything else."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        return (f"{model} is a gated model on the Hugging Face Hub: accept its licence on "
                f"https://huggingface.co/{model} while logged in, then log in on this machine (`hf auth login`, "
                "or set HF_TOKEN) and run again.")
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return (f"{model!r} is neither a local directory nor a model on the Hugging Face Hub (or it is private: "
                "then log in with `hf auth login`). Check the id, e.g. stabilityai/sdxl-turbo, or the path.")
    return None


def is_cached(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a snapshot of ``repo_id`` (downloaded before)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    try:
        return any(snapshots.iterdir())
    except OSError:
        return False


def check_downloadable(repo_id: str, flag: str) -> None:
    """A Hub model that must be downloaded needs the Hub: one quick request says at once when it cannot
    be reached (huggingface_hub alone retries for ~25 s per model). Nothing asked for a cached one."""
    if not is_cached(repo_id):
        check_hub_reachable(repo_id, flag)


def check_hub_reachable(model: str, flag: str | None = None) -> None:
    """One request to the Hub's endpoint, no retries; any HTTP answer means it is reachable.

    Nothing to check when the Hub is switched off (HF_HUB_OFFLINE=1): diffusers then fails at once itself.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return
    endpoint = constants.ENDPOINT
    if endpoint in _ANSWERED:
        return
    try:
        get_session().head(endpoint, timeout=REACHABLE_TIMEOUT_S)
    except Exception as err:  # DNS failure, refused connection, timeout, proxy or TLS trouble
        shown = f"{flag} {model!r}" if flag else repr(model)
        raise SisoError(
            f"{shown} is not in the local Hugging Face cache and the Hub ({endpoint}) cannot be reached "
            f"({err.__class__.__name__}: {err}). The first run of a Hub model needs internet access to "
            "download it (later runs use the cache); or pass a local directory saved with save_pretrained."
        ) from err
    _ANSWERED.add(endpoint)


_ANSWERED: set[str] = set()  # endpoints that answered in this process: asked once, not once per model
