"""The key names and metadata of siso's two LoRA files, so diffusers, ComfyUI and A1111/Forge load them.

What the loaders expect (restated from their sources; tests/test_lora_files.py checks every key of
the real SD-Turbo, SDXL-Turbo and FLUX.1-schnell key sets against these rules):

* Text encoders use the transformers-4 layout, ``text_model.encoder.layers.N...``. transformers 5's
  ``CLIPTextModel`` dropped the ``text_model`` level (``CLIPTextModelWithProjection`` kept it), but
  ComfyUI, A1111 and diffusers with transformers 4 only know the old names (a transformers-4 model has
  the level, so the keys match as written). Verified in the installed diffusers 0.42.1 with
  transformers 5: ``loaders/lora_base.py::_load_lora_into_text_encoder`` removes a leading
  ``text_model.`` from the keys when the live text encoder has no ``text_model`` attribute, for
  diffusers files and, after ``_convert_text_encoder_lora_key`` turned ``lora_te_text_model_...``
  into ``text_model.encoder...``, for kohya files too (tests/test_generation.py renders both).
* kohya file: one ``NAME.lora_down.weight`` / ``NAME.lora_up.weight`` / ``NAME.alpha`` triple per
  layer, NAME being a prefix and the module path with dots turned into underscores. The prefix is
  ``lora_unet`` for the UNet, ``lora_te`` for the only text encoder of SD 1/2 and ``lora_te1`` /
  ``lora_te2`` for SDXL's two (kohya sd-scripts ``networks/lora.py``, ``LoRANetwork``). The layer's
  scale is ``alpha / rank``.
* kohya metadata: ``ss_base_model_version`` and ``ss_v2`` name the base model; A1111 reads them to
  tell SD1, SD2 and SDXL LoRAs apart, and hides a LoRA from its Lora tab when they do not match the
  loaded checkpoint (``network.py``, ``NetworkOnDisk.detect_version``). ``modelspec.*`` keys follow
  Stability's ModelSpec as sd-scripts writes them (``library/sai_model_spec.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

TEXT_MODEL_LEVEL = "text_model."
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<role>[AB])\.weight$")


@dataclass(frozen=True)
class BaseModel:
    """The model family a LoRA was learned on, in the words of kohya's and ModelSpec's metadata."""

    version: str  # ss_base_model_version (sd-scripts: model_util / sdxl_model_util)
    v2: bool  # ss_v2
    architecture: str  # modelspec.architecture, before the "/lora" adapter suffix
    prediction_type: str  # modelspec.prediction_type: "epsilon" or "v"


SD1 = BaseModel("sd_v1", False, "stable-diffusion-v1", "epsilon")
SD2_512 = BaseModel("sd_v2", True, "stable-diffusion-v2-512", "epsilon")
SD2_768_V = BaseModel("sd_v2_v", True, "stable-diffusion-v2-768-v", "v")
SDXL_BASE = BaseModel("sdxl_base_v1-0", False, "stable-diffusion-xl-v1-base", "epsilon")


def lacks_text_model_level(model: torch.nn.Module) -> bool:
    """A transformers-5 ``CLIPTextModel``: a CLIP text encoder whose modules start at ``encoder.``."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "clip_text_model" and not hasattr(model, "text_model")


def canonical_layers(model: torch.nn.Module, layers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's peft keys in the transformers-4 layout every loader knows (see the module doc)."""
    if lacks_text_model_level(model):
        return {TEXT_MODEL_LEVEL + key: value for key, value in layers.items()}
    return dict(layers)


def kohya_prefixes(denoiser_name: str, text_encoder_names: Sequence[str]) -> dict[str, str]:
    """Component name -> kohya key prefix: numbered text encoders only where there are several."""
    prefixes = {denoiser_name: "lora_unet"}
    if len(text_encoder_names) == 1:
        prefixes[text_encoder_names[0]] = "lora_te"
    else:
        prefixes.update({name: f"lora_te{index}" for index, name in enumerate(text_encoder_names, start=1)})
    return prefixes


def kohya_layers(layers: Mapping[str, torch.Tensor], prefix: str, alpha: float) -> dict[str, torch.Tensor]:
    """One component's canonical peft keys (``path.lora_A.weight``, ``path.lora_B.weight``) -> kohya keys.

    ``alpha`` is the component's ``lora_alpha``: kohya loaders scale by ``alpha / rank`` as peft does
    by ``lora_alpha / r``, with the rank read off the tensors.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in layers.items():
        match = _PEFT_KEY.match(key)
        if match is None:  # siso's adapters are plain LoRA; anything else has no kohya spelling here
            raise ValueError(f"not a LoRA A/B weight, so it has no kohya name: {key}")
        name = f"{prefix}_{match['module'].replace('.', '_')}"
        out[f"{name}.lora_down.weight" if match["role"] == "A" else f"{name}.lora_up.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def kohya_metadata(base: BaseModel, rank: int, alpha: float, resolution: int | None,
                   title: str = "siso LoRA", date: str | None = None) -> dict[str, str]:
    """The safetensors metadata of the kohya file: sd-scripts' minimum network keys and ModelSpec's
    (``modelspec.hash_sha256`` is added by :func:`siso.lora.save_kohya_file`, once the tensors are known)."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": base.version,
        "ss_v2": str(base.v2),  # Python's spelling, "True"/"False": what A1111 compares with
        "modelspec.sai_model_spec": "1.0.0",
        # sd-scripts' adapter spelling ("<base>/lora"); the spec's own list shows "<base>-lora".
        "modelspec.architecture": f"{base.architecture}/lora",
        # Our names are the diffusers UNet's module paths (what sd-scripts calls "diffusers" for SD 1/2).
        "modelspec.implementation": "diffusers",
        "modelspec.title": title,
        "modelspec.prediction_type": base.prediction_type,
    }
    if date is not None:
        metadata["modelspec.date"] = date
    if resolution is not None:
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
    return metadata
