"""Set-level naturalness metrics: FID, KID and CMMD of generated images against a reference set.

Same interface as torchmetrics' FID/KID: ``update(images, real=True|False)`` with (B, 3, H, W)
floats in [0, 1], then ``compute()``; "real" is the reference set (the plain model's images for
generation, the input images for editing). FID and KID *are* torchmetrics' implementations; the
feature extractor is injectable (an ``nn.Module`` images -> (B, D)), and :class:`Precomputed`
lets features computed elsewhere (by the benchmark's workers) go in as they are.

The default FID/KID feature, torchmetrics' Inception-v3 (2048-d pool features, the reference
TF-FID network), needs the ``torch-fidelity`` package and downloads its weights on first use
(``pt_inception-2015-12-05``); pass ``feature_extractor_weights_path`` to use a local copy.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ._deps import require

torchmetrics = require("torchmetrics", "The benchmark metrics")
from torchmetrics.image.fid import FrechetInceptionDistance  # noqa: E402
from torchmetrics.image.kid import KernelInceptionDistance  # noqa: E402
from torchmetrics.utilities import dim_zero_cat  # noqa: E402

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


class Precomputed(nn.Module):
    """A feature extractor for features that are already computed: passes them through."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return features


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception-v3 on [0, 1] images (it takes uint8 and resizes to 299 itself)."""

    def __init__(self, weights_path: str | None = None, feature: int = 2048) -> None:
        super().__init__()
        require("torch_fidelity", "The default FID/KID feature extractor (Inception-v3)")
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                      feature_extractor_weights_path=weights_path)
        self.num_features = feature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Rounded, so images read from 8-bit PNGs give back exactly their bytes.
        return self.net((images.clamp(0, 1) * 255).round().byte()).reshape(images.shape[0], -1)


class EmbedderFeatures(nn.Module):
    """Any ``embed(images)`` model (DINOv2, CLIP) as a feature extractor, e.g. FD-DINOv2."""

    def __init__(self, embedder: nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed(images).float()


class FID(FrechetInceptionDistance):
    """Fréchet distance between Gaussian fits of the two sets' features (lower is better).

    torchmetrics' FID, taking [0, 1] float images; ``feature`` is 2048 (Inception) or any module.
    """

    def __init__(self, feature: int | nn.Module = 2048, **kwargs) -> None:
        super().__init__(feature=feature, normalize=True, **kwargs)


class KID(KernelInceptionDistance):
    """Kernel Inception Distance: unbiased MMD^2 with the cubic polynomial kernel (lower is better).

    torchmetrics' KID, taking [0, 1] float images. ``compute()`` gives the mean over ``subsets``
    random subsets of ``subset_size`` (clamped to the smaller set, so small benchmarks work),
    with the subsets drawn from ``seed`` so the number is repeatable; ``compute_with_std()``
    adds their standard deviation.
    """

    def __init__(self, feature: int | nn.Module = 2048, subsets: int = 100, subset_size: int = 1000,
                 seed: int = 0, **kwargs) -> None:
        with warnings.catch_warnings():  # "KID will save all extracted features": yes, that is how KID works
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(feature=feature, subsets=subsets, subset_size=subset_size, normalize=True, **kwargs)
        self.requested_subset_size = subset_size
        self.seed = seed

    def compute_with_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        available = min(sum(f.shape[0] for f in self._as_list(self.real_features)),
                        sum(f.shape[0] for f in self._as_list(self.fake_features)))
        if available < 2:
            raise RuntimeError("KID needs at least 2 images in each set")
        self.subset_size = min(self.requested_subset_size, available)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return KernelInceptionDistance.compute(self)

    def compute(self) -> torch.Tensor:
        return self.compute_with_std()[0]

    @staticmethod
    def _as_list(state) -> list[torch.Tensor]:
        return state if isinstance(state, list) else [state]


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE) -> torch.Tensor:
    """``scale`` x the biased (minimum-variance, V-statistic) MMD^2 estimate with a Gaussian RBF kernel.

    k(a, b) = exp(-||a - b||^2 / (2 sigma^2)); MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y),
    every mean over all pairs including i = j -- the estimator of the CMMD reference code
    (Gretton et al. 2012, eq. 5). Computed in float64.
    """
    x, y = x.double(), y.double()
    gamma = 1.0 / (2.0 * sigma**2)

    def kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.exp(-gamma * torch.cdist(a, b).square()).mean()

    return scale * (kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y))


class CMMD(torchmetrics.Metric):
    """CMMD (Jayasumana et al. 2024): MMD with a Gaussian RBF kernel (sigma 10) between the two sets'
    unit-normalised CLIP ViT-L/14-336 image embeddings, times 1000 (lower is better).

    ``embedder`` is anything with ``embed(images) -> (B, D)``: a :class:`CLIPEmbedder` of
    openai/clip-vit-large-patch14-336 for the published metric, or :class:`Precomputed`.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, embedder: nn.Module, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE, **kwargs) -> None:
        super().__init__(**kwargs)
        self.embedder = embedder
        self.sigma = sigma
        self.scale = scale
        self.add_state("real_embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("fake_embeddings", default=[], dist_reduce_fx="cat")

    def update(self, images: torch.Tensor, real: bool) -> None:
        embeddings = F.normalize(self.embedder.embed(images).double(), dim=-1)
        (self.real_embeddings if real else self.fake_embeddings).append(embeddings)

    def compute(self) -> torch.Tensor:
        return mmd_rbf(dim_zero_cat(self.real_embeddings), dim_zero_cat(self.fake_embeddings), self.sigma, self.scale)

    @classmethod
    def from_pretrained(cls, source: str | None = None, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> CMMD:
        from ..model_ids import CMMD_MODEL
        from .clip import CLIPEmbedder

        return cls(CLIPEmbedder.from_pretrained(source or CMMD_MODEL, device=device, dtype=dtype))
