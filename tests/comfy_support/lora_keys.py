"""Which keys of a siso LoRA file ComfyUI's own loader applies (run by ``launch.py --script``).

    lora_keys.py CHECKPOINT LORA_FILE [CHECKPOINT LORA_FILE ...]

CHECKPOINT names a config in benchmarks/configs/ (the real architecture). Its denoiser is built by
diffusers on the meta device; ComfyUI detects its model class from that state dict (as it does a file it
loads), builds the model and the family's text encoders on the meta device, maps LoRA keys with
``comfy.lora.model_lora_keys_unet`` / ``model_lora_keys_clip`` and applies ``comfy.lora.load_lora``.
Prints one JSON line, a list with one entry per file: the model class ComfyUI chose, the file's layers,
those it patched (and how many of them in the text encoders), and the keys it reported as not loaded.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from comfy.cli_args import args  # noqa: E402

args.cpu = True  # before comfy.model_management looks for a GPU
import architectures  # noqa: E402
import comfy.lora  # noqa: E402
import comfy.model_detection  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def comfy_model(checkpoint: str):
    frozen_t5 = ("text_encoder_2",) if checkpoint == "flux-schnell" else ("text_encoder_3",)
    pipeline = architectures.build_pipeline(checkpoint, skip=frozen_t5)
    denoiser = getattr(pipeline, "unet", None) or pipeline.transformer
    state = denoiser.state_dict()
    if hasattr(pipeline, "unet"):
        config = comfy.model_detection.model_config_from_diffusers_unet(state)
    else:
        config = comfy.model_detection.model_config_from_unet(comfy.model_detection.convert_diffusers_mmdit(state, ""),
                                                              "")
    model = config.get_model({}, device="meta")
    # What a checkpoint with its CLIP text encoders holds (SD3 builds only the encoders its file has).
    prefix = config.text_encoder_key_prefix[0]
    present = {f"{prefix}{name}.transformer.text_model.final_layer_norm.weight": None for name in ("clip_l", "clip_g")}
    target = config.clip_target(present)
    with torch.device("meta"):
        clip = target.clip(**target.params)
    return config, model, clip


def model_key(patch_key) -> str:
    """A patch's target: a weight name, or (name, offset...) for a slice of a fused weight (FLUX's qkv)."""
    return patch_key[0] if isinstance(patch_key, tuple) else patch_key


def applied(checkpoint: str, lora_file: str, models: dict) -> dict:
    if checkpoint not in models:
        models[checkpoint] = comfy_model(checkpoint)
    config, model, clip = models[checkpoint]
    key_map = comfy.lora.model_lora_keys_clip(clip, comfy.lora.model_lora_keys_unet(model, {}))
    not_loaded: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("lora key not loaded"):
                not_loaded.append(message.split(":", 1)[1].strip())

    handler = Collect()
    logging.getLogger().addHandler(handler)
    try:
        lora = load_file(lora_file)
        patches = comfy.lora.load_lora(lora, key_map)
    finally:
        logging.getLogger().removeHandler(handler)
    layers = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in lora}
    text_encoder = [key for key in patches if not model_key(key).startswith("diffusion_model")]
    return {"checkpoint": checkpoint, "file": Path(lora_file).name, "model_class": type(config).__name__,
            "clip_class": type(clip).__name__, "file_keys": len(lora), "layers": len(layers),
            "patched": len(patches), "patched_text_encoder": len(text_encoder), "not_loaded": not_loaded}


def main() -> None:
    pairs = sys.argv[1:]
    models: dict = {}
    print(json.dumps([applied(pairs[i], pairs[i + 1], models) for i in range(0, len(pairs), 2)]))


if __name__ == "__main__":
    main()
