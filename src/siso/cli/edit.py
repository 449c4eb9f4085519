"""`siso edit`: swap the subject of a photo, keep everything else. A thin typed layer over
:func:`siso.editing.run_edit`; heavy imports wait until the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from ..config import (
    DEFAULT_DETECTOR_MODEL,
    DEFAULT_DINO_MODEL,
    DEFAULT_EDITING_MODEL,
    DEFAULT_LABEL_MODEL,
    DEFAULT_SEGMENTER_MODEL,
    EditConfig,
)
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
    console,
    exit_after_signal,
    print_summary,
    quiet_libraries,
    run_with_progress,
    similarity_hint,
)


def edit(
    subject: Annotated[Path, typer.Option(help="Photo of the subject to put into the scene.")],
    input: Annotated[Path, typer.Option(help="The scene photo whose object is replaced.")],
    out: Annotated[Path, typer.Option(help="Run directory to write (must be new or empty).")],
    subject_class: Annotated[str | None, typer.Option(
        help='What the subject is, e.g. "dog" (default: recognised by CLIP).')] = None,
    input_class: Annotated[str | None, typer.Option(
        help='What to replace in the scene, e.g. "cat" (default: recognised by CLIP).')] = None,
    mask: Annotated[Path | None, typer.Option(
        help="Mask of the object to replace (white = replace), at the scene's size; skips detection.")] = None,
    bg_weight: Annotated[float, typer.Option(help="Weight of the background loss (0 turns it off).")] = 10.0,
    strength: Annotated[float, typer.Option(help="Fraction of the inversion steps the edit re-runs.")] = 0.75,
    inversion_steps: Annotated[int, typer.Option(help="Sampler steps over the whole schedule.")] = 4,
    model: Annotated[str, typer.Option(help="Hub id or directory of a diffusers SD/SDXL pipeline.")] = (
        DEFAULT_EDITING_MODEL
    ),
    seed: Seed = 42,
    resolution: Resolution = 512,
    max_steps: MaxSteps = 50,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 3e-4,
    early_stop_pct: EarlyStopPct = 3.0,
    early_stop_patience: Annotated[int, typer.Option(help="Stop after this many iterations without one.")] = 7,
    grad_steps: Annotated[int, typer.Option(
        help="How many of the re-run steps carry gradients (the last ones; the paper's 1 suffices).")] = 1,
    lora_rank: LoraRank = 4,
    low_memory: LowMemory = None,
    compile: Compile = False,
    dino_model: DinoModel = DEFAULT_DINO_MODEL,
    ir_model: IrModel = "auto",
    similarity: Similarity = None,
    label_model: Annotated[str, typer.Option(
        help="CLIP model that names the subject and the object when --subject-class/--input-class are not given."
    )] = DEFAULT_LABEL_MODEL,
    detector_model: Annotated[str, typer.Option(
        help="Grounding DINO that finds the object (unless --mask); IDEA-Research/grounding-dino-base is larger."
    )] = DEFAULT_DETECTOR_MODEL,
    segmenter_model: Annotated[str, typer.Option(
        help="SAM that turns the object's box into a mask (unless --mask).")] = DEFAULT_SEGMENTER_MODEL,
    box_threshold: Annotated[float, typer.Option(help="Grounding DINO's box confidence threshold.")] = 0.3,
    text_threshold: Annotated[float, typer.Option(help="Grounding DINO's text (phrase) threshold.")] = 0.25,
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
    lora_format: LoraFormat = None,
) -> None:
    """Replace the object in the --input photo with the --subject; keep the rest of the scene.

    Writes input.png, mask.png, reconstruction.png (the inverted scene rendered back), steps/, best.png, lora/.
    """
    from ..editing import run_edit

    quiet_libraries()
    config = EditConfig(
        subject=subject, input=input, subject_class=subject_class, input_class=input_class, mask=mask,
        bg_weight=bg_weight, strength=strength, inversion_steps=inversion_steps, model=model, seed=seed,
        resolution=resolution, max_steps=max_steps, learning_rate=lr, early_stop_pct=early_stop_pct,
        early_stop_patience=early_stop_patience, grad_steps=grad_steps, lora_rank=lora_rank, low_memory=low_memory,
        compile=compile, dino_model=dino_model,
        ir_model=ir_model_option(ir_model),
        similarity=split_similarity(similarity), label_model=label_model, detector_model=detector_model,
        segmenter_model=segmenter_model, box_threshold=box_threshold, text_threshold=text_threshold,
        device=device, dtype=dtype, lora_format=lora_formats(lora_format),
    )
    announce_device(device, dtype)
    similarity_hint(config)

    def announce(session) -> None:
        for role, name in (("subject", "Subject"), ("input", "Replacing")):
            console.print(f"{name}: {escape(session.labels[role].describe())}")
        console.print(f"Mask: {escape(_describe_mask(session.mask))}; inversion residual {session.residual:.4f}")
        announce_speed(session)

    signals = StopSignals()
    result = run_with_progress(
        lambda **hooks: run_edit(config, out, overwrite=overwrite, **hooks), config.max_steps, on_session=announce,
        signals=signals,
    )
    print_summary(result, files=[("input", str(result.run_dir / "input.png")),
                                 ("mask", str(result.run_dir / "mask.png"))])
    console.print(f"  Render the subject anywhere: siso render --model {escape(model)} --lora "
                  f"{escape(str(result.run_dir / 'lora'))} --prompt \"a {escape(result.labels['subject'].text)} ...\"")
    exit_after_signal(result, signals)


def _describe_mask(mask) -> str:
    share = f"{float(mask.mask.mean()):.0%} of the image"
    if mask.source == "user":
        return f"from {mask.path}, {share}"
    return f"found by Grounding DINO + SAM (box score {mask.detection.score:.2f}), {share}"
