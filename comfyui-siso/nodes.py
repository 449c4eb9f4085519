"""SISO's ComfyUI nodes: thin classic (V1) nodes over siso's library, its loop and its run directory.

The node inputs that are siso knobs are derived from the knobs' declarations (``siso.config``): their
type, default and help (shown as the tooltip); a knob the backbone's preset fills takes 0 for "the
backbone's", as in the web app. A run writes a normal siso run directory under ComfyUI's output folder
(``siso/<lora name>-<time>``) and copies the LoRA file ComfyUI loads into its ``loras`` folder, so a
LoraLoader downstream in the same workflow can use it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from siso.config import EditConfig, GenerateConfig
from siso.errors import SisoError
from siso.files import FILE_MODE
from siso.knobs import knobs
from siso.lora import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from siso.model_ids import EDITING_MODEL, FAMILY_CHECKPOINTS, GENERATION_MODEL
from siso.models import ModelCache

LOG = logging.getLogger("siso.comfyui")
CATEGORY = "SISO"
PREVIEW_SIZE = 512
PERSONALIZE_KNOBS = ("seed", "max_steps", "early_stop_patience", "learning_rate", "resolution")
EDIT_KNOBS = ("seed", "max_steps", "learning_rate", "resolution", "bg_weight", "strength")
SIMILARITY_KNOBS = ("dino_model", "ir_model")
LORA_FILES = {"kohya": KOHYA_WEIGHT_NAME, "diffusers": DIFFUSERS_WEIGHT_NAME}


class AnyType(str):
    """A ComfyUI type equal to every other: the LoRA name output can feed LoraLoader's file-name input, whose
    type is the list of files in models/loras (the new LoRA is not among them until the run writes it)."""

    def __ne__(self, other: object) -> bool:
        return False


LORA_NAME = AnyType("*")
#: siso's models stay loaded between runs only when a node asks (keep_models_loaded)
CACHE = ModelCache()


# -- inputs ------------------------------------------------------------------------------------------------


def knob_inputs(owner: type, names: Sequence[str]) -> dict[str, tuple]:
    """ComfyUI input declarations for ``owner``'s knobs ``names``."""
    inputs = {}
    for name in names:
        spec = knobs(owner)[name]
        from_preset = spec.preset is not None and spec.default is None
        tooltip = spec.help + (" 0: the backbone's." if from_preset else "")
        kind = spec.value_type
        if kind is bool:
            inputs[name] = ("BOOLEAN", {"default": bool(spec.default), "tooltip": tooltip})
        elif kind is int:
            options = {"default": 0 if from_preset else spec.default, "min": 0, "max": 100_000, "tooltip": tooltip}
            if name == "seed":
                options.update(max=0xFFFFFFFFFFFFFFFF, control_after_generate=True)
            inputs[name] = ("INT", options)
        elif kind is float:
            inputs[name] = ("FLOAT", {"default": 0.0 if from_preset else spec.default, "min": 0.0, "max": 1e4,
                                      "step": 1e-5, "round": False, "tooltip": tooltip})
        else:
            inputs[name] = ("STRING", {"default": "" if spec.default is None else str(spec.default),
                                       "tooltip": tooltip})
    return inputs


def knob_values(owner: type, values: dict[str, Any]) -> dict[str, Any]:
    """The config's keyword arguments from the node's knob inputs: 0 in a preset knob and empty text are
    left to the config (so its declared default, or the backbone's, is what runs)."""
    options = {}
    for name, value in values.items():
        spec = knobs(owner)[name]
        if value in (None, "") or (spec.preset is not None and value == 0):
            continue
        options[name] = None if (name == "ir_model" and value == "none") else value
    return options


def model_choices(default: str) -> list[str]:
    """The diffusers folders in ComfyUI's models/diffusers (by name), then the families' Hub checkpoints."""
    import folder_paths

    folders = sorted({path.name for root in folder_paths.get_folder_paths("diffusers") if Path(root).is_dir()
                      for path in Path(root).iterdir() if (path / "model_index.json").is_file()})
    hub = [default, *(c.repo_id for c in FAMILY_CHECKPOINTS.values() if c.repo_id != default)]
    return folders + hub


def resolve_model(choice: str) -> str:
    import folder_paths

    for root in folder_paths.get_folder_paths("diffusers"):
        if (Path(root) / choice / "model_index.json").is_file():
            return str(Path(root) / choice)
    return choice  # a Hub id


# -- images ------------------------------------------------------------------------------------------------


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """ComfyUI IMAGE (B, H, W, C) floats in [0, 1] -> PIL images."""
    array = (images.detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(frame[..., :3]) for frame in array]


