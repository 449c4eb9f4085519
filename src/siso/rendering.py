"""The second stage: render any prompt with a learned LoRA, through the plain diffusers pipeline.

Using the unmodified pipeline here is deliberate: what siso renders is what any diffusers user
gets from ``pipe.load_lora_weights(run_dir / "lora")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open

from .backbones import Backbone
from .config import RenderConfig
from .devices import resolve_device, resolve_dtype
from .errors import SisoError
from .files import check_name_lengths, write_png
from .images import tensor_to_pil
from .lora import DIFFUSERS_WEIGHT_NAME
from .models import ModelCache
from .run_directory import check_writable


def check_lora_dir(lora: Path) -> None:
    """The LoRA exists and its file is a readable safetensors file: checked before any model loads,
    so a damaged file is reported as damaged, not as a LoRA that does not fit the model."""
    if not lora.exists():
        raise SisoError(f"--lora {lora} does not exist; pass the lora/ directory of a siso run.")
    if lora.is_dir() and not (lora / DIFFUSERS_WEIGHT_NAME).is_file():
        raise SisoError(
            f"--lora {lora} has no {DIFFUSERS_WEIGHT_NAME}; pass the lora/ directory of a siso run "
            "(or a diffusers LoRA directory)."
        )
    file = lora / DIFFUSERS_WEIGHT_NAME if lora.is_dir() else lora
    try:
        with safe_open(str(file), "pt") as reader:
            # LoRA files are small (megabytes): reading every tensor once is cheap next to loading the model
            broken = [key for key in reader.keys() if not torch.isfinite(reader.get_tensor(key)).all()]  # noqa: SIM118
    except Exception as err:  # SafetensorError, OSError: a truncated, empty or foreign file
        raise SisoError(
            f"{file} is not a readable safetensors file ({str(err)[:160] or err.__class__.__name__}); it may be "
            "truncated or corrupt. Use the LoRA of a finished siso run, or run the optimisation again."
        ) from err
    if broken:  # it would render a black image: refuse it instead of writing one
        raise SisoError(f"{file} holds weights that are not numbers (NaN or infinite) in {len(broken)} of its tensors "
                        f"(e.g. {broken[0]}); it cannot render anything. Use the LoRA of another run.")


def load_lora_file(backbone: Backbone, lora: Path) -> None:
    """Load a LoRA directory (or one .safetensors file) the plain diffusers way."""
    location, weight_name = (lora, None) if lora.is_dir() else (lora.parent, lora.name)
    try:
        backbone.pipeline.load_lora_weights(str(location), weight_name=weight_name)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        raise SisoError(
            f"The LoRA in {lora} does not fit {backbone.model_id} ({err.__class__.__name__}: {err}). "
            "Use the model the LoRA was learned on (see the run's run.json)."
        ) from err


@contextlib.contextmanager
def render_backbone(config: RenderConfig, cache: ModelCache | None = None) -> Iterator[Backbone]:
    """The backbone for ``config`` with its LoRA (if any) loaded the plain diffusers way, lent by
    ``cache`` for the block and reset afterwards (the LoRA removed), however the block ends."""
    if config.lora is not None:
        check_lora_dir(config.lora)
    device = resolve_device(config.device)
    with (cache or ModelCache()).lease(config.model, device, resolve_dtype(config.dtype, device)) as backbone:
        backbone.check_resolution(config.resolution)
        if config.lora is not None:
            load_lora_file(backbone, config.lora)
        yield backbone


def render_with(backbone: Backbone, config: RenderConfig,
                on_step: Callable[[int, int], None] | None = None) -> Image.Image:
    """``config``'s prompt through the plain pipeline of ``backbone`` (with whatever LoRA it carries).

    ``on_step(done, total)`` is called after each denoising step (the pipeline's own
    ``callback_on_step_end``): a progress bar, or a time limit that raises to stop the render.
    """
    steps = config.steps or backbone.preset.render_steps
    extra = dict(backbone.plain_pipeline_kwargs(steps))
    if config.prompt_tokens is not None:
        if backbone.preset.prompt_max_tokens is None:
            raise SisoError(f"--prompt-tokens applies to FLUX and Sana pipelines (T5 / Gemma prompts); "
                            f"{backbone.model_id}'s CLIP prompts are always 77 tokens. Drop --prompt-tokens.")
        extra["max_sequence_length"] = config.prompt_tokens
    if on_step is not None:
        def step_ended(pipeline: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            on_step(index + 1, getattr(pipeline, "num_timesteps", None) or steps)
            return tensors

        extra["callback_on_step_end"] = step_ended
    generator = torch.Generator(backbone.device).manual_seed(config.seed)
    with torch.no_grad():
        images = backbone.pipeline(  # the prompt by keyword: Flux2KleinPipeline.__call__ takes an image first
            prompt=config.prompt, num_inference_steps=steps, guidance_scale=backbone.preset.guidance_scale,
            generator=generator, height=config.resolution, width=config.resolution, output_type="pt", **extra,
        ).images
    return tensor_to_pil(images[0])


def render(model: str, prompt: str, lora: str | Path | None = None, out: str | Path | None = None, *,
           cache: ModelCache | None = None, on_step: Callable[[int, int], None] | None = None,
           **options: Any) -> Image.Image:
    """Render ``prompt`` with ``model`` plus an optional learned LoRA; write ``out`` if given.

    ``options`` are :class:`RenderConfig` fields (``steps``, ``seed``, ``resolution``, ...);
    ``on_step(done, total)`` follows the denoising steps.
    """
    config = RenderConfig(model=model, prompt=prompt, lora=lora, **options)
    if out is not None:
        if Path(out).suffix.lower() != ".png":
            raise SisoError(f"--out {out} must be a .png file path.")
        check_name_lengths(out, "--out")
        if Path(out).is_dir():
            raise SisoError(f"--out {out} is a directory; pass the path of the .png file to write.")
        check_writable(Path(out))  # before the model loads, not after the render
    with render_backbone(config, cache) as backbone:
        image = render_with(backbone, config, on_step)
    if out is not None:
        write_png(image, out)
    return image
