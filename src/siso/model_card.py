"""The model card next to a run's LoRA files: ``lora/README.md`` in the Hub's convention for diffusers LoRAs.

YAML front matter (``huggingface_hub.ModelCardData``: ``base_model``, ``library_name``, the base model's
licence, ``tags``, ``instance_prompt`` and a ``widget`` showing the best image, copied beside it), then a
body that says how the LoRA was made and how to load it in diffusers, ComfyUI and AUTOMATIC1111. Written
with every new best iteration, from what run.json records, so ``lora/`` is a complete model repository:
``siso push`` uploads it as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData

from .files import atomic_path
from .model_ids import FAMILY_CHECKPOINTS
from .presets import PRESETS

CARD_NAME = "README.md"
IMAGE_NAME = "best.png"
PAPER = "https://arxiv.org/abs/2503.16025"


def is_hub_id(model: str) -> bool:
    """A Hub repository id (``owner/name``), not a local directory."""
    return not Path(model).exists() and model.count("/") == 1 and not model.startswith((".", "/", "~"))


def card_data(record: dict[str, Any]) -> ModelCardData:
    """The front matter for a run's record: the base model and its licence, the prompt, the widget."""
    config = record["config"]
    family = record["preset"]["family"]
    model = config["model"]
    reference = FAMILY_CHECKPOINTS.get(family)
    if reference is not None and reference.repo_id == model:
        licence = {"license": reference.license, "license_name": reference.license_name,
                   "license_link": reference.license_link}
    else:  # another checkpoint of the family: its own terms apply, which siso cannot read offline
        licence = {"license": "other", "license_name": "same-as-base-model",
                   "license_link": f"https://huggingface.co/{model}" if is_hub_id(model) else None}
    prompt = config["prompt"] if record["task"] == "generate" else record.get("prompts", {}).get("edit", "")
    return ModelCardData(
        base_model=model if is_hub_id(model) else None,
        library_name="diffusers",
        **{key: value for key, value in licence.items() if value is not None},
        instance_prompt=prompt,
        widget=[{"text": prompt, "output": {"url": IMAGE_NAME}}],
        tags=["text-to-image", "diffusers", "lora", "template:sd-lora", "siso", family],
    )


def card_text(record: dict[str, Any]) -> str:
    """The whole README.md for a run's record."""
    from .lora import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME  # torch and peft: not at import time

    data = card_data(record)
    config, preset = record["config"], record["preset"]
    family = PRESETS[preset["family"]]
    model = config["model"]
    files = [DIFFUSERS_WEIGHT_NAME] + ([KOHYA_WEIGHT_NAME] if "kohya" in (config.get("lora_format") or
                                                                       preset["lora_format"]) else [])
    comfy = {"kohya": KOHYA_WEIGHT_NAME, "diffusers": DIFFUSERS_WEIGHT_NAME}.get(family.comfyui_lora_format or "")
    if comfy not in files:
        comfy = None
    best = record.get("lora_step")
    losses = record.get("losses") or []
    loss = next((entry["total"] for entry in losses if entry.get("step") == best), None)
    prompt = data.instance_prompt
    steps = preset["render_steps"]
    lines = [
        f"# siso LoRA: {prompt}", "",
        f"![the best iteration]({IMAGE_NAME})", "",
        f"A rank-{config['lora_rank']} LoRA for {_link(model)} ({family.title}), optimised by siso's SISO "
        f"([Single Image Subject Optimization]({PAPER})) from one photo of a subject at inference time, with no "
        "training set: each iteration rendered the prompt, scored the image against the photo with pretrained "
        "similarity models and updated only the LoRA.", "",
        "## Use it", "",
        "diffusers:", "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline", "",
        f'pipe = DiffusionPipeline.from_pretrained("{model}", torch_dtype=torch.bfloat16).to("cuda")',
        'pipe.load_lora_weights("path/or/repo/of/this/lora")',
        f'image = pipe("{_python(prompt)}", num_inference_steps={steps}, '
        f'guidance_scale={preset["guidance_scale"]}).images[0]',
        "```", "",
    ]
    if comfy:
        lines += [f"ComfyUI: copy `{comfy}` into `ComfyUI/models/loras/` and load it with **LoraLoader** (or "
                  "**LoraLoaderModelOnly**) on the same base model.", ""]
    if KOHYA_WEIGHT_NAME in files:
        lines += [f"AUTOMATIC1111 / Forge: copy `{KOHYA_WEIGHT_NAME}` into `models/Lora/` and prompt with "
                  "`<lora:siso_lora_kohya:1>`.", ""]
    lines += [
        "Load it on the model it was learned on: the LoRA is tied to that checkpoint.", "",
        "## How it was made", "",
        "| | |", "|---|---|",
        f"| base model | {_link(model)} |",
        f"| task | {record['task']} |",
        f"| prompt | {prompt} |",
        f"| iterations | {len(losses)} (the best: {best}{f', loss {loss:.4f}' if loss is not None else ''}) |",
        f"| resolution, seed | {config['resolution']} px, {config['seed']} |",
        f"| learning rate, LoRA rank | {config['learning_rate']}, {config['lora_rank']} |",
        f"| similarity models | {', '.join(f'{k}: {v}' for k, v in record.get('similarity_models', {}).items())} |",
        f"| siso | {record.get('versions', {}).get('siso', '')} |",
        "",
        "Everything else the run did is in its `run.json`.",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"


def write_model_card(lora_dir: Path, record: dict[str, Any]) -> None:
    """``lora_dir``'s README.md, describing the LoRA and the image (``IMAGE_NAME``) beside it."""
    with atomic_path(lora_dir / CARD_NAME) as card:
        card.write_text(card_text(record), encoding="utf-8")


def _link(model: str) -> str:
    return f"[{model}](https://huggingface.co/{model})" if is_hub_id(model) else f"`{model}`"


def _python(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
