"""Turn the GUIE-2022 winner's PyTorch pickle into an IR model directory (config.json + safetensors).

The checkpoint (Kaggle "guieweights0732") is a plain dict: ``module.backbone.<open_clip visual tower>``,
``module.fc1`` (1024 -> 64, the embedding) and ``module.fc2`` (an ArcFace head we drop). It is read once,
with ``weights_only=True``, so that nothing in siso unpickles arbitrary objects; afterwards only safetensors
are loaded.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import torch

from .errors import SisoError
from .files import WRITE_ERRORS, describe_write_error
from .run_directory import check_writable
from .similarity.ir import SisoIRConfig, SisoIRModel

# open_clip ViT-H/14 attention heads are 80 wide (1280 / 16); the width alone then fixes the head count.
HEAD_WIDTH = 80
KAGGLE_CHECKPOINT = 'the Kaggle "guieweights0732" checkpoint'
EXPECTED_LAYOUT = f"{KAGGLE_CHECKPOINT} layout (module.backbone.*, module.fc1.*)"
_IGNORED_PREFIXES = ("fc2.",)  # the ArcFace classification head: not part of the embedding
_BLOCK_KEY = re.compile(r"^backbone\.transformer\.resblocks\.(\d+)\.")
_BLOCK_PARTS = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
_TOP_KEYS = (
    "backbone.conv1.weight",
    "backbone.class_embedding",
    "backbone.positional_embedding",
    "backbone.ln_pre.weight",
    "backbone.ln_pre.bias",
    "backbone.ln_post.weight",
    "backbone.ln_post.bias",
    "backbone.proj",
    "fc1.weight",
    "fc1.bias",
)


def _num_layers(state_dict: Mapping[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))}
    return max(indices) + 1 if indices else 0


def _expected_keys(num_layers: int) -> list[str]:
    blocks = [
        f"backbone.transformer.resblocks.{i}.{part}" for i in range(num_layers) for part in _BLOCK_PARTS
    ]
    return [*_TOP_KEYS, *blocks]


def _check_keys(state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    num_layers = _num_layers(state_dict)
    expected = _expected_keys(num_layers)
    missing = [key for key in expected if key not in state_dict]
    if num_layers == 0:
        missing.append("backbone.transformer.resblocks.0.*")
    if missing:
        shown = ", ".join(f"module.{key}" for key in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise SisoError(
            f"{source} is missing {shown}{more}; siso convert-ir expects {EXPECTED_LAYOUT}. "
            "Pass the checkpoint downloaded from that Kaggle dataset."
        )
    known = set(expected)
    unexpected = [k for k in state_dict if k not in known and not k.startswith(_IGNORED_PREFIXES)]
    if unexpected:
        shown = ", ".join(f"module.{key}" for key in unexpected[:8])
        raise SisoError(
            f"{source} has tensors siso convert-ir does not know ({shown}); it expects {EXPECTED_LAYOUT}, "
            "and refuses to drop weights silently. Pass the checkpoint downloaded from that Kaggle dataset."
        )


def infer_ir_architecture(state_dict: Mapping[str, torch.Tensor]) -> SisoIRConfig:
    """The architecture of a (``module.``-stripped) checkpoint, from tensor shapes alone.

    Works on meta tensors. The stride cannot be read from shapes: the GUIE winner used ``patch - 2``
    (14 -> 12) to get more, overlapping patches, and the image size follows from stride and grid.
    """
    width, _, patch, _ = state_dict["backbone.conv1.weight"].shape
    num_patches = state_dict["backbone.positional_embedding"].shape[0] - 1  # minus the CLS position
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches or width % HEAD_WIDTH:
        raise SisoError(
            f"checkpoint shapes do not fit a ViT with {HEAD_WIDTH}-wide heads on a square patch grid "
            f"(width {width}, {num_patches} patch positions); siso convert-ir expects {EXPECTED_LAYOUT}."
        )
    stride = patch - 2
    return SisoIRConfig(
        hidden_size=width,
        intermediate_size=state_dict["backbone.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        projection_dim=state_dict["backbone.proj"].shape[1],
        num_hidden_layers=_num_layers(state_dict),
        num_attention_heads=width // HEAD_WIDTH,
        image_size=(grid - 1) * stride + patch,
        patch_size=patch,
        patch_stride=stride,
        embedding_dim=state_dict["fc1.weight"].shape[0],
    )


def _to_hf(state_dict: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """open_clip VisualTransformer names -> SisoIRModel names (CLIPVisionModelWithProjection + fc1)."""
    sd = {k.removeprefix("backbone."): v for k, v in state_dict.items()}
    out = {
        "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["ln_pre.weight"],  # sic: transformers' spelling
        "vision_model.pre_layrnorm.bias": sd["ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["ln_post.bias"],
        # open_clip computes x @ proj; nn.Linear computes x @ weight.T.
        "visual_projection.weight": sd["proj"].T,
        "fc1.weight": sd["fc1.weight"],
        "fc1.bias": sd["fc1.bias"],
    }
    for i in range(num_layers):
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        # nn.MultiheadAttention packs q, k, v (in that order) along dim 0.
        for kind in ("weight", "bias"):
            # Cloned: safetensors refuses tensors that share memory, as these three views would.
            q, k, v = (t.clone() for t in sd[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0))
            out.update({f"{dst}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v), strict=True)})
        for a, b in (
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("attn.out_proj", "self_attn.out_proj"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            for kind in ("weight", "bias"):
                out[f"{dst}{b}.{kind}"] = sd[f"{src}{a}.{kind}"]
    # No copies beyond those (the ViT-H checkpoint is ~2.5 GB); contiguous() copies only the transposed proj.
    return {k: v.contiguous() for k, v in out.items()}


def _load_failure(err: Exception) -> str:
    """What went wrong reading a checkpoint, without torch's advice to load it with weights_only=False
    (that would run whatever code the pickle carries; siso never does)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    unsafe = next((line for line in lines if "Unsupported global" in line or "Unsupported operand" in line), None)
    if unsafe is not None:
        return f"it holds Python objects beyond tensors, refused for safety: {unsafe}"
    detail = next((line for line in lines if "weights_only" not in line.lower()), "")
    return f"{type(err).__name__}{': ' + detail[:200] if detail else ''}"


