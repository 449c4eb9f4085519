"""The IR tower: checkpoint conversion, the transformers port, and IRSimilarity, against open_clip's math.

A tiny checkpoint in the exact published layout (``module.backbone.*`` open_clip keys, ``module.fc1``,
``module.fc2``) is made from an independent reference module written the way open_clip's
VisualTransformer computes, so the converted model is checked against the original forward, not itself.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

from siso.convert_ir import convert_ir_checkpoint, infer_ir_architecture
from siso.errors import SisoError
from siso.similarity.ir import IRSimilarity, SisoIRModel

WIDTH, LAYERS, HEADS, PATCH, STRIDE, GRID = 160, 2, 2, 14, 12, 3
IMAGE = (GRID - 1) * STRIDE + PATCH  # 38
PROJ, EMBED, CLASSES = 48, 64, 10


class RefResidualBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (sequence-first nn.MultiheadAttention, exact GELU)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=1e-5)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=1e-5)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, width * 4),
                gelu=nn.GELU(),
                c_proj=nn.Linear(width * 4, width),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(RefResidualBlock(width, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class RefVisual(nn.Module):
    """open_clip's VisualTransformer with the GUIE winner's stride (patch - 2) conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=STRIDE, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(WIDTH))
        self.positional_embedding = nn.Parameter(torch.randn(GRID * GRID + 1, WIDTH))
        self.ln_pre = nn.LayerNorm(WIDTH, eps=1e-5)
        self.transformer = RefTransformer(WIDTH, LAYERS, HEADS)
        self.ln_post = nn.LayerNorm(WIDTH, eps=1e-5)
        self.proj = nn.Parameter(torch.randn(WIDTH, PROJ))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)  # NLD -> LND -> NLD
        return self.ln_post(x[:, 0, :]) @ self.proj


class RefIR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = RefVisual()
        self.fc1 = nn.Linear(PROJ, EMBED)
        self.fc2 = nn.Linear(EMBED, CLASSES, bias=False)  # the ArcFace head: [classes, 64]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.backbone(x))


class NotATensor:
    """Pickled into a checkpoint to make ``weights_only=True`` refuse it."""


def make_reference() -> RefIR:
    torch.manual_seed(0)
    model = RefIR().eval()
    with torch.no_grad():
        # Non-trivial LayerNorm affines and biases, so a mis-mapped one cannot pass unnoticed.
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.1)
            if ".ln_" in f".{name}" and name.endswith("weight"):
                param.add_(1.0)
    return model


@pytest.fixture(scope="module")
def reference() -> RefIR:
    return make_reference()


def save_checkpoint(model: nn.Module, path: Path, nested: bool = False, drop: str | None = None) -> Path:
    state = {f"module.{k}": v for k, v in model.state_dict().items() if f"module.{k}" != drop}
    torch.save({"state_dict": state} if nested else state, path)
    return path


