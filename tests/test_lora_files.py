"""siso's LoRA files, key by key, against the naming rules of the tools that load them, on the real
SD-Turbo (SD 2.1), SDXL-Turbo and FLUX.1-schnell architectures (tests/real_shape_lora.py).

ComfyUI's own loader is the test of record for ComfyUI (tests/test_comfyui_lora.py runs it on these
files). For AUTOMATIC1111 and diffusers' kohya converter, which cannot run here, the rules below are
restated, in our own words, from the loaders' sources:

AUTOMATIC1111 (extensions-builtin/Lora/networks.py: ``load_network``, ``convert_diffusers_name_to_compvis``;
network.py: ``NetworkOnDisk.detect_version``; ui_extra_networks_lora.py: ``create_item``)
  A1. A key is split at its first dot into the layer name and the weight part (``lora_up.weight``,
      ``lora_down.weight``, ``alpha``), so layer names hold no dots.
  A2. ``lora_unet_down_blocks_B_attentions_I_R`` becomes ``diffusion_model_input_blocks_{1+3B+I}_1_R``,
      ``lora_unet_mid_block_attentions_0_R`` ``diffusion_model_middle_block_1_R`` and
      ``lora_unet_up_blocks_B_attentions_I_R`` ``diffusion_model_output_blocks_{3B+I}_1_R``: the
      original (LDM) UNet's block numbering for two layers per block, where R keeps the diffusers
      names (``transformer_blocks_T_attn1_to_q`` ...).
  A3. ``lora_te_text_model_encoder_layers_N_S`` goes to the SD 1 text model
      (``transformer_text_model_encoder_layers_N_S``) or, on SD 2, to OpenCLIP's
      ``model_transformer_resblocks_N_attn`` (q/k/v, fused there) / ``..._attn_out_proj``.
      ``lora_te1_text_model_...`` is tried on ``0_transformer_text_model_...`` (SDXL's CLIP-L) and on
      ``transformer_text_model_...`` (SD 1) only, so it finds nothing on SD 2;
      ``lora_te2_text_model_encoder_layers_N_S`` becomes ``1_model_transformer_resblocks_N_...`` (SDXL).
  A4. The file's family: SDXL when ``ss_base_model_version`` starts with ``sdxl_``, else SD2 when
      ``ss_v2`` is the string ``True``, else SD1 whenever there is any metadata. The Lora tab hides
      a LoRA whose family differs from the loaded checkpoint's.

diffusers (loaders/lora_conversion_utils.py: ``_convert_non_diffusers_lora_to_diffusers``;
loaders/lora_base.py: ``_load_lora_into_text_encoder``)
  D1. kohya files: ``lora_unet_`` goes to the UNet, ``lora_te_``/``lora_te1_`` to ``text_encoder``,
      ``lora_te2_`` to ``text_encoder_2``; every ``lora_down`` needs its ``lora_up``; any other key
      is an error.
  D2. Diffusers files: ``<component>.<module path>.<lora weight>``. With transformers 4 the
      text-encoder paths must exist as written, i.e. with ``text_model.``; diffusers 0.42 strips that
      prefix where the live model has no ``text_model`` level (transformers 5's CLIPTextModel).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from real_shape_lora import RANK, lora_module_paths, saved_files

from siso.backbones import Backbone
from siso.backbones.flux import FluxBackbone
from siso.backbones.stable_diffusion import StableDiffusionBackbone
from siso.backbones.stable_diffusion_xl import StableDiffusionXLBackbone
from siso.lora import ADAPTER_NAME

CLIP_LAYERS = {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_files(tmp_path_factory)


UNET_CASES = [("sd-turbo", False), ("sd-turbo", True), ("sdxl-turbo", False), ("sdxl-turbo", True)]
FLUX_CASES = [("flux-schnell", False), ("flux-schnell", True)]


def kohya_layer_names(keys) -> dict[str, set[str]]:
    """A1: layer name -> its weight parts."""
    layers: dict[str, set[str]] = {}
    for key in keys:
        name, _, part = key.partition(".")
        layers.setdefault(name, set()).add(part)
    return layers


def expected_kohya_names(backbone: Backbone) -> set[str]:
    """kohya's naming (networks/lora.py): prefix + the transformers-4/diffusers module path, '.' -> '_'."""
    names = {"lora_unet_" + p.replace(".", "_") for p in lora_module_paths(backbone.denoiser)}
    encoders = backbone.text_encoder_names
    for index, encoder in enumerate(encoders, start=1):
        model = getattr(backbone.pipeline, encoder)
        if ADAPTER_NAME not in (getattr(model, "peft_config", None) or {}):
            continue
        prefix = "lora_te_" if len(encoders) == 1 else f"lora_te{index}_"
        level = "" if hasattr(model, "text_model") else "text_model."
        names |= {prefix + (level + p).replace(".", "_") for p in lora_module_paths(model)}
    return names


