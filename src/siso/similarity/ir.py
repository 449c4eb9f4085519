"""The "IR" similarity: the Google Universal Image Embedding 2022 winner's image-retrieval tower.

It is an open_clip ViT-H/14 image tower whose patch embedding overlaps (14x14 conv, stride 12, input
290x290 -> a 24x24 grid), followed by a 1024 -> 64 linear layer whose output is the embedding. We express it
as a transformers CLIP vision model so it saves/loads as config.json + model.safetensors (no pickle at run
time); ``siso convert-ir`` (:mod:`siso.convert_ir`) turns the published pickle into that directory once.
"""

# No ``from __future__ import annotations`` here: transformers reads the dataclass field annotations of
# configs at runtime (strict validation), so they must stay real types.

import json
from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

from ..errors import SisoError
from .base import Preprocessing, SimilarityModel

# open_clip's OpenAI-CLIP normalisation, which the GUIE winner kept.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@strict
class SisoIRConfig(CLIPVisionConfig):
    """A CLIP vision config plus the overlapping-patch stride and the final embedding size.

    Defaults describe the published model (ViT-H/14, stride 12, 290px, 1024 -> 64).
    """

    model_type = "siso_ir"
    # CLIPVisionConfig sets this so it can be nested in a CLIPConfig; ours is always top-level.
    base_config_key = ""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    projection_dim: int = 1024
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 290
    patch_size: int = 14
    # open_clip's nn.GELU is the exact (erf) GELU, not CLIP's quick_gelu.
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    patch_stride: int = 12
    embedding_dim: int = 64

    @property
    def grid_size(self) -> int:
        """Patches per side of the (overlapping) patch grid."""
        return (self.image_size - self.patch_size) // self.patch_stride + 1

    def validate_patch_grid(self) -> None:
        """Part of ``@strict`` validation: the stride must be positive and the image hold one patch."""
        if self.patch_stride <= 0:
            raise ValueError(f"patch_stride must be positive, got {self.patch_stride}.")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}.")


class SisoIRVisionEmbeddings(CLIPVisionEmbeddings):
    """CLIP's patch + position embeddings with a patch stride smaller than the patch size."""

    def __init__(self, config: SisoIRConfig) -> None:
        super().__init__(config)
        # The parent assumes stride == patch size; rebuild the pieces whose shapes depend on the stride.
        self.patch_embedding = nn.Conv2d(
            in_channels=config.num_channels,
            out_channels=self.embed_dim,
            kernel_size=self.patch_size,
            stride=config.patch_stride,
            bias=False,
        )
        self.num_patches = config.grid_size**2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)
        self.position_ids = nn.Buffer(torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # The parent's version computes the new grid as size // patch_size, which is wrong with a stride.
        raise NotImplementedError(
            "The IR model only runs at its native resolution; resize the input instead."
        )


class SisoIRModel(CLIPVisionModelWithProjection):
    """CLIP vision tower with overlapping patches, its 1024-d projection, then ``fc1`` to the embedding."""

    # Explicit rather than via the ``config`` annotation, which transformers reads with get_annotations.
    config_class = SisoIRConfig
    config: SisoIRConfig
    # Matched by class name when splitting across devices, so the subclass must be listed too.
    _no_split_modules = ["CLIPEncoderLayer", "CLIPVisionEmbeddings", "SisoIRVisionEmbeddings"]

    def __init__(self, config: SisoIRConfig) -> None:
        super().__init__(config)
        self.vision_model.embeddings = SisoIRVisionEmbeddings(config)
        self.fc1 = nn.Linear(config.projection_dim, config.embedding_dim)
        # Initialise the two new modules; modules initialised by the first post_init are flagged and skipped.
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """(B, 3, image_size, image_size) normalised pixels -> (B, embedding_dim) embeddings."""
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # ln_post(CLS)
        return self.fc1(self.visual_projection(pooled))


def _missing_dir_advice(path: Path) -> str:
    return f"make one with `siso convert-ir CHECKPOINT --out {path}` (or `siso convert-ir --download`)"


class IRSimilarity(SimilarityModel):
    """The GUIE-2022 winner's 64-d retrieval embedding as a frozen similarity model."""

    name = "ir"

    def __init__(self, model: SisoIRModel) -> None:
        super().__init__()
        self.model = model
        size = model.config.image_size
        self.preprocessing = Preprocessing(resize=size, crop=size, mean=CLIP_MEAN, std=CLIP_STD)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)

    @classmethod
    def check_source(cls, source: str | Path) -> None:
        """A directory written by ``siso convert-ir``: both files there, the config siso's own."""
        path = Path(source)
        if path.is_file():
            raise SisoError(
                f"--ir-model {path} is a file, not an IR model directory. If it is the downloaded checkpoint, "
                f"convert it once: `siso convert-ir {path}` (then --ir-model auto finds it), or "
                f"`siso convert-ir {path} --out DIR` and pass --ir-model DIR."
            )
        if not path.is_dir():
            raise SisoError(f"IR model directory {path} does not exist; {_missing_dir_advice(path)}.")
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
        if missing:
            raise SisoError(
                f"IR model directory {path} is missing {' and '.join(missing)}; {_missing_dir_advice(path)}."
            )
        # Check the model type ourselves: transformers would only warn and then fail on shapes.
        try:
            model_type = json.loads((path / CONFIG_FILE).read_text()).get("model_type")
        except (OSError, ValueError, AttributeError) as err:
            raise SisoError(
                f"{path / CONFIG_FILE} is not a readable JSON config ({err}); {_missing_dir_advice(path)}."
            ) from err
        if model_type != SisoIRConfig.model_type:
            raise SisoError(
                f"{path / CONFIG_FILE} has model_type {model_type!r}, not {SisoIRConfig.model_type!r}, so "
                f"{path} is not an IR model directory; {_missing_dir_advice(path)}."
            )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "IRSimilarity":
        """Load a directory written by ``siso convert-ir`` (local only, safetensors only), frozen."""
        path = Path(path)
        cls.check_source(path)
        try:
            model = SisoIRModel.from_pretrained(path, dtype=dtype, local_files_only=True, use_safetensors=True)
        except Exception as err:  # safetensors and transformers raise several types for a damaged file
            raise SisoError(
                f"The IR model in {path} could not be read ({err.__class__.__name__}: {str(err)[:200]}); "
                f"{WEIGHTS_FILE} may be truncated or corrupt. Convert it again: {_missing_dir_advice(path)}."
            ) from err
        model = model.to(device).requires_grad_(False).eval()
        return cls(model).eval()