def to_image(pictures: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (one size) -> ComfyUI IMAGE."""
    return torch.from_numpy(np.stack([np.asarray(p.convert("RGB"), dtype=np.float32) / 255 for p in pictures]))


def save_inputs(pictures: Sequence[Image.Image], directory: Path, stem: str) -> tuple[Path, ...]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, picture in enumerate(pictures):
        paths.append(directory / f"{stem}-{index}.png")
        picture.save(paths[-1])
    return tuple(paths)


# -- running -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def optimising() -> Iterator[None]:
    """ComfyUI runs nodes under inference mode; SISO needs autograd. Its own models leave the GPU first."""
    import comfy.model_management as management

    management.unload_all_models()
    management.soft_empty_cache()
    with torch.inference_mode(False), torch.enable_grad():
        yield


def comfy_device() -> str:
    import comfy.model_management as management

    return management.get_torch_device().type


def run_dir(lora_name: str) -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / "siso" / f"{lora_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def follow(run, total: int) -> bool:
    """Iterate ``run``, each iteration's image as the progress bar's preview. ComfyUI's Cancel raises out
    of the progress update: the loop stops after that iteration, the best so far is kept. Returns
    whether it was cancelled."""
    import comfy.model_management as management
    import comfy.utils

    from siso.images import tensor_to_pil

    bar = comfy.utils.ProgressBar(total)
    steps = run.steps()
    try:
        for event in steps:
            bar.update_absolute(event.step + 1, total, ("JPEG", tensor_to_pil(event.image), PREVIEW_SIZE))
    except management.InterruptProcessingException:
        return True
    finally:
        steps.close()
    return False


def run_through(run, max_steps: int):
    """Follow ``run`` to its end (or ComfyUI's Cancel), finish it and hand its models back:
    (cancelled, result)."""
    try:
        cancelled = follow(run, max_steps)
        return cancelled, run.finish()
    finally:
        run.close()


def install_lora(result, lora_name: str) -> str:
    """Copy the run's LoRA file that ComfyUI loads into ComfyUI's loras folder, atomically; its name there,
    or "" where siso writes no file ComfyUI loads for the family."""
    import folder_paths

    from siso.presets import PRESETS

    backbone_preset = PRESETS[result.record["preset"]["family"]]
    layout = backbone_preset.comfyui_lora_format
    if result.lora_dir is None or layout is None or not (result.lora_dir / LORA_FILES[layout]).is_file():
        LOG.warning("siso: no LoRA file ComfyUI loads for %s; the diffusers LoRA is in %s", backbone_preset.title,
                    result.run_dir / "lora")
        return ""
    folder = Path(folder_paths.get_folder_paths("loras")[0])
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{lora_name}.safetensors"
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".part", delete=False) as tmp:
        shutil.copyfile(result.lora_dir / LORA_FILES[layout], tmp.name)
    os.chmod(tmp.name, FILE_MODE)  # as siso's own files, not mkstemp's 0600
    Path(tmp.name).replace(folder / name)
    return name


def release(keep: bool) -> None:
    if not keep:
        CACHE.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def inputs_named(names: dict[Path, str]) -> Iterator[None]:
    """siso's messages name files; the node's inputs are images, saved to temporary files for siso: say
    which input a message is about instead of the temporary path."""
    try:
        yield
    except SisoError as err:
        message = str(err)
        for path, name in names.items():
            message = message.replace(str(path), name)
        raise SisoError(message) from err


def check_lora_name(lora_name: str) -> str:
    name = lora_name.strip()
    if not name or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
        raise SisoError(f"lora_name {lora_name!r} is not a file name: use letters, digits, '-' or '_', e.g. my-dog.")
    return name


class SISOPersonalize:
    """From photos of a subject and a prompt: the model's image of the subject, and a LoRA for the model."""

    CATEGORY = CATEGORY
    FUNCTION = "personalize"
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", LORA_NAME)
    RETURN_NAMES = ("best", "iterations", "loss_curve", "lora_name")
    OUTPUT_TOOLTIPS = ("The best iteration's image.", "Every iteration's image.", "The losses per iteration.",
                       "The LoRA's file name in ComfyUI's loras folder, for a LoraLoader.")
    DESCRIPTION = ("SISO (Single Image Subject Optimization): optimises a LoRA at inference time until the model's "
                   "image of the prompt shows the subject of the photo(s).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's name
        return {
            "required": {
                "subject": ("IMAGE", {"tooltip": "The subject: one photo, or a batch of several."}),
                "prompt": ("STRING", {"multiline": True, "default": "a photo of a dog",
                                      "tooltip": knobs(GenerateConfig)["prompt"].help}),
                "model": (model_choices(GENERATION_MODEL), {"tooltip": knobs(GenerateConfig)["model"].help}),
                **knob_inputs(GenerateConfig, PERSONALIZE_KNOBS),
                "lora_name": ("STRING", {"default": "siso-subject",
                                         "tooltip": "File name (without .safetensors) of the LoRA in models/loras."}),
            },
            "optional": {
                **knob_inputs(GenerateConfig, SIMILARITY_KNOBS),
                "keep_models_loaded": ("BOOLEAN", {"default": False,
                                                   "tooltip": "Keep siso's models in memory for the next run."}),
            },
        }

    def personalize(self, subject: torch.Tensor, prompt: str, model: str, lora_name: str,
                    keep_models_loaded: bool = False, **values: Any) -> tuple:
        from siso.generation import start_generation

        name = check_lora_name(lora_name)
        out = run_dir(name)
        with optimising():
            photos = save_inputs(to_pil(subject), out.parent / f".inputs-{out.name}", "subject")
            names = {path: f"(subject image {index + 1} of {len(photos)})" for index, path in enumerate(photos)}
            try:
                with inputs_named(names):
                    config = GenerateConfig(subjects=photos, prompt=prompt, model=resolve_model(model),
                                            device=comfy_device(), **knob_values(GenerateConfig, values))
                    cancelled, result = run_through(start_generation(config, out, cache=CACHE), config.max_steps)
            finally:
                shutil.rmtree(out.parent / f".inputs-{out.name}", ignore_errors=True)
            installed = install_lora(result, name)
            release(keep_models_loaded)
        if cancelled:
            import comfy.model_management as management

            raise management.InterruptProcessingException()  # ComfyUI stops the workflow; the best is kept
        iterations = [Image.open(p) for p in sorted((out / "steps").glob("*.png"))]
        return (to_image([result.image]), to_image(iterations), to_image([Image.open(out / "losses.png")]), installed)


class SISOEdit:
    """Swap the object of a scene photo for the subject of another photo, keeping the rest of the scene."""

    CATEGORY = CATEGORY
    FUNCTION = "edit"
    RETURN_TYPES = ("IMAGE", "MASK", LORA_NAME)
    RETURN_NAMES = ("edited", "mask", "lora_name")
    OUTPUT_TOOLTIPS = ("The scene with the subject in place of the object.", "The object's mask that was used.",
                       "The LoRA's file name in ComfyUI's loras folder.")
    DESCRIPTION = "SISO editing: the scene's object becomes the subject; the background is kept by a loss on it."

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 - ComfyUI's name
        spec = knobs(EditConfig)
        return {
            "required": {
                "subject": ("IMAGE", {"tooltip": spec["subject"].help}),
                "scene": ("IMAGE", {"tooltip": spec["input"].help}),
                "subject_class": ("STRING", {"default": "", "tooltip": spec["subject_class"].help}),
                "input_class": ("STRING", {"default": "", "tooltip": spec["input_class"].help}),
                "model": (model_choices(EDITING_MODEL), {"tooltip": spec["model"].help}),
                **knob_inputs(EditConfig, EDIT_KNOBS),
                "lora_name": ("STRING", {"default": "siso-edit",
                                         "tooltip": "File name (without .safetensors) of the LoRA in models/loras."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": spec["mask"].help}),
                **knob_inputs(EditConfig, SIMILARITY_KNOBS),
                "keep_models_loaded": ("BOOLEAN", {"default": False,
                                                   "tooltip": "Keep siso's models in memory for the next run."}),
            },
        }

    def edit(self, subject: torch.Tensor, scene: torch.Tensor, subject_class: str, input_class: str, model: str,
             lora_name: str, mask: torch.Tensor | None = None, keep_models_loaded: bool = False,
             **values: Any) -> tuple:
        from siso.editing.task import start_edit

        name = check_lora_name(lora_name)
        out = run_dir(name)
        inputs = out.parent / f".inputs-{out.name}"
        with optimising():
            try:
                [subject_path] = save_inputs(to_pil(subject[:1]), inputs, "subject")
                [scene_path] = save_inputs(to_pil(scene[:1]), inputs, "scene")
                mask_path = None
                if mask is not None:
                    mask_path = inputs / "mask.png"
                    picture = (mask[0].detach().float().cpu().clamp(0, 1).numpy() * 255).round().astype(np.uint8)
                    Image.fromarray(picture, mode="L").save(mask_path)
                names = {subject_path: "(subject input)", scene_path: "(scene input)",
                         inputs / "mask.png": "(mask input)"}
                with inputs_named(names):
                    config = EditConfig(subject=subject_path, input=scene_path, mask=mask_path,
                                        subject_class=subject_class or None, input_class=input_class or None,
                                        model=resolve_model(model), device=comfy_device(),
                                        **knob_values(EditConfig, values))
                    cancelled, result = run_through(start_edit(config, out, cache=CACHE), config.max_steps)
            finally:
                shutil.rmtree(inputs, ignore_errors=True)
            installed = install_lora(result, name)
            release(keep_models_loaded)
        if cancelled:
            import comfy.model_management as management

            raise management.InterruptProcessingException()
        used = result.task.mask.mask[0].detach().float().cpu()
        return (to_image([result.image]), used, installed)


NODE_CLASS_MAPPINGS = {"SISOPersonalize": SISOPersonalize, "SISOEdit": SISOEdit}
NODE_DISPLAY_NAME_MAPPINGS = {"SISOPersonalize": "SISO Personalize", "SISOEdit": "SISO Edit"}