@pytest.mark.parametrize("name, train_text_encoder", UNET_CASES)
def test_kohya_keys_follow_kohyas_naming(saved, name, train_text_encoder):
    files = saved(name, train_text_encoder)
    layers = kohya_layer_names(files.kohya_keys)
    # D1: every layer has exactly its down, up and alpha.
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in layers.values())
    # Nothing dropped, nothing extra: exactly the adapted modules, in kohya's spelling.
    assert set(layers) == expected_kohya_names(files.backbone)
    allowed = ("lora_unet_", "lora_te_text_model_") if name == "sd-turbo" else (
        "lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")
    assert all(key.startswith(allowed) for key in files.kohya_keys)
    assert any(key.startswith("lora_te") for key in files.kohya_keys) == train_text_encoder
    # kohya's scale is alpha / rank: a scalar alpha beside down (rank x in) and up (out x rank).
    shapes = files.kohya_keys
    assert all(shapes[f"{n}.lora_down.weight"][0] == RANK and shapes[f"{n}.lora_up.weight"][1] == RANK
               and shapes[f"{n}.alpha"] == () for n in layers)


@pytest.mark.parametrize("name, train_text_encoder", FLUX_CASES)
def test_flux_writes_no_kohya_file(saved, name, train_text_encoder):
    """FLUX's kohya loaders expect Black Forest Labs' block names, not diffusers'; its diffusers file is
    the one ComfyUI loads (tests/test_comfyui_lora.py)."""
    assert not saved(name, train_text_encoder).has_kohya


# -- AUTOMATIC1111 ---------------------------------------------------------------------------------------


def a1111_unet_target(layer: str, layers_per_block: int) -> str | None:
    """A2, checked against the LDM UNet's real numbering for ``layers_per_block`` (not A1111's fixed 2)."""
    per_level = layers_per_block + 1  # each LDM level: its layers plus a down/upsampler slot
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", layer):
        block, index, rest = int(m[1]), int(m[2]), m[3]
        a1111, ldm = 1 + 3 * block + index, 1 + per_level * block + index
        return f"diffusion_model_input_blocks_{ldm}_1_{rest}" if a1111 == ldm else None
    if m := re.fullmatch(r"lora_unet_mid_block_attentions_0_(.+)", layer):
        return f"diffusion_model_middle_block_1_{m[1]}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", layer):
        block, index, rest = int(m[1]), int(m[2]), m[3]
        a1111, ldm = 3 * block + index, per_level * block + index
        return f"diffusion_model_output_blocks_{ldm}_1_{rest}" if a1111 == ldm else None
    return None


