"""`siso generate`: optimise a LoRA on the subject photo(s) and write the run directory. A thin typed
layer over :func:`siso.generation.run_generation`; heavy imports wait until the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import DEFAULT_DINO_MODEL, DEFAULT_GENERATION_MODEL, GenerateConfig
from .options import (
    Compile,
    Device,
    DinoModel,
    Dtype,
    EarlyStopPct,
    IrModel,
    LoraFormat,
    LoraRank,
    LowMemory,
    MaxSteps,
    Overwrite,
    Resolution,
    Seed,
    Similarity,
    ir_model_option,
    lora_formats,
    split_similarity,
)
from .output import (
    StopSignals,
    announce_device,
    announce_speed,
    exit_after_signal,
    print_summary,
    quiet_libraries,
    run_with_progress,
    similarity_hint,
)


def generate(
    subject: Annotated[list[Path], typer.Option(help="Photo of the subject; repeat for several photos.")],
    prompt: Annotated[str, typer.Option(help='A simple prompt naming the subject, e.g. "a photo of a dog".')],
    out: Annotated[Path, typer.Option(help="Run directory to write (must be new or empty).")],
    model: Annotated[str, typer.Option(help="Hub id or directory of a diffusers SD, SDXL, FLUX or Sana pipeline.")] = (
        DEFAULT_GENERATION_MODEL
    ),
    seed: Seed = 42,
    resolution: Resolution = 512,
    max_steps: MaxSteps = 50,
    lr: Annotated[float | None, typer.Option(
        help="AdamW learning rate (default: the backbone's: SD-Turbo, SDXL-Turbo, FLUX 2e-4; Sana 8e-4).")] = None,
    early_stop_pct: EarlyStopPct = 3.0,
    early_stop_patience: Annotated[
        int | None, typer.Option(help="Stop after this many iterations without one (default: the backbone's: 7; "
                                 "Sana 5).")
    ] = None,
    denoise_steps: Annotated[int | None, typer.Option(
        help="Denoising steps per iteration (default: the backbone's: 1; Sana 20).")] = None,
    grad_steps: Annotated[int | None, typer.Option(
        help="How many final steps carry gradients (default: the backbone's: 1; Sana 3).")] = None,
    lora_rank: LoraRank = 4,
    train_text_encoder: Annotated[bool | None, typer.Option(
        "--train-text-encoder/--no-train-text-encoder",
        help="Also put LoRA on the CLIP text encoder(s) (default: on for SDXL-Turbo and FLUX.1-schnell, as the "
             "paper ran them; off for SD-Turbo; Sana has none).")] = None,
    text_encoder_lr: Annotated[float | None, typer.Option(
        help="Learning rate of the text encoders' LoRA (default: FLUX 5e-6; others the --lr).")] = None,
    low_memory: LowMemory = None,
    compile: Compile = False,
    dino_model: DinoModel = DEFAULT_DINO_MODEL,
    ir_model: IrModel = "auto",
    similarity: Similarity = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
    lora_format: LoraFormat = None,
) -> None:
    """Optimise a LoRA so the model's image of PROMPT shows the subject; write images, LoRA and run.json."""
    from ..generation import run_generation

    quiet_libraries()
    formats = lora_formats(lora_format)
    config = GenerateConfig(
        subjects=tuple(subject), prompt=prompt, model=model, seed=seed, resolution=resolution,
        max_steps=max_steps, learning_rate=lr, early_stop_pct=early_stop_pct,
        early_stop_patience=early_stop_patience, denoise_steps=denoise_steps, grad_steps=grad_steps,
        lora_rank=lora_rank, train_text_encoder=train_text_encoder, text_encoder_learning_rate=text_encoder_lr,
        low_memory=low_memory, compile=compile, dino_model=dino_model, ir_model=ir_model_option(ir_model),
        similarity=split_similarity(similarity), device=device, dtype=dtype, lora_format=formats,
    )
    announce_device(device, dtype)
    similarity_hint(config)
    signals = StopSignals()
    result = run_with_progress(
        lambda **hooks: run_generation(config, out, overwrite=overwrite, **hooks), config.max_steps,
        on_session=announce_speed, signals=signals,
    )
    print_summary(result)
    exit_after_signal(result, signals)