@pytest.fixture(scope="module")
def ir_dir(reference: RefIR, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ir")
    return convert_ir_checkpoint(save_checkpoint(reference, tmp / "guie.pth"), tmp / "ir-model")


def test_converted_model_matches_open_clip_forward(reference: RefIR, ir_dir: Path) -> None:
    model = SisoIRModel.from_pretrained(ir_dir).eval()
    x = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(x), reference(x)
    assert got.shape == (3, EMBED)
    assert (got - want).abs().max().item() < 1e-5


def test_nested_state_dict_is_accepted(reference: RefIR, tmp_path: Path) -> None:
    out = convert_ir_checkpoint(save_checkpoint(reference, tmp_path / "c.pth", nested=True), tmp_path / "o")
    x = torch.randn(1, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (SisoIRModel.from_pretrained(out)(x) - reference(x)).abs().max().item() < 1e-5


def test_config_records_inferred_architecture(ir_dir: Path) -> None:
    config = json.loads((ir_dir / "config.json").read_text())
    assert config["model_type"] == "siso_ir"
    expected = {
        "hidden_size": WIDTH,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "intermediate_size": 4 * WIDTH,
        "patch_size": PATCH,
        "patch_stride": STRIDE,
        "image_size": IMAGE,
        "projection_dim": PROJ,
        "embedding_dim": EMBED,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
    assert {k: config[k] for k in expected} == expected
    assert sorted(p.name for p in ir_dir.iterdir()) == ["config.json", "model.safetensors"]


def test_real_checkpoint_shapes_give_vit_h_at_290() -> None:
    width, layers = 1280, 32
    shapes = {
        "backbone.conv1.weight": (width, 3, 14, 14),
        "backbone.positional_embedding": (577, width),
        "backbone.proj": (width, 1024),
        "fc1.weight": (64, 1024),
        **{f"backbone.transformer.resblocks.{i}.mlp.c_fc.weight": (4 * width, width) for i in range(layers)},
    }
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    config = infer_ir_architecture(state)
    assert (config.image_size, config.patch_size, config.patch_stride) == (290, 14, 12)
    assert (config.num_attention_heads, config.num_hidden_layers, config.intermediate_size) == (16, 32, 5120)
    assert (config.projection_dim, config.embedding_dim) == (1024, 64)
    with torch.device("meta"):
        model = SisoIRModel(config)
    assert model.vision_model.embeddings.position_embedding.num_embeddings == 577


def test_similarity_embed_is_differentiable_and_matches_reference(reference: RefIR, ir_dir: Path) -> None:
    sim = IRSimilarity.from_pretrained(ir_dir)
    assert sim.name == "ir" and not sim.training
    assert all(not p.requires_grad for p in sim.parameters())
    assert (sim.preprocessing.resize, sim.preprocessing.crop) == (IMAGE, IMAGE)
    images = torch.rand(2, 3, 45, 60, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    emb = sim.embed(images)
    emb.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with torch.no_grad():
        want = reference(sim.preprocessing(images))
    assert (emb.detach() - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loads_in_half_precision(ir_dir: Path, dtype: torch.dtype) -> None:
    sim = IRSimilarity.from_pretrained(ir_dir, dtype=dtype)
    assert {p.dtype for p in sim.parameters()} == {dtype}
    assert sim.embed(torch.rand(1, 3, IMAGE, IMAGE)).shape == (1, EMBED)
    # transformers' older keyword still works on the model class.
    assert SisoIRModel.from_pretrained(ir_dir, torch_dtype=dtype).dtype == dtype


def test_no_pickle_at_run_time(ir_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load called while loading an IR model directory")

    monkeypatch.setattr(torch, "load", refuse)
    assert IRSimilarity.from_pretrained(ir_dir).embed(torch.rand(1, 3, IMAGE, IMAGE)).shape == (1, EMBED)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(SisoError, match="nope.pth does not exist"):
        convert_ir_checkpoint(tmp_path / "nope.pth", tmp_path / "out")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pth"
    bad.write_text("hello, not a pickle")
    with pytest.raises(SisoError, match="notes.pth is not a PyTorch checkpoint"):
        convert_ir_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_weights_only_refuses(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"module.fc1.weight": NotATensor()}, evil)
    with pytest.raises(SisoError, match="evil.pth is not a PyTorch checkpoint siso can load safely"):
        convert_ir_checkpoint(evil, tmp_path / "out")


def test_checkpoint_missing_fc1(reference: RefIR, tmp_path: Path) -> None:
    path = save_checkpoint(reference, tmp_path / "partial.pth", drop="module.fc1.weight")
    with pytest.raises(SisoError, match=r"partial.pth is missing module\.fc1\.weight.*guieweights0732"):
        convert_ir_checkpoint(path, tmp_path / "out")


def test_refuses_non_empty_out_dir_but_fills_empty_one(reference: RefIR, tmp_path: Path) -> None:
    path = save_checkpoint(reference, tmp_path / "c.pth")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(SisoError, match="full already exists"):
        convert_ir_checkpoint(path, full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (convert_ir_checkpoint(path, empty) / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "empty", "full"]  # no temp dir left


def test_ir_dir_missing_weights(ir_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial-ir"
    partial.mkdir()
    (partial / "config.json").write_text((ir_dir / "config.json").read_text())
    with pytest.raises(SisoError, match=r"partial-ir is missing model\.safetensors.*siso convert-ir"):
        IRSimilarity.from_pretrained(partial)


def test_ir_dir_missing_or_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(SisoError, match=r"ghost does not exist; make one with `siso convert-ir"):
        IRSimilarity.from_pretrained(tmp_path / "ghost")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(SisoError, match="'clip_vision_model', not 'siso_ir'"):
        IRSimilarity.from_pretrained(other)