def a1111_text_target(layer: str, family: str) -> str | None:
    """A3: where A1111 puts a text-encoder layer name of an SD2 or SDXL checkpoint."""
    if family == "SD2" and (m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_self_attn_(.+)", layer)):
        # q/k/v land on the fused MultiheadAttention, out_proj on its output projection.
        return f"model_transformer_resblocks_{m[1]}_attn" + ("_out_proj" if m[2] == "out_proj" else "")
    if family == "SDXL" and layer.startswith("lora_te1_text_model_"):
        return "0_transformer_" + layer.removeprefix("lora_te1_")
    if family == "SDXL" and (m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_self_attn_(.+)", layer)):
        return f"1_model_transformer_resblocks_{m[1]}_attn" + ("_out_proj" if m[2] == "out_proj" else "")
    return None


def a1111_family(metadata: dict[str, str]) -> str:
    """A4."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if metadata.get("ss_v2", "") == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


@pytest.mark.parametrize("name, train_text_encoder", UNET_CASES)
def test_kohya_file_loads_fully_in_a1111(saved, name, train_text_encoder):
    files = saved(name, train_text_encoder)
    family = a1111_family(files.metadata)
    assert family == {"sd-turbo": "SD2", "sdxl-turbo": "SDXL"}[name], files.metadata  # A4: shown in the Lora tab
    for layer in kohya_layer_names(files.kohya_keys):
        if layer.startswith("lora_unet_"):
            target = a1111_unet_target(layer, files.backbone.denoiser.config.layers_per_block)
            assert target is not None and re.search(r"transformer_blocks_\d+_attn[12]_to_(q|k|v|out_0)$", target), layer
        else:
            assert a1111_text_target(layer, family) is not None, layer
            encoder = "text_encoder_2" if layer.startswith("lora_te2_") else "text_encoder"
            depth, sublayer = re.search(r"_layers_(\d+)_(.+)$", layer).groups()
            assert int(depth) < files.configs[encoder]["num_hidden_layers"] and sublayer in CLIP_LAYERS, layer


def test_a1111_rules_catch_what_the_old_files_did_wrong():
    """The rules above are not vacuous: the keys siso wrote before (``lora_te1_`` on SD 2, no
    ``text_model`` level on CLIP-L) and metadata without a base model fail them."""
    assert a1111_text_target("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "SD2") is None
    assert a1111_text_target("lora_te1_encoder_layers_0_self_attn_q_proj", "SDXL") is None
    assert a1111_family({"ss_network_module": "networks.lora"}) == "SD1"
    assert a1111_unet_target("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 1) is None


@pytest.mark.parametrize("name, version, v2, architecture", [
    ("sd-turbo", "sd_v2", "True", "stable-diffusion-v2-512/lora"),
    ("sdxl-turbo", "sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora"),
])
def test_kohya_metadata_names_the_base_model(saved, name, version, v2, architecture):
    """sd-scripts' keys (train_util.build_minimum_network_metadata) and ModelSpec's (sai_model_spec)."""
    metadata = saved(name, False).metadata
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_base_model_version"] == version and metadata["ss_v2"] == v2
    assert metadata["ss_network_dim"] == str(RANK) and float(metadata["ss_network_alpha"]) == RANK
    assert metadata["modelspec.architecture"] == architecture
    assert metadata["modelspec.prediction_type"] == "epsilon" and metadata["modelspec.resolution"] == "512x512"
    assert metadata["modelspec.sai_model_spec"] == "1.0.0" and metadata["modelspec.implementation"] == "diffusers"
    assert metadata["modelspec.title"]


# -- the diffusers file ------------------------------------------------------------------------------------


def diffusers_module(key: str) -> tuple[str, str]:
    """(component, module path) of a diffusers-file key (D2)."""
    component, _, rest = key.partition(".")
    path = re.sub(r"\.(lora\.(up|down)|lora_linear_layer\.(up|down)|lora_[AB])\.weight$", "", rest)
    assert path != rest, key
    return component, path


@pytest.mark.parametrize("name, train_text_encoder", UNET_CASES + FLUX_CASES)
def test_diffusers_file_uses_the_canonical_text_encoder_layout(saved, name, train_text_encoder):
    """D2: text-encoder paths carry ``text_model.``, and name live layers once a transformers-5 model's
    missing level is allowed for; UNet / transformer paths are the live ones as written."""
    files = saved(name, train_text_encoder)
    backbone = files.backbone
    modules: dict[str, set[str]] = {}
    for key in files.diffusers_keys:
        component, path = diffusers_module(key)
        modules.setdefault(component, set()).add(path)
    expected = {backbone.denoiser_name} | (set(backbone.text_encoder_names) if train_text_encoder else set())
    assert set(modules) == expected
    for component, paths in modules.items():
        model = getattr(backbone.pipeline, component)
        if component in backbone.text_encoder_names:
            assert all(p.startswith("text_model.encoder.layers.") for p in paths), sorted(paths)[:3]
            if not hasattr(model, "text_model"):
                paths = {p.removeprefix("text_model.") for p in paths}
        assert paths == lora_module_paths(model), component


# -- which files a run writes ------------------------------------------------------------------------------


def test_lora_formats_default_to_the_backbones():
    """No --lora-format: SD and SDXL write both files, FLUX and Sana (no kohya loader) the diffusers one."""
    from siso.backbones.sana import SanaBackbone
    from siso.config import EditConfig, GenerateConfig
    from siso.errors import SisoError

    config = GenerateConfig(subjects=(Path("dog.jpg"),), prompt="a photo of a dog", ir_model=None)
    assert config.lora_format is None
    for backbone, formats in ((StableDiffusionBackbone, ("diffusers", "kohya")),
                              (StableDiffusionXLBackbone, ("diffusers", "kohya")),
                              (FluxBackbone, ("diffusers",)), (SanaBackbone, ("diffusers",))):
        backbone.check_options("model", False, config.lora_format)  # the default is always honoured
        assert config.resolved(backbone.preset).lora_format == formats
        assert set(formats) <= set(backbone.preset.lora_formats)
    chosen = GenerateConfig(subjects=(Path("dog.jpg"),), prompt="a dog", lora_format=["diffusers"], ir_model=None)
    assert chosen.resolved(StableDiffusionXLBackbone.preset).lora_format == ("diffusers",)
    edit = EditConfig(subject=Path("dog.jpg"), input=Path("scene.jpg"), ir_model=None)
    assert edit.resolved(StableDiffusionBackbone.preset).lora_format == ("diffusers", "kohya")
    with pytest.raises(SisoError, match="--lora-format must be one of diffusers, kohya"):
        GenerateConfig(subjects=(Path("dog.jpg"),), prompt="a dog", lora_format=("safetensors",))
