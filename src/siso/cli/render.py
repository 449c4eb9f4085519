"""`siso render`: the second stage, any prompt with a learned LoRA through the plain diffusers pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .options import Device, Dtype, Resolution, Seed
from .output import announce_device, console, quiet_libraries


def render(
    model: Annotated[str, typer.Option(help="The model the LoRA was learned on (Hub id or directory).")],
    prompt: Annotated[str, typer.Option(help="Any prompt; name the subject's class, e.g. 'a dog in the snow'.")],
    out: Annotated[Path, typer.Option(help="PNG file to write.")],
    lora: Annotated[Path | None, typer.Option(help="The lora/ directory of a siso run.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the backbone's: 4; Sana 20).")] = None,
    seed: Seed = 42,
    resolution: Resolution = 512,
    device: Device = "auto",
    dtype: Dtype = "auto",
    prompt_tokens: Annotated[int | None, typer.Option(
        help="FLUX/Sana prompt length (default: the pipeline's, FLUX 512, Sana 300); the optimisation used 256, "
             "so 256 with --steps 1 (FLUX) renders its best image again.")] = None,
) -> None:
    """Render PROMPT with a learned LoRA (the second stage: more steps, any prompt)."""
    from ..rendering import render as render_image

    quiet_libraries()
    announce_device(device, dtype)
    with console.status(f"Rendering with {escape(model)}"):
        render_image(model, prompt, lora=lora, out=out, steps=steps, seed=seed, resolution=resolution,
                     device=device, dtype=dtype, prompt_tokens=prompt_tokens)
    console.print(f"[green]Wrote[/] {escape(str(out))}")
