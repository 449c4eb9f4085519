"""Each benchmark metric against its published definition, computed by hand on small arrays."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from torch import nn

pytest.importorskip("torchmetrics")

from siso.errors import SisoError  # noqa: E402
from siso.eval.clip import CLIPEmbedder  # noqa: E402
from siso.eval.cropping import FixedBoxCropper, GroundingDinoCropper, crop_to_boxes  # noqa: E402
from siso.eval.distribution import CMMD, FID, KID, Precomputed, mmd_rbf  # noqa: E402
from siso.eval.metrics import (  # noqa: E402
    BackgroundLPIPS,
    CLIPIScore,
    CLIPTScore,
    DINOScore,
    DiversityMSE,
    IdentitySimilarity,
    IRScore,
)
from siso.eval.summary import HIGHER_IS_BETTER, mean_sem  # noqa: E402


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return tiny.metrics.clip_dir(tmp_path_factory.mktemp("tiny-clip"))


class ChannelMeans(nn.Module):
    """A hand-checkable embedder: the mean colour of the image."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3))


def halves(left: tuple[float, float, float], right: tuple[float, float, float], size: int = 8) -> torch.Tensor:
    image = torch.empty(1, 3, size, size)
    image[..., : size // 2] = torch.tensor(left).view(1, 3, 1, 1)
    image[..., size // 2 :] = torch.tensor(right).view(1, 3, 1, 1)
    return image


# -- CMMD ---------------------------------------------------------------------------------------------
def test_cmmd_kernel_and_scaling_by_hand():
    x = np.array([[3.0, 4.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    y = np.array([[0.0, 0.0, 5.0], [2.0, 0.0, 0.0], [1.0, -1.0, 0.0]])
    # The reference (google-research/cmmd): unit-normalised CLIP embeddings; Gaussian RBF with sigma 10;
    # the biased estimator (means over all pairs, i = j included); times 1000.
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)

    def k(a, b):
        return math.exp(-np.sum((a - b) ** 2) / (2 * 10.0**2))

    kxx = sum(k(a, b) for a in xn for b in xn) / 9
    kyy = sum(k(a, b) for a in yn for b in yn) / 9
    kxy = sum(k(a, b) for a in xn for b in yn) / 9
    expected = 1000 * (kxx + kyy - 2 * kxy)

    metric = CMMD(Precomputed(3))
    metric.update(torch.tensor(x[:2], dtype=torch.float32), real=True)  # batched: two updates
    metric.update(torch.tensor(x[2:], dtype=torch.float32), real=True)
    metric.update(torch.tensor(y, dtype=torch.float32), real=False)
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)
    assert 0.5 < expected < 20  # the x1000 scaling makes these differences readable
    # The unbiased estimator (diagonal left out) is a different number: we use the biased one.
    unbiased = 1000 * ((kxx * 9 - 3) / 6 + (kyy * 9 - 3) / 6 - 2 * kxy)
    assert abs(unbiased - expected) > 1e-3
    assert mmd_rbf(torch.tensor(xn), torch.tensor(xn)).item() == pytest.approx(0.0, abs=1e-12)
    assert CMMD.higher_is_better is False and CMMD.is_differentiable is False


# -- KID and FID --------------------------------------------------------------------------------------
def test_kid_is_the_unbiased_polynomial_mmd():
    real = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    fake = np.array([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 1.0, 0.0]])

    def k(a, b):  # k(x, y) = (x.y / d + 1)^3, the KID kernel
        return (np.dot(a, b) / 3 + 1) ** 3

    m = 4
    kxx = sum(k(real[i], real[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(fake[i], fake[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(a, b) for a in real for b in fake) / m**2
    expected = kxx + kyy - 2 * kxy

    # subset_size larger than the sets is clamped to them, so every subset is the whole set.
    kid = KID(feature=Precomputed(3), subsets=5, subset_size=1000)
    kid.update(torch.tensor(real, dtype=torch.float64), real=True)
    kid.update(torch.tensor(fake, dtype=torch.float64), real=False)
    mean, std = kid.compute_with_std()
    assert mean.item() == pytest.approx(expected, rel=1e-9)
    assert std.item() == pytest.approx(0.0, abs=1e-9)
    assert kid.compute().item() == pytest.approx(expected, rel=1e-9)


def test_fid_closed_form():
    # 1-d features: N(1, 2) against N(3, 8) (sample variances): (1-3)^2 + 2 + 8 - 2 sqrt(2 * 8) = 6.
    fid = FID(feature=Precomputed(1))
    fid.update(torch.tensor([[0.0], [2.0]]), real=True)
    fid.update(torch.tensor([[1.0], [5.0]]), real=False)
    assert fid.compute().item() == pytest.approx(6.0, rel=1e-6)

    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(12, 3)), rng.normal(loc=0.5, scale=1.5, size=(10, 3))
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    fid = FID(feature=Precomputed(3))
    fid.update(torch.tensor(real[:5]), real=True)
    fid.update(torch.tensor(real[5:]), real=True)
    fid.update(torch.tensor(fake), real=False)
    assert fid.compute().item() == pytest.approx(expected, rel=1e-5)


# -- identity -----------------------------------------------------------------------------------------
def test_identity_similarity_cosines_and_cropping():
    pred = halves((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))  # left red, right green
    target = torch.zeros(1, 3, 12, 12)
    target[:, 0] = 1.0  # all red
    whole = IdentitySimilarity(ChannelMeans())
    # mean colours (0.5, 0.5, 0) and (1, 0, 0): cosine 0.5 / sqrt(0.5)
    assert whole.score(pred, target).item() == pytest.approx(1 / math.sqrt(2), rel=1e-6)

    seen = []

    def left_half(images, labels):
        seen.append(list(labels))
        return FixedBoxCropper((0.0, 0.0, 0.5, 1.0))(images, labels)

    cropped = IdentitySimilarity(ChannelMeans(), cropper=left_half)
    # Both cropped to their left halves: red against red.
    assert cropped.score(pred, target, labels="dog").item() == pytest.approx(1.0, rel=1e-6)
    assert seen == [["dog"], ["dog"]]  # the class name reaches the detector

    # One subject photo against a batch; compute() is the mean over all images of all updates.
    blue = halves((0.0, 0.0, 1.0), (0.0, 0.0, 1.0))
    whole.update(torch.cat([pred, blue]), target)
    whole.update(target, target)
    assert whole.compute().item() == pytest.approx((1 / math.sqrt(2) + 0.0 + 1.0) / 3, rel=1e-6)
    assert IdentitySimilarity.higher_is_better and IdentitySimilarity.is_differentiable


def test_identity_gradients_reach_the_pixels():
    pred = halves((0.2, 0.3, 0.4), (0.5, 0.1, 0.9)).requires_grad_(True)
    metric = IdentitySimilarity(ChannelMeans(), cropper=FixedBoxCropper((0.25, 0.0, 1.0, 1.0)))
    metric.score(pred, halves((1.0, 0.0, 0.0), (1.0, 0.0, 0.0)), labels="dog").sum().backward()
    assert pred.grad is not None and pred.grad[..., 2:].abs().sum() > 0
    assert pred.grad[..., :2].abs().sum() == 0  # outside the box: no influence


def test_crop_to_boxes_rounds_outwards_and_survives_empty_boxes():
    images = torch.rand(2, 3, 10, 20)
    crops = crop_to_boxes(images, torch.tensor([[2.5, 1.2, 7.1, 9.9], [5.0, 5.0, 5.0, 5.0]]))
    assert crops[0].shape == (1, 3, 9, 6) and torch.equal(crops[0], images[:1, :, 1:10, 2:8])
    assert crops[1].shape == (1, 3, 10, 20)  # empty box: the whole image


def test_real_embedders_plug_in(dino_dir, ir_dir, clip_dir):
    images = torch.rand(2, 3, 40, 48)
    subject = torch.rand(1, 3, 64, 50)
    for metric in (DINOScore.from_pretrained(str(dino_dir)), IRScore.from_pretrained(str(ir_dir)),
                   CLIPIScore.from_pretrained(str(clip_dir))):
        scores = metric.score(images, subject)
        # The cosine of the two embeddings, by hand: dot product over the norms' product.
        made, photo = metric.embedder.embed(images).double(), metric.embedder.embed(subject).double()[0]
        by_hand = (made @ photo) / (made.norm(dim=1) * photo.norm())
        assert scores.shape == (2,) and torch.allclose(scores.double(), by_hand, atol=1e-5)
        assert not torch.allclose(by_hand.abs(), torch.ones(2, dtype=torch.float64))  # not trivially 1
        assert metric.score(subject, subject).item() == pytest.approx(1.0, abs=1e-5)
        # Crops of different sizes are embedded in one batch, as if one by one.
        crops = [images[:1, :, :30, :20], images[1:, :, 5:, :], subject]
        one_by_one = torch.cat([metric.embedder.embed(crop) for crop in crops])
        assert torch.allclose(metric.embed_images(crops), one_by_one, atol=1e-5)


def test_grounding_dino_cropper_on_a_tiny_detector(tmp_path):
    directory = tiny.metrics.grounding_dino_dir(tmp_path / "gd")
    cropper = GroundingDinoCropper.from_pretrained(str(directory), box_threshold=0.0, text_threshold=0.0)
    images = torch.rand(2, 3, 40, 48)
    boxes = cropper(images, ["dog", "cat"])
    assert boxes.shape == (2, 4) and cropper.misses == 0
    assert torch.all(boxes[:, 2] > boxes[:, 0]) and torch.all(boxes[:, 3] > boxes[:, 1])
    strict = GroundingDinoCropper.from_pretrained(str(directory), box_threshold=1.01)
    assert torch.equal(strict(images, ["dog", "cat"]), torch.tensor([[0.0, 0.0, 48.0, 40.0]] * 2))
    assert strict.misses == 2  # nothing found: the whole image is compared
    with pytest.raises(SisoError, match="--crop-model"):
        GroundingDinoCropper.from_pretrained(str(tmp_path / "missing"))


# -- CLIP-T ---------------------------------------------------------------------------------------------
def test_clip_t_is_the_cosine_of_image_and_text_embeddings():
    class FixedClip(nn.Module):
        def embed(self, images):
            return torch.tensor([[1.0, 0.0], [1.0, 1.0]])

        def embed_text(self, prompts):
            return torch.tensor([[1.0, 1.0] if "dog" in p else [0.0, -1.0] for p in prompts])

    metric = CLIPTScore(FixedClip())
    scores = metric.score(torch.rand(2, 3, 8, 8), ["a dog", "a cat"])
    assert scores.tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-6)
    assert CLIPTScore.higher_is_better


def test_clip_t_on_a_real_clip_does_not_depend_on_padding(clip_dir):
    metric = CLIPTScore(CLIPEmbedder.from_pretrained(str(clip_dir)))
    images = torch.rand(2, 3, 48, 40)
    prompts = ["a dog", "a dog on top of green grass with sunflowers around it"]
    together = metric.score(images, prompts)
    alone = torch.cat([metric.score(images[i : i + 1], [prompts[i]]) for i in range(2)])
    assert torch.allclose(together, alone, atol=1e-5)


# -- background LPIPS --------------------------------------------------------------------------------
class RecordingNet:
    """Mean squared difference, keeping what it was given."""

    def __init__(self):
        self.inputs = []

    def __call__(self, a, b):
        self.inputs.append((a, b))
        return (a - b).square().mean(dim=(1, 2, 3), keepdim=True)


def test_background_lpips_ignores_the_subject_region():
    net = RecordingNet()
    metric = BackgroundLPIPS(net=net)
    target = torch.full((1, 3, 4, 4), 0.5)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2] = 1.0  # the subject: the left half
    inside = target.clone()
    inside[..., :2] = 0.9  # changed only where the subject is
    assert metric.score(inside, target, mask).item() == 0.0
    a, b = net.inputs[-1]
    assert torch.all(a[..., :2] == 0) and torch.all(b[..., :2] == 0)  # the subject is mid-grey in both
    assert torch.allclose(b[..., 2:], torch.zeros(1, 3, 4, 2))  # 0.5 in [0, 1] is 0 in [-1, 1]

    outside = target.clone()
    outside[..., 2:] = 0.75  # changed in the background by 0.25 -> 0.5 in [-1, 1]
    # (0.5)^2 on half the pixels, 0 elsewhere: 0.125
    assert metric.score(outside, target, mask).item() == pytest.approx(0.125)
    # (B, H, W) masks and one target for a batch
    batch = torch.cat([inside, outside])
    assert metric.score(batch, target, mask[:, 0].expand(2, 4, 4)).tolist() == pytest.approx([0.0, 0.125])
    metric.update(batch, target, mask[:, 0])
    assert metric.compute().item() == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="subject_mask"):
        metric.score(batch, target, torch.zeros(2, 1, 3, 3))
    assert BackgroundLPIPS.higher_is_better is False


def test_background_lpips_default_network_needs_torchvision():
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(SisoError, match="torchvision"):
            BackgroundLPIPS()
    else:  # pragma: no cover - environments with torchvision
        pytest.skip("torchvision is installed; the default LPIPS network would download its weights")


# -- diversity ------------------------------------------------------------------------------------------
def test_diversity_is_the_mse_to_the_centre_cropped_subject():
    preds = torch.full((2, 3, 16, 16), 0.5)
    preds[1] = 0.0
    subject = torch.full((1, 3, 32, 48), 0.25)
    subject[..., :8] = 1.0  # the side bands a square centre crop removes
    subject[..., -8:] = 1.0
    scores = DiversityMSE().score(preds, subject)
    assert scores.tolist() == pytest.approx([0.0625, 0.0625], abs=1e-6)
    assert DiversityMSE.higher_is_better  # higher: further from a copy of the photo


def test_summary_arrows_follow_the_metric_flags():
    classes = {"dino": DINOScore, "ir": IRScore, "clip_i": CLIPIScore, "clip_t": CLIPTScore,
               "diversity": DiversityMSE, "lpips": BackgroundLPIPS, "fid": FID, "kid": KID, "cmmd": CMMD}
    assert {name: cls.higher_is_better for name, cls in classes.items()} == HIGHER_IS_BETTER


def test_mean_and_standard_error():
    mean, sem, n = mean_sem([1.0, 2.0, 4.0])
    assert (mean, n) == (pytest.approx(7 / 3), 3)
    assert sem == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2 / 3))
    assert mean_sem([5.0])[1] is None
