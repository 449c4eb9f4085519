"""The option types the commands share, and the parsers that turn their text into config values.

Each command module (``siso.cli.generate``, ``edit``, ...) declares its options with these types, so a
flag reads and documents the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

import typer

Device = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
Dtype = Annotated[str, typer.Option(help="Frozen-weight precision: auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")]
Seed = Annotated[int, typer.Option(help="Seed of the fixed initial noise (as torch.Generator(device).manual_seed).")]
Resolution = Annotated[int, typer.Option(help="Image side in pixels.")]
MaxSteps = Annotated[int, typer.Option(help="Most optimisation iterations.")]
EarlyStopPct = Annotated[float, typer.Option(
    help="An iteration improves when the reference's loss -(sum of weighted cosines) drops by this % of the last "
         "improvement's.")]
LoraRank = Annotated[int, typer.Option(help="LoRA rank (alpha equals it).")]
DinoModel = Annotated[str, typer.Option(help="DINOv2 Hub id or directory.")]
IrModel = Annotated[str, typer.Option(
    help="IR model directory made by `siso convert-ir` (adds the IR loss); auto: the one `siso convert-ir "
         "--download` cached, if any; none: no IR loss.")]
Similarity = Annotated[
    str | None, typer.Option(help="Comma-separated: dino, ir (default: dino,ir when an IR model is found, else dino).")
]
Overwrite = Annotated[bool, typer.Option(help="Write into a non-empty --out (siso's files are replaced).")]
LoraFormat = Annotated[list[str] | None, typer.Option(
    help="LoRA files to write: diffusers (always) and kohya (ComfyUI / A1111). Default: both for SD and "
         "SDXL, diffusers for FLUX and Sana; --lora-format diffusers writes the diffusers file alone."
)]
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



def split_similarity(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(",") if part.strip())


def lora_formats(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """The diffusers layout is always written; --lora-format adds others. None (no --lora-format):
    the backbone's defaults."""
    if not values:
        return None
    return tuple(dict.fromkeys(["diffusers", *values]))


def ir_model_option(value: str) -> str | None:
    """``--ir-model none`` switches the IR loss off; anything else (auto, a directory) is passed on."""
    return None if value.strip().lower() == "none" else value
