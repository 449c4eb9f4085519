"""CLIP through transformers, shaped like siso's similarity models: differentiable preprocessing,
then an embedding; plus text embeddings for CLIP-T.

It lives in eval/ because only the metrics use it; as a :class:`SimilarityModel` it could join the
similarity registry unchanged if CLIP ever becomes a loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import SisoError
from ..model_ids import CLIP_MODEL
from ..similarity.base import Preprocessing, SimilarityModel
from ..similarity.ir import CLIP_MEAN, CLIP_STD


def _pooled(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPEmbedder(SimilarityModel):
    """CLIP's projected image and text embeddings (the ones CLIP compares with a cosine)."""

    name = "clip"

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        # CLIPImageProcessor's recipe: shorter side to the input size (bicubic), centre crop, CLIP statistics.
        size = int(model.config.vision_config.image_size)
        self.preprocessing = Preprocessing(resize=size, crop=size, mean=CLIP_MEAN, std=CLIP_STD)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    def embed_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (B, D) text embeddings; long prompts are truncated to CLIP's 77 tokens."""
        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt")
        device = next(self.parameters()).device
        output = self.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                              attention_mask=tokens["attention_mask"].to(device))
        return _pooled(output).float()

    @classmethod
    def from_pretrained(cls, source: str = CLIP_MODEL, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> CLIPEmbedder:
        from transformers import AutoTokenizer, CLIPModel, PretrainedConfig

        try:
            model_type = PretrainedConfig.get_config_dict(source)[0].get("model_type")
            if model_type != "clip":
                raise SisoError(f"{source} is a {model_type} model, not CLIP; pass e.g. {CLIP_MODEL}.")
            model = CLIPModel.from_pretrained(source, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source)
        except SisoError:
            raise
        except Exception as err:  # hub errors come in many types; the message is what matters
            raise SisoError(
                f"Could not load the CLIP model {source!r} ({err.__class__.__name__}: {err}). Pass a Hub id such "
                f"as {CLIP_MODEL} or a local directory with a CLIP model and its tokenizer (the first use "
                "of a Hub id needs internet access)."
            ) from err
        return cls(model.to(device).eval().requires_grad_(False), tokenizer)
