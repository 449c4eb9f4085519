"""LoRA on the frozen backbone: attach (fp32 on bf16 weights), snapshot, and write the files
plain diffusers, ComfyUI and A1111 load."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.training_utils import cast_training_params
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save, save_file

from .errors import SisoError
from .files import FILE_MODE
from .lora_layouts import canonical_layers, kohya_layers, kohya_metadata, kohya_prefixes

ADAPTER_NAME = "siso"
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "siso_lora_kohya.safetensors"

if TYPE_CHECKING:
    from .backbones import Backbone

# component name -> {peft key: tensor}
LoraState = dict[str, dict[str, torch.Tensor]]


@dataclass
class LoraAdapter:
    """A run's own LoRA, kept apart from the backbone it sits on: the peft config and the trained
    parameters of each component. A backbone shared by several runs (the web app's tabs, a benchmark
    worker) may take it off between two of the run's iterations (:meth:`Backbone.reset`);
    :func:`reattach_lora` puts back the very same parameter objects, so the optimiser's state stays valid."""

    configs: dict[str, LoraConfig]
    #: component -> module path -> ("A" or "B") -> the parameter
    parameters: dict[str, dict[str, dict[str, torch.nn.Parameter]]] = field(default_factory=dict)


def attach_lora(backbone: Backbone, rank: int, train_text_encoder: bool, seed: int) -> LoraAdapter:
    """Add a rank-``rank`` LoRA (alpha = rank, so scale 1), its parameters in fp32, and return it.

    Gaussian init: A random, B zero, so the first render equals the untouched model's. The init is
    drawn from ``seed`` without disturbing the global RNG, so a run is repeatable. The target modules
    are the family's (``preset.lora_targets``, ``preset.text_encoder_lora_targets``): diffusers'
    layout for that family, so its pipeline's ``load_lora_weights`` takes our file.
    """
    type(backbone).check_options(backbone.model_id, train_text_encoder)
    targets = {backbone.denoiser_name: backbone.lora_target_modules()}
    if train_text_encoder:
        targets.update({name: backbone.preset.text_encoder_lora_targets for name in backbone.text_encoder_names})
    adapter = LoraAdapter({name: LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                            target_modules=list(modules)) for name, modules in targets.items()})
    check_rank(backbone, adapter, rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, config in adapter.configs.items():
            model = getattr(backbone.pipeline, name)
            # peft directly, not the libraries' add_adapter wrappers: transformers' one demands a
            # newer peft than diffusers', and the LoRA layers are the same either way.
            inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
            # Frozen weights may be bf16; the LoRA itself trains in fp32 (peft casts inputs to it).
            cast_training_params(model, torch.float32)
            adapter.parameters[name] = _adapter_parameters(model)
    return adapter


def check_rank(backbone: Backbone, adapter: LoraAdapter, rank: int) -> None:
    """Refuse, before any LoRA memory is allocated, a rank no target layer can use: a rank-r update of an
    (out x in) weight has rank at most min(in, out), so beyond the largest such bound the LoRA only
    grows (rank 100000 would be gigabytes on a tiny model)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    useful = 0
    for name, config in adapter.configs.items():
        for path, module in getattr(backbone.pipeline, name).named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.ndim >= 2 and check_target_module_exists(config, path):
                useful = max(useful, min(weight.shape[0], math.prod(weight.shape[1:])))
    if useful and rank > useful:
        raise SisoError(f"--lora-rank {rank} is more than any LoRA layer of {backbone.model_id} can use: its largest "
                        f"target layers have rank {useful} at most. Pass --lora-rank {useful} or less (the paper "
                        "uses 4).")


def reattach_lora(backbone: Backbone, adapter: LoraAdapter) -> None:
    """Put ``adapter`` back on a backbone it was taken off: fresh LoRA layers, the adapter's own parameters."""
    for name, config in adapter.configs.items():
        model = getattr(backbone.pipeline, name)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
        layers = {path: module for path, module in model.named_modules()
                  if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.lora_A}
        for path, pair in adapter.parameters[name].items():
            layers[path].lora_A[ADAPTER_NAME].weight = pair["A"]
            layers[path].lora_B[ADAPTER_NAME].weight = pair["B"]


def _adapter_parameters(model: torch.nn.Module) -> dict[str, dict[str, torch.nn.Parameter]]:
    return {path: {"A": module.lora_A[ADAPTER_NAME].weight, "B": module.lora_B[ADAPTER_NAME].weight}
            for path, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.lora_A}


def lora_parameter_groups(adapter: LoraAdapter, denoiser_name: str, text_encoder_lr: float | None = None,
                          text_encoder_weight_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups of ``adapter``: the denoiser's, then one for the text encoders' with
    their own learning rate and weight decay where given (the FLUX reference trains its CLIP LoRA at
    5e-6 with weight decay 1e-3), else the optimiser's defaults."""
    groups = []
    for name, modules in adapter.parameters.items():
        group: dict = {"params": [p for pair in modules.values() for p in pair.values()]}
        if name != denoiser_name:
            if text_encoder_lr is not None:
                group["lr"] = text_encoder_lr
            if text_encoder_weight_decay is not None:
                group["weight_decay"] = text_encoder_weight_decay
        groups.append(group)
    return groups


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
              formats: tuple[str, ...] | None = None, resolution: int | None = None,
              title: str = "siso LoRA") -> Path:
    """Write ``state`` into ``directory``: diffusers' layout always, kohya's too when ``formats`` says so.

    ``formats`` None means the backbone's defaults (kohya as well for SD and SDXL); ``resolution``
    (the run's image side) and ``title`` go into the kohya file's ModelSpec metadata. Both files name text-encoder
    layers in the transformers-4 layout (``lora_layouts``), whichever transformers is installed.
    Files are written into a temporary sibling directory and moved into place, so an interrupted
    save never leaves a half-written LoRA.
    """
    formats = backbone.preset.lora_format if formats is None else formats
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    canonical = {name: canonical_layers(getattr(backbone.pipeline, name), layers) for name, layers in state.items()}
    staging = Path(tempfile.mkdtemp(prefix=".lora-", dir=directory.parent))
    try:
        backbone.save_lora_weights(str(staging), canonical)
        if "kohya" in formats:
            tensors, metadata = kohya_file(backbone, canonical, resolution, title)
            save_kohya_file(tensors, metadata, staging / KOHYA_WEIGHT_NAME)
        for file in staging.iterdir():
            os.chmod(file, FILE_MODE)  # safetensors writes 0600, as mkstemp would
            file.replace(directory / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def save_kohya_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    """Write the kohya file with ModelSpec's ``hash_sha256``: the SHA-256 of the tensor content, the file
    without its header (which the data section does not depend on), ``0x``-prefixed."""
    serialized = save(tensors, metadata=metadata)
    header = int.from_bytes(serialized[:8], "little")
    digest = hashlib.sha256(serialized[8 + header:]).hexdigest()
    save_file(tensors, path, metadata={**metadata, "modelspec.hash_sha256": f"0x{digest}"})


def kohya_file(backbone: Backbone, canonical: LoraState, resolution: int | None = None,
               title: str = "siso LoRA") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The kohya file's tensors and metadata for canonical-layout ``state`` (see ``lora_layouts``).

    Each component's alpha and rank come from its live adapter config, so the file scales each layer
    by exactly what siso's adapter did.
    """
    base = backbone.base_model()
    if base is None:
        raise ValueError(f"{type(backbone).__name__} writes no kohya file (lora_formats "
                         f"{backbone.preset.lora_formats})")
    prefixes = kohya_prefixes(backbone.denoiser_name, backbone.text_encoder_names)
    configs = {name: adapter_config(backbone, name) for name in canonical}
    tensors: dict[str, torch.Tensor] = {}
    for name, layers in canonical.items():
        tensors.update(kohya_layers(layers, prefixes[name], configs[name].lora_alpha))
    denoiser = configs[backbone.denoiser_name]
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return tensors, kohya_metadata(base, denoiser.r, denoiser.lora_alpha, resolution, title, date)


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
