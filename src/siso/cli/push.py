"""`siso push`: a run's LoRA, with its model card, to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .output import console


def push(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="A run directory (the --out of siso generate or siso edit).")],
    repo_id: Annotated[str, typer.Argument(
        metavar="REPO_ID", help="The Hub model repository to upload to, OWNER/NAME (created if missing).")],
    private: Annotated[bool, typer.Option(
        help="Create the repository as private (an existing one keeps its visibility).")] = False,
    token: Annotated[str | None, typer.Option(
        help="A Hub token with write access (default: the logged-in one, or HF_TOKEN).")] = None,
) -> None:
    """Upload RUN_DIR's LoRA folder (its files, model card and best image) to the Hub as REPO_ID."""
    from ..push import push_lora

    with console.status(f"Pushing {escape(str(run_dir / 'lora'))} to {escape(repo_id)}"):
        url = push_lora(run_dir, repo_id, private=private, token=token)
    console.print(f"[green]Pushed[/] {escape(str(run_dir / 'lora'))} to {escape(url)}")
