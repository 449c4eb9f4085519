"""A diffusers SD 1.x pipeline folder as one ComfyUI checkpoint file (run by ``launch.py --script``).

    single_file.py DIFFUSERS_DIR OUT_FILE

ComfyUI's DiffusersLoader only takes UNets of the published sizes; its CheckpointLoaderSimple detects the
model from an original-layout file of any depth. The UNet's names come from ComfyUI's own map
(``comfy.utils.unet_to_diffusers`` for the UNet's layout), the VAE's from ``comfy.diffusers_convert``;
the CLIP text model keeps transformers' names under ``cond_stage_model.transformer.``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from comfy.cli_args import args

args.cpu = True
import comfy.diffusers_convert  # noqa: E402
import comfy.utils  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def comfy_unet_config(config: dict) -> dict:
    """ComfyUI's description of a diffusers SD 1.x UNet's layout (what unet_to_diffusers walks)."""
    levels = len(config["block_out_channels"])
    per_level = config["layers_per_block"]
    attention_down = [kind.startswith("CrossAttn") for kind in config["down_block_types"]]
    attention_up = [kind.startswith("CrossAttn") for kind in config["up_block_types"]]
    return {
        "num_res_blocks": [per_level] * levels,
        "channel_mult": [c // config["block_out_channels"][0] for c in config["block_out_channels"]],
        "transformer_depth": [int(a) for a in attention_down for _ in range(per_level)],
        # listed shallowest first (ComfyUI's output blocks), the reverse of diffusers' up_blocks
        "transformer_depth_output": [int(a) for a in reversed(attention_up) for _ in range(per_level + 1)],
        "transformer_depth_middle": 1,
    }


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    config = json.loads((source / "unet" / "config.json").read_text())
    mapping = comfy.utils.unet_to_diffusers(comfy_unet_config(config))
    unet = load_file(source / "unet" / "diffusion_pytorch_model.safetensors")
    missing = sorted(set(unet) - set(mapping))
    assert not missing, missing[:5]
    checkpoint = {f"model.diffusion_model.{mapping[key]}": value for key, value in unet.items()}
    vae = load_file(source / "vae" / "diffusion_pytorch_model.safetensors")
    vae = comfy.diffusers_convert.convert_vae_state_dict(vae)
    checkpoint.update({f"first_stage_model.{key}": value for key, value in vae.items()})
    text = load_file(source / "text_encoder" / "model.safetensors")
    checkpoint.update({f"cond_stage_model.transformer.{key}": value for key, value in text.items()})
    save_file({key: value.contiguous() for key, value in checkpoint.items()}, out)
    print(json.dumps({"keys": len(checkpoint), "file": str(out)}))


if __name__ == "__main__":
    main()
