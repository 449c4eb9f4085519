"""`siso generate`: optimise a LoRA on the subject photo(s) and write the run directory. A thin layer
over :func:`siso.generation.start_generation`, its options derived from :class:`siso.config.GenerateConfig`;
heavy imports wait until the command runs."""

from __future__ import annotations

from typing import Any

from ..config import GenerateConfig
from .options import RunTarget, command, given, knob_parameters
from .output import (
    StopSignals,
    announce_device,
    exit_after_signal,
    follow,
    print_summary,
    quiet_libraries,
    similarity_hint,
)


def _generate(**knobs: Any) -> None:
    """Optimise a LoRA so the model's image of PROMPT shows the subject; write images, LoRA and run.json."""
    from ..generation import start_generation

    quiet_libraries()
    target = RunTarget(**given(RunTarget, knobs))
    config = GenerateConfig(**given(GenerateConfig, knobs))
    announce_device(config.device, config.dtype)
    similarity_hint(config)
    signals = StopSignals()
    result = follow(lambda: start_generation(config, target.out, overwrite=target.overwrite), config.max_steps,
                    signals=signals)
    print_summary(result)
    exit_after_signal(result, signals)


INPUTS = ("subjects", "prompt")
generate = command(_generate, knob_parameters(GenerateConfig, only=INPUTS), knob_parameters(RunTarget),
                   knob_parameters(GenerateConfig, exclude=INPUTS))