def _load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise SisoError(f"IR checkpoint {path} is a directory; pass the .pth file of {KAGGLE_CHECKPOINT} inside it.")
    if not path.is_file():
        raise SisoError(
            f"IR checkpoint {path} does not exist; download {KAGGLE_CHECKPOINT} "
            "and pass the path of its .pth file."
        )
    try:
        # weights_only: never run code from a downloaded pickle.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types here (UnpicklingError, RuntimeError, EOFError, ...)
        raise SisoError(
            f"IR checkpoint {path} is not a PyTorch checkpoint siso can load safely ({_load_failure(err)}); "
            f"pass the .pth file of {EXPECTED_LAYOUT}."
        ) from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SisoError(
            f"IR checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors; "
            f"siso convert-ir expects {EXPECTED_LAYOUT}."
        )
    # DataParallel's "module." prefix; accept checkpoints saved without it too.
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SisoError(
            f"output {out_dir} already exists and is not an empty directory; "
            "choose another --out or remove it first."
        )


def convert_ir_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Convert the GUIE-2022 winner's checkpoint into ``out_dir`` (config.json + model.safetensors).

    The directory appears complete or not at all: it is written beside ``out_dir`` and renamed onto it.
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    _check_out_dir(out_dir)  # before the (multi-GB) load
    check_writable(out_dir)
    state_dict = _load_checkpoint(checkpoint)
    _check_keys(state_dict, f"IR checkpoint {checkpoint}")
    config = infer_ir_architecture(state_dict)
    weights = _to_hf(state_dict, config.num_hidden_layers)
    del state_dict

    # On the meta device: no memory and no random init for weights that are about to be replaced.
    with torch.device("meta"):
        model = SisoIRModel(config)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as err:  # shapes that disagree with each other
        detail = str(err).splitlines()[-1].strip()
        raise SisoError(
            f"IR checkpoint {checkpoint} has inconsistent tensor shapes ({detail}); "
            f"siso convert-ir expects {EXPECTED_LAYOUT}."
        ) from err
    embeddings = model.vision_model.embeddings
    # A non-persistent buffer, so not in the state dict: rebuild it off the meta device.
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))

    # A hidden sibling on the same filesystem, so the final rename is atomic; mkdir honours the umask.
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        # One file (ViT-H is ~2.5 GB in fp32): IRSimilarity.from_pretrained looks for model.safetensors.
        model.save_pretrained(tmp, max_shard_size="100GB")
        _check_out_dir(out_dir)  # it may have appeared during the conversion
        # rename(2) replaces an empty directory atomically, and fails on a non-empty one.
        os.replace(tmp, out_dir)
    except WRITE_ERRORS as err:
        what, advice = describe_write_error(err)
        raise SisoError(f"Could not write the converted IR model into {out_dir} ({what}); nothing was left there. "
                        f"{advice}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return out_dir
