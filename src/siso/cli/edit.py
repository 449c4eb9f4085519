"""`siso edit`: swap the subject of a photo, keep everything else. A thin layer over
:func:`siso.editing.start_edit`, its options derived from :class:`siso.config.EditConfig`; heavy
imports wait until the command runs."""

from __future__ import annotations

from typing import Any

from rich.markup import escape

from ..config import EditConfig
from .options import RunTarget, command, given, knob_parameters
from .output import (
    StopSignals,
    announce_device,
    console,
    exit_after_signal,
    follow,
    print_summary,
    quiet_libraries,
    similarity_hint,
)

INPUTS = ("subject", "input", "subject_class", "input_class", "mask")


def _edit(**knobs: Any) -> None:
    """Replace the object in the --input photo with the --subject; keep the rest of the scene.

    Writes input.png, mask.png, reconstruction.png (the inverted scene rendered back), steps/, best.png, lora/.
    """
    from ..editing import start_edit

    quiet_libraries()
    target = RunTarget(**given(RunTarget, knobs))
    config = EditConfig(**given(EditConfig, knobs))
    announce_device(config.device, config.dtype)
    similarity_hint(config)

    def announce(session) -> None:
        task = session.task
        for role, name in (("subject", "Subject"), ("input", "Replacing")):
            console.print(f"{name}: {escape(task.labels[role].describe())}")
        console.print(f"Mask: {escape(_describe_mask(task.mask))}; inversion residual {task.residual:.4f}")

    signals = StopSignals()
    result = follow(lambda: start_edit(config, target.out, overwrite=target.overwrite), config.max_steps,
                    announce=announce, signals=signals)
    print_summary(result, files=[("input", str(result.run_dir / "input.png")),
                                 ("mask", str(result.run_dir / "mask.png"))])
    console.print(f"  Render the subject anywhere: siso render --model {escape(config.model)} --lora "
                  f"{escape(str(result.run_dir / 'lora'))} --prompt \"a {escape(result.task.labels['subject'].text)} "
                  "...\"")
    exit_after_signal(result, signals)


def _describe_mask(mask) -> str:
    share = f"{float(mask.mask.mean()):.0%} of the image"
    if mask.source == "user":
        return f"from {mask.path}, {share}"
    return f"found by Grounding DINO + SAM (box score {mask.detection.score:.2f}), {share}"


edit = command(_edit, knob_parameters(EditConfig, only=INPUTS), knob_parameters(RunTarget),
               knob_parameters(EditConfig, exclude=INPUTS))
