"""LoRA on the frozen backbone: attach (fp32 on bf16 weights), snapshot, and write the files
plain diffusers, ComfyUI and A1111 load."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from .backbones import Backbone
from .files import FILE_MODE
from .lora_layouts import canonical_layers, kohya_layers, kohya_metadata, kohya_prefixes

ADAPTER_NAME = "siso"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "siso_lora_kohya.safetensors"

# component name -> {peft key: tensor}
LoraState = dict[str, dict[str, torch.Tensor]]


def attach_lora(backbone: Backbone, rank: int, train_text_encoder: bool, seed: int) -> list[torch.nn.Parameter]:
    """Add a rank-``rank`` LoRA (alpha = rank, so scale 1) and return its parameters, in fp32.

    Gaussian init: A random, B zero, so the first render equals the untouched model's. The init is
    drawn from ``seed`` without disturbing the global RNG, so a run is repeatable. The target modules
    are the backbone class's (``lora_targets``, ``text_encoder_lora_targets``): diffusers' layout for
    that family, so its pipeline's ``load_lora_weights`` takes our file.
    """
    type(backbone).check_options(backbone.model_id, train_text_encoder)
    detach_lora(backbone)  # a reused (cached) backbone may carry the previous run's adapter
    backbone.restore_text_encoders()  # ... and have parked its text encoders on the CPU
    targets = {backbone.denoiser_name: backbone.lora_targets}
    if train_text_encoder:
        targets.update({name: backbone.text_encoder_lora_targets for name in backbone.text_encoder_names})
    params: list[torch.nn.Parameter] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, modules in targets.items():
            model = getattr(backbone.pipeline, name)
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(modules))
            # peft directly, not the libraries' add_adapter wrappers: transformers' one demands a
            # newer peft than diffusers', and the LoRA layers are the same either way.
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
            # Frozen weights may be bf16; the LoRA itself trains in fp32 (peft casts inputs to it).
            cast_training_params(model, torch.float32)
            params.extend(p for p in model.parameters() if p.requires_grad)
    return params


def lora_parameter_groups(backbone: Backbone, text_encoder_lr: float | None = None,
                          text_encoder_weight_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups of the attached LoRA: the denoiser's, then one for the text encoders'
    with their own learning rate and weight decay where given (the FLUX reference trains its CLIP
    LoRA at 5e-6 with weight decay 1e-3), else the optimiser's defaults."""
    groups = []
    for name in lora_components(backbone):
        params = [p for p in getattr(backbone.pipeline, name).parameters() if p.requires_grad]
        group: dict = {"params": params}
        if name != backbone.denoiser_name:
            if text_encoder_lr is not None:
                group["lr"] = text_encoder_lr
            if text_encoder_weight_decay is not None:
                group["weight_decay"] = text_encoder_weight_decay
        groups.append(group)
    return groups


def detach_lora(backbone: Backbone) -> None:
    """Remove our adapter everywhere; the model then computes exactly what it did before."""
    for name in [backbone.denoiser_name, *backbone.text_encoder_names]:
        model = getattr(backbone.pipeline, name, None)
        configs = getattr(model, "peft_config", None)
        if not configs or ADAPTER_NAME not in configs:
            continue
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.lora_A:
                module.delete_adapter(ADAPTER_NAME)
        del configs[ADAPTER_NAME]
        if not configs:
            del model.peft_config


def lora_components(backbone: Backbone) -> list[str]:
    """The components that currently carry our adapter."""
    names = [backbone.denoiser_name, *backbone.text_encoder_names]
    return [n for n in names if ADAPTER_NAME in (getattr(getattr(backbone.pipeline, n), "peft_config", None) or {})]


def snapshot_lora(backbone: Backbone) -> LoraState:
    """A CPU copy of the adapter weights (peft key layout), cheap at rank 4."""
    return {
        name: {
            key: value.detach().to("cpu", copy=True)
            for key, value in get_peft_model_state_dict(
                getattr(backbone.pipeline, name), adapter_name=ADAPTER_NAME
            ).items()
        }
        for name in lora_components(backbone)
    }


def save_lora(backbone: Backbone, state: LoraState, directory: str | Path,
              formats: tuple[str, ...] | None = None, resolution: int | None = None) -> Path:
    """Write ``state`` into ``directory``: diffusers' layout always, kohya's too when ``formats`` says so.

    ``formats`` None means the backbone's defaults (kohya as well for SD and SDXL); ``resolution``
    (the run's image side) goes into the kohya file's metadata. Both files name text-encoder
    layers in the transformers-4 layout (``lora_layouts``), whichever transformers is installed.
    Files are written into a temporary sibling directory and moved into place, so an interrupted
    save never leaves a half-written LoRA.
    """
    formats = backbone.default_lora_formats if formats is None else formats
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    canonical = {name: canonical_layers(getattr(backbone.pipeline, name), layers) for name, layers in state.items()}
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=directory.parent))
    try:
        diffusers_layers = {name: convert_state_dict_to_diffusers(layers) for name, layers in canonical.items()}
        backbone.save_lora_weights(str(staging), diffusers_layers)
        if "kohya" in formats:
            tensors, metadata = kohya_file(backbone, canonical, resolution)
            save_file(tensors, staging / KOHYA_WEIGHT_NAME, metadata=metadata)
        for file in staging.iterdir():
            os.chmod(file, FILE_MODE)  # safetensors writes 0600, as mkstemp would
            file.replace(directory / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def kohya_file(backbone: Backbone, canonical: LoraState,
               resolution: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya file's tensors and metadata for canonical-layout ``state`` (see ``lora_layouts``).

    Each component's alpha and rank come from its live adapter config, so the file scales each layer
    by exactly what siso's adapter did.
    """
    base = backbone.base_model()
    if base is None:
        raise ValueError(f"{type(backbone).__name__} writes no kohya file (lora_formats {backbone.lora_formats})")
    prefixes = kohya_prefixes(backbone.denoiser_name, backbone.text_encoder_names)
    configs = {name: adapter_config(backbone, name) for name in canonical}
    tensors: dict[str, torch.Tensor] = {}
    for name, layers in canonical.items():
        tensors.update(kohya_layers(layers, prefixes[name], configs[name].lora_alpha))
    denoiser = configs[backbone.denoiser_name]
    return tensors, kohya_metadata(base, denoiser.r, denoiser.lora_alpha, resolution)


def adapter_config(backbone: Backbone, name: str) -> LoraConfig:
    """The peft config of our adapter on component ``name``."""
    configs = getattr(getattr(backbone.pipeline, name), "peft_config", None) or {}
    if ADAPTER_NAME not in configs:
        raise ValueError(f"{name} carries no {ADAPTER_NAME!r} adapter: attach_lora first")
    config = configs[ADAPTER_NAME]
    if config.use_rslora or config.rank_pattern or config.alpha_pattern:
        # A kohya file has one alpha per layer, scaled by alpha / rank: no per-module patterns, no rsLoRA.
        raise ValueError(f"{name}'s adapter scales its layers in a way a kohya alpha cannot express")
    return config


def load_lora_state(backbone: Backbone, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Put a snapshot back into the live adapter (used to render the best LoRA again)."""
    from peft.utils import set_peft_model_state_dict

    for name, layers in state.items():
        model = getattr(backbone.pipeline, name)
        device = next(model.parameters()).device
        set_peft_model_state_dict(model, {k: v.to(device) for k, v in layers.items()}, adapter_name=ADAPTER_NAME)
