"""`siso render`: the second stage, any prompt with a learned LoRA through the plain diffusers pipeline.
Its options are :class:`siso.config.RenderConfig`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..config import RenderConfig
from .options import command, given, knob_parameters
from .output import announce_device, console, quiet_libraries


def _render(out: Annotated[Path, typer.Option(help="PNG file to write.")], **knobs: Any) -> None:
    """Render PROMPT with a learned LoRA (the second stage: more steps, any prompt)."""
    from ..rendering import render as render_image

    quiet_libraries()
    values = given(RenderConfig, knobs)
    config = RenderConfig(**values)  # every check before the device line and before any model loads
    announce_device(config.device, config.dtype)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console)
    with progress:
        task = progress.add_task(f"Loading {escape(config.model)}", total=None)

        def step_done(done: int, total: int) -> None:
            progress.update(task, description="Rendering", completed=done, total=total)

        render_image(out=out, on_step=step_done, **values)
    console.print(f"[green]Wrote[/] {escape(str(out))}")


render = command(_render, knob_parameters(RenderConfig))
