"""Preprocessing and the similarity loss against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from siso.errors import SisoError
from siso.similarity import DinoSimilarity, IRSimilarity, Preprocessing, SimilarityLoss


@pytest.mark.fidelity("preprocess.antialias")
def test_preprocessing_follows_the_eval_recipe():
    prep = Preprocessing(resize=4, crop=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    image = torch.rand(1, 3, 8, 16)
    out = prep(image)
    # shorter side 8 -> 4, long side 16 -> 8 (torchvision's truncating rule), centre crop 2x2.
    resized = F.interpolate(image, size=(4, 8), mode="bicubic", align_corners=False, antialias=True)
    expected = (resized[..., 1:3, 3:5] - 0.5) / 0.25
    assert out.shape == (1, 3, 2, 2)
    assert torch.allclose(out, expected, atol=1e-6)


def test_preprocessing_is_differentiable():
    image = torch.rand(1, 3, 32, 32, requires_grad=True)
    Preprocessing(resize=28, crop=28, mean=(0, 0, 0), std=(1, 1, 1))(image).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_dino_uses_the_config_size_and_the_cls_after_layernorm(dino_dir):
    model = DinoSimilarity.from_pretrained(str(dino_dir))
    assert model.preprocessing.crop == 28 and model.preprocessing.mean == (0.485, 0.456, 0.406)
    reference = AutoModel.from_pretrained(dino_dir)
    image = torch.rand(1, 3, 40, 32)
    pixels = model.preprocessing(image)
    with torch.no_grad():
        # The last encoder layer's output, before the final layer norm: apply it ourselves.
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        expected = reference.layernorm(hidden)[:, 0]
        assert torch.allclose(model.embed(image), expected, atol=1e-6)


def test_dino_refuses_another_model_type(ir_dir):
    with pytest.raises(SisoError, match="not DINOv2"):
        DinoSimilarity.from_pretrained(str(ir_dir))


@pytest.mark.fidelity("loop.reported_loss")
def test_loss_is_the_weighted_sum_of_mean_cosine_distances(dino_dir, ir_dir):
    dino = DinoSimilarity.from_pretrained(str(dino_dir))
    ir = IRSimilarity.from_pretrained(ir_dir)
    references = [torch.rand(1, 3, 64, 80), torch.rand(1, 3, 70, 70)]
    loss = SimilarityLoss({"dino": dino, "ir": ir}, {"dino": 1.0, "ir": 0.5}, references)
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        values = loss(image)

        def distance(model):
            e = model.embed(image)[0]
            cosines = [F.cosine_similarity(e, model.embed(r)[0], dim=0) for r in references]
            return 1 - sum(cosines) / len(cosines)

        assert values["dino"].item() == pytest.approx(distance(dino).item(), abs=1e-6)
        assert values["ir"].item() == pytest.approx(distance(ir).item(), abs=1e-6)
        assert values["total"].item() == pytest.approx(values["dino"].item() + 0.5 * values["ir"].item(), abs=1e-6)
        # The identical image is at distance zero.
        same = SimilarityLoss({"dino": dino}, {"dino": 1.0}, [image])(image)
        assert same["total"].item() == pytest.approx(0.0, abs=1e-6)
