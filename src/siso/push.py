"""`siso push`: a run's LoRA folder (its files, model card and image) to a model repository on the Hub.

huggingface_hub does the work (``create_repo`` then ``upload_folder``, one commit); siso checks the run
first and turns the Hub's refusals into one message saying what to do. Nothing local is written.
"""

from __future__ import annotations

from pathlib import Path

from .errors import SisoError
from .model_card import CARD_NAME
from .run_directory import is_siso_run


def push_lora(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload ``run_dir``'s ``lora/`` to the Hub model repository ``repo_id`` (created if missing, as
    private when asked); returns the commit's URL."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    run_dir = Path(run_dir)
    lora_dir = run_dir / "lora"
    if not is_siso_run(run_dir):
        raise SisoError(f"{run_dir} is not a siso run directory (it has no siso run.json): pass the --out of a "
                        "`siso generate` or `siso edit` run.")
    if not (lora_dir / CARD_NAME).is_file() or not any(lora_dir.glob("*.safetensors")):
        raise SisoError(f"{run_dir} has no saved LoRA yet (lora/ with its files and {CARD_NAME}): a run saves "
                        "one with its first finished iteration.")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise SisoError(f"{repo_id!r} is not a Hub repository id: write it as OWNER/NAME, e.g. you/my-dog-lora.")
    if constants.HF_HUB_OFFLINE:
        raise SisoError("Pushing needs the Hugging Face Hub, and HF_HUB_OFFLINE is set: unset it (and be online), "
                        "then push again. Nothing was changed.")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)  # else: the owner's default
        commit = api.upload_folder(repo_id=repo_id, folder_path=lora_dir,
                                   commit_message=f"siso LoRA from {run_dir.name}")
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            advice = "log in first (`hf auth login`, or set HF_TOKEN), or pass --token."
        elif status == 403:
            advice = f"your token may not write to {repo_id}: use a write token, or a repository of your own."
        else:
            advice = f"the Hub answered {status}: {err}."
        raise SisoError(f"Pushing to {repo_id} failed: {advice} Nothing was changed locally.") from err
    except (OSError, ConnectionError) as err:  # DNS failure, refused connection, timeout
        raise SisoError(f"Pushing to {repo_id} failed: the Hub ({constants.ENDPOINT}) cannot be reached "
                        f"({err.__class__.__name__}). Nothing was changed locally; push again when online.") from err
    return str(commit.commit_url if hasattr(commit, "commit_url") else commit)
