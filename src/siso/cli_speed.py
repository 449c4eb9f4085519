"""The speed and memory options of the optimising commands, and the line that says what a run uses.

Its own module (not cli_shared) so the commands' speed settings are in one place: ``--low-memory``
(auto by default) and ``--compile`` (off for a single run, see :data:`Compile`).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from .cli_shared import console

LowMemory = Annotated[bool | None, typer.Option(
    "--low-memory/--no-low-memory",
    help="Gradient checkpointing (exact, slower): --low-memory in the VAE decoder and the denoiser, "
         "--no-low-memory none; default: chosen from the GPU's free memory (the run says which).")]
Compile = Annotated[bool, typer.Option(
    "--compile/--no-compile",
    help="torch.compile the denoiser, VAE decoder and similarity models (CUDA graphs on GPUs): about 2x faster "
         "iterations, but the first run on a machine compiles for minutes (cached on disk after that), more than "
         "one run's iterations take; so off for a single run. `siso app` and `siso bench`, which keep the "
         "models loaded, compile by default on GPUs.")]


def announce_speed(session: Any) -> None:
    """Print which memory savers the run uses (and why) and whether it is compiled."""
    memory = getattr(session, "memory", None)
    compiled = getattr(session, "compiled", None)
    if memory is not None:
        console.print(escape(memory.describe()))
    if compiled is not None and compiled.enabled:
        console.print(escape("Compiling: the first iteration takes longer (" + compiled.describe() + ")"))
