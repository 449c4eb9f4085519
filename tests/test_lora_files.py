"""siso's LoRA files, key by key, against the naming rules of the tools that load them, on the real
SD-Turbo (SD 2.1), SDXL-Turbo and FLUX.1-schnell architectures.

The models are built from their configs (benchmarks/configs/) on the meta device, so the key sets
are the real ones at no memory cost. siso's own attach_lora / snapshot_lora / save_lora write the
files; only the small LoRA layers are given real (random) weights in between.

The rules below are restated, in our own words, from the loaders' sources:

ComfyUI (comfy/lora.py: ``load_lora``, ``model_lora_keys_unet``, ``model_lora_keys_clip``;
comfy/utils.py: ``unet_to_diffusers``, ``flux_to_diffusers``)
  C1. A patched layer is looked up under a name X: kohya weights ``X.lora_up.weight`` and
      ``X.lora_down.weight`` (optional ``X.alpha``), peft ``X.lora_B.weight``/``X.lora_A.weight``,
      or diffusers' ``X.lora.up.weight``/``X.lora_linear_layer.up.weight`` (and their ``down``).
  C2. UNet names: ``lora_unet_`` plus the diffusers module path with dots as underscores, for every
      path ``unet_to_diffusers`` lists; in the attention blocks of down/mid/up blocks that includes
      ``transformer_blocks.T.attn{1,2}.{to_q,to_k,to_v,to_out.0}``. Diffusers-file names are only
      the old attention-processor spelling ``unet.<path with .processor.to_q ...>``.
  C3. CLIP names: SD 1 (CLIP-L) and SD 2 (OpenCLIP-H, ``clip_h``): ``lora_te_text_model_encoder_layers_N_S``
      (``lora_te1_`` too); SDXL: ``lora_te1_...`` for CLIP-L and ``lora_te2_...`` for OpenCLIP-G;
      S is ``self_attn_{q,k,v,out}_proj`` or ``mlp_fc{1,2}``. Diffusers-style names are
      ``text_encoder.text_model.encoder.layers.N.<S with dots>`` (``text_encoder_2.`` for OpenCLIP-G
      next to CLIP-L): always with the ``text_model`` level.
  C4. FLUX: ``transformer.`` plus a name ``flux_to_diffusers`` lists: in double block i
      ``transformer_blocks.i.attn.{to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out}``
      and ``transformer_blocks.i.{ff.net.0.proj,ff.net.2,ff_context.net.0.proj,ff_context.net.2}`` (its
      block map sends them to ``img_mlp.0/2`` and ``txt_mlp.0/2``), in single block i
      ``single_transformer_blocks.i.attn.{to_q,to_k,to_v}``; its CLIP-L as in C3.

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

import json
import re
from pathlib import Path

import pytest
import tiny
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from siso.backbones import Backbone
from siso.backbones.flux import FluxBackbone
from siso.backbones.stable_diffusion import StableDiffusionBackbone
from siso.backbones.stable_diffusion_xl import StableDiffusionXLBackbone
from siso.lora import (
    ADAPTER_NAME,
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    attach_lora,
    lora_components,
    save_lora,
    snapshot_lora,
)

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
RANK = 4
CLIP_LAYERS = {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj"}


# -- the real architectures on the meta device ---------------------------------------------------------


def meta_backbone(name: str) -> Backbone:
    """SD-Turbo, SDXL-Turbo or FLUX.1-schnell from their configs, every weight on the meta device."""
    configs = json.loads((CONFIGS / f"{name}.json").read_text())
    with torch.device("meta"):
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        vae = AutoencoderKL.from_config(configs["vae"])
        if name == "flux-schnell":
            transformer = FluxTransformer2DModel.from_config(configs["transformer"])
        else:
            unet = UNet2DConditionModel.from_config(configs["unet"])
        if name == "sdxl-turbo":
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    tokenizer = tiny.diffusion.clip_tokenizer()  # tokenizers hold no LoRA; any CLIP tokenizer does
    if name == "flux-schnell":  # T5 carries no LoRA in siso, so it is left out
        pipeline = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(configs["scheduler"]), vae=vae,
            text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=None, tokenizer_2=None,
            transformer=transformer,
        )
        return FluxBackbone(pipeline, "black-forest-labs/FLUX.1-schnell")
    scheduler = EulerDiscreteScheduler.from_config(configs["scheduler"])
    if name == "sd-turbo":
        pipeline = StableDiffusionPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        return StableDiffusionBackbone(pipeline, "stabilityai/sd-turbo")
    pipeline = StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer, scheduler=scheduler, add_watermarker=False,
    )
    return StableDiffusionXLBackbone(pipeline, "stabilityai/sdxl-turbo")


def give_the_lora_real_weights(backbone: Backbone) -> None:
    """Only the LoRA layers leave the meta device (a few MB), with random values."""
    generator = torch.Generator().manual_seed(0)
    for name in lora_components(backbone):
        for module in getattr(backbone.pipeline, name).modules():
            if isinstance(module, BaseTunerLayer):
                for layers in (module.lora_A, module.lora_B):
                    layer = layers[ADAPTER_NAME].to_empty(device="cpu")
                    with torch.no_grad():
                        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))


def lora_module_paths(model: torch.nn.Module) -> set[str]:
    """Module paths (in the live model's own layout) that carry our LoRA."""
    return {path for path, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and ADAPTER_NAME in module.lora_A}


def read(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    with safe_open(path, "pt") as file:
        keys = file.keys()
        return {key: tuple(file.get_slice(key).get_shape()) for key in keys}, file.metadata() or {}


class Saved:
    """What save_lora wrote for one architecture: the backbone it came from and the files' keys (with
    their shapes) and metadata."""

    def __init__(self, name: str, train_text_encoder: bool, directory: Path) -> None:
        self.name = name
        self.train_text_encoder = train_text_encoder
        self.backbone = meta_backbone(name)
        self.configs = json.loads((CONFIGS / f"{name}.json").read_text())
        attach_lora(self.backbone, RANK, train_text_encoder, seed=0)
        give_the_lora_real_weights(self.backbone)
        save_lora(self.backbone, snapshot_lora(self.backbone), directory, resolution=512)  # default formats
        self.diffusers_keys, _ = read(directory / DIFFUSERS_WEIGHT_NAME)
        self.has_kohya = (directory / KOHYA_WEIGHT_NAME).exists()
        self.kohya_keys, self.metadata = read(directory / KOHYA_WEIGHT_NAME) if self.has_kohya else ({}, {})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name, train_text_encoder)``: built, attached and saved once per module."""
    cache: dict[tuple[str, bool], Saved] = {}

    def get(name: str, train_text_encoder: bool) -> Saved:
        if (name, train_text_encoder) not in cache:
            directory = tmp_path_factory.mktemp(name) / "lora"
            cache[name, train_text_encoder] = Saved(name, train_text_encoder, directory)
        return cache[name, train_text_encoder]

    return get


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


# -- ComfyUI ---------------------------------------------------------------------------------------------


def comfyui_unet_names(config) -> set[str]:
    """C2 for the attention projections siso targets, derived from the UNet config the way
    ``unet_to_diffusers`` walks the LDM UNet: per level with attention, ``layers_per_block`` attention
    blocks going down and one more going up, each with that level's number of transformer blocks."""
    levels = len(config.block_out_channels)
    depth = config.transformer_layers_per_block
    depth = [depth] * levels if isinstance(depth, int) else list(depth)
    blocks = [f"down_blocks.{x}.attentions.{i}.transformer_blocks.{t}"
              for x in range(levels) if config.down_block_types[x].startswith("CrossAttn")
              for i in range(config.layers_per_block) for t in range(depth[x])]
    blocks += [f"mid_block.attentions.0.transformer_blocks.{t}" for t in range(depth[-1])]
    blocks += [f"up_blocks.{x}.attentions.{i}.transformer_blocks.{t}"
               for x in range(levels) if config.up_block_types[x].startswith("CrossAttn")
               for i in range(config.layers_per_block + 1) for t in range(depth[levels - 1 - x])]
    return {f"lora_unet_{block}_{attn}_{proj}".replace(".", "_")
            for block in blocks for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out_0")}


def comfyui_clip_names(prefix: str, layers: int) -> set[str]:
    """C3: the kohya-style names ComfyUI maps for a CLIP text model with ``layers`` layers."""
    return {f"{prefix}_text_model_encoder_layers_{n}_{s}" for n in range(layers) for s in CLIP_LAYERS}


def comfyui_flux_names(transformer: FluxTransformer2DModel) -> set[str]:
    """C4: diffusers-file module names ComfyUI maps for FLUX (``transformer.`` + flux_to_diffusers)."""
    double = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")
    config = transformer.config
    names = {f"transformer.transformer_blocks.{i}.attn.{p}" for i in range(config.num_layers) for p in double}
    feed_forward = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
    names |= {f"transformer.transformer_blocks.{i}.{p}" for i in range(config.num_layers) for p in feed_forward}
    names |= {f"transformer.single_transformer_blocks.{i}.attn.{p}"
              for i in range(config.num_single_layers) for p in ("to_q", "to_k", "to_v")}
    return names


@pytest.mark.parametrize("name, train_text_encoder", UNET_CASES)
def test_kohya_keys_follow_comfyui_and_diffusers(saved, name, train_text_encoder):
    files = saved(name, train_text_encoder)
    layers = kohya_layer_names(files.kohya_keys)
    # C1, D1: every layer has exactly its down, up and alpha.
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in layers.values())
    # Nothing dropped, nothing extra: exactly the adapted modules, in kohya's spelling.
    assert set(layers) == expected_kohya_names(files.backbone)
    unet_names = comfyui_unet_names(files.backbone.denoiser.config)
    assert {n for n in layers if n.startswith("lora_unet_")} == unet_names  # every attention projection
    mapped = set(unet_names)
    if name == "sd-turbo":
        mapped |= comfyui_clip_names("lora_te", files.configs["text_encoder"]["num_hidden_layers"])
        allowed = ("lora_unet_", "lora_te_text_model_")
    else:
        mapped |= comfyui_clip_names("lora_te1", files.configs["text_encoder"]["num_hidden_layers"])
        mapped |= comfyui_clip_names("lora_te2", files.configs["text_encoder_2"]["num_hidden_layers"])
        allowed = ("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")
    assert set(layers) <= mapped, sorted(set(layers) - mapped)[:5]
    assert all(key.startswith(allowed) for key in files.kohya_keys)
    assert any(key.startswith("lora_te") for key in files.kohya_keys) == train_text_encoder
    # kohya's scale is alpha / rank: a scalar alpha beside down (rank x in) and up (out x rank).
    shapes = files.kohya_keys
    assert all(shapes[f"{n}.lora_down.weight"][0] == RANK and shapes[f"{n}.lora_up.weight"][1] == RANK
               and shapes[f"{n}.alpha"] == () for n in layers)


@pytest.mark.parametrize("name, train_text_encoder", FLUX_CASES)
def test_flux_writes_no_kohya_file(saved, name, train_text_encoder):
    """FLUX's kohya loaders expect Black Forest Labs' block names, not diffusers'; its diffusers file is
    the one ComfyUI loads (see test_flux_diffusers_file_loads_fully_in_comfyui)."""
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
    assert "lora_te1_encoder_layers_0_self_attn_q_proj" not in comfyui_clip_names("lora_te1", 12)
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


@pytest.mark.parametrize("name, train_text_encoder", FLUX_CASES)
def test_flux_diffusers_file_loads_fully_in_comfyui(saved, name, train_text_encoder):
    """C1, C3, C4: ComfyUI and Forge map every key of the FLUX file (diffusers' names, peft weights)."""
    files = saved(name, train_text_encoder)
    mapped = comfyui_flux_names(files.backbone.denoiser)
    mapped |= {f"text_encoder.text_model.encoder.layers.{n}.self_attn.{p}"
               for n in range(files.configs["text_encoder"]["num_hidden_layers"])
               for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    weights = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight",
               ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")
    for key in files.diffusers_keys:
        suffix = next((w for w in weights if key.endswith(w)), None)
        assert suffix is not None, key
        assert key.removesuffix(suffix) in mapped, key
    assert any(key.startswith("text_encoder.") for key in files.diffusers_keys) == train_text_encoder


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
