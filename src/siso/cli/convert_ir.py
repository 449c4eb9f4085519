"""`siso convert-ir`: fetch (optionally) and convert the IR model once; at run time it is never unpickled."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..errors import SisoError
from .output import console


def convert_ir(
    checkpoint: Annotated[Path | None, typer.Argument(
        help="The published IR checkpoint (PyTorch pickle, read safely); omit it with --download.")] = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Fetch the checkpoint from Kaggle (louieshao/guieweights0732) with kagglehub first."
    )] = False,
    out: Annotated[Path | None, typer.Option(
        help="Directory to write config.json and model.safetensors into (default: siso's cache, where "
             "--ir-model auto finds it).")] = None,
) -> None:
    """Convert the IR (image retrieval) model once into a safetensors directory: the paper's loss is DINO + IR."""
    from ..convert_ir import convert_ir_checkpoint
    from ..ir_cache import default_ir_dir, download_ir_checkpoint

    if (checkpoint is None) == (not download):
        raise SisoError("Pass either the CHECKPOINT file or --download (which fetches it from Kaggle), not both.")
    target = out if out is not None else default_ir_dir()
    if checkpoint is None:
        with console.status("Downloading the IR checkpoint from Kaggle (about 2.5 GB)"):
            checkpoint = download_ir_checkpoint()
    with console.status(f"Converting {escape(str(checkpoint))}"):
        written = convert_ir_checkpoint(checkpoint, target)
    usage = "it is used automatically (--ir-model auto)" if out is None else f"use it with --ir-model {written}"
    console.print(f"[green]Wrote[/] {escape(str(written))}; {escape(usage)}.")
