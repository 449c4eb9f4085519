"""Per-image metrics of the SISO evaluation, as torchmetrics metrics.

One interface for all: images are (B, 3, H, W) floats in [0, 1]; ``score(...)`` gives one number
per image, ``update(...)`` accumulates them and ``compute()`` is their mean; each class says
whether ``higher_is_better`` and whether it ``is_differentiable`` (w.r.t. the images). Being
``torchmetrics.Metric`` subclasses, they move with ``.to(device)`` and sync across processes.
References (the subject photo) may be a single image, which is compared with every image.

- identity: :class:`DINOScore`, :class:`IRScore`, :class:`CLIPIScore` -- cosine similarity of
  embeddings, both images first cropped to the subject when a cropper is given;
- prompt adherence: :class:`CLIPTScore` -- cosine of CLIP image and text embeddings;
- background preservation: :class:`BackgroundLPIPS` -- LPIPS with the subject masked out;
- diversity: :class:`DiversityMSE` -- mean squared error to the subject photo.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..model_ids import CLIP_MODEL, DINO_MODEL
from ._deps import require
from .cropping import Cropper, crop_to_boxes

torchmetrics = require("torchmetrics", "The benchmark metrics")
from torchmetrics.utilities import dim_zero_cat  # noqa: E402


def _labels(labels: str | Sequence[str] | None, count: int) -> list[str]:
    if labels is None:
        raise ValueError("cropping to the subject needs the subject's class name (labels)")
    if isinstance(labels, str):
        return [labels] * count
    if len(labels) == 1:
        return list(labels) * count
    if len(labels) != count:
        raise ValueError(f"{count} images but {len(labels)} labels")
    return list(labels)


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be (B, 3, H, W) images in [0, 1], got shape {tuple(images.shape)}")


def _broadcast(reference: torch.Tensor, count: int, name: str) -> torch.Tensor:
    _check_images(reference, name)
    if reference.shape[0] == 1:
        return reference.expand(count, *reference.shape[1:])
    if reference.shape[0] != count:
        raise ValueError(f"{name} has {reference.shape[0]} images; expected 1 or {count}")
    return reference


def fit_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop to the aspect ratio of (height, width), then resize (bicubic, antialiased) to it."""
    h, w = images.shape[-2:]
    if h * width > w * height:  # too tall
        new_h = max(1, round(w * height / width))
        top = (h - new_h) // 2
        images = images[..., top : top + new_h, :]
    elif h * width < w * height:  # too wide
        new_w = max(1, round(h * width / height))
        left = (w - new_w) // 2
        images = images[..., :, left : left + new_w]
    if images.shape[-2:] != (height, width):
        images = F.interpolate(images, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return images.clamp(0, 1)


class PerImageMetric(torchmetrics.Metric):
    """A metric with one score per image: ``score`` computes them, ``update`` keeps them,
    ``per_image`` gives them back in order and ``compute`` averages them.

    Inputs are named alike across the metrics (``preds``, ``target`` the subject photo, ``labels``,
    ``prompts``, ``scene``, ``subject_mask``), and ``update`` takes exactly ``score``'s arguments,
    so a ``torchmetrics.MetricCollection`` of them is updated with one call and hands each metric
    the inputs it names.
    """

    full_state_update = False
    higher_is_better: bool = True
    is_differentiable: bool = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        # What a MetricCollection reads to pass each metric only the keyword inputs it takes.
        self._update_signature = inspect.signature(self.score)

    def score(self, *args, **kwargs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, *args, **kwargs) -> None:
        self.scores.append(self.score(*args, **kwargs))

    def per_image(self) -> torch.Tensor:
        """Every image's score since the last reset, in the order they were given."""
        return dim_zero_cat(self.scores)

    def compute(self) -> torch.Tensor:
        return self.per_image().mean()


class IdentitySimilarity(PerImageMetric):
    """Cosine similarity of embeddings of each image and the subject photo(s), in [-1, 1].

    ``embedder`` is anything with ``embed(images) -> (B, D)`` (siso's similarity models, CLIP).
    With a ``cropper`` both images are first cut to the subject's box (found for ``labels``);
    gradients then still reach the pixels inside the box.
    """

    higher_is_better = True
    is_differentiable = True

    def __init__(self, embedder: nn.Module, cropper: Cropper | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.embedder = embedder
        self.cropper = cropper
        # The last reference embedded (the subject photo, given again with every batch): the tensor
        # itself is kept, so ``is`` cannot match a new tensor at a reused address.
        self._reference: tuple[torch.Tensor, list[str] | None, torch.Tensor] | None = None

    def embed_images(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embed (1, 3, h, w) images of different sizes (crops) with one batched forward pass."""
        from ..similarity.base import SimilarityModel

        if not isinstance(self.embedder, SimilarityModel):
            return torch.cat([self.embedder.embed(image) for image in images])
        # SimilarityModel.embed, batched after the per-image preprocessing (which resizes to one size).
        dtype = next(self.embedder.parameters()).dtype
        pixels = torch.cat([self.embedder.preprocessing(image.float()) for image in images])
        return self.embedder(pixels.to(dtype)).float()

    def _embed(self, images: torch.Tensor, labels: list[str] | None) -> torch.Tensor:
        if self.cropper is None:
            return self.embedder.embed(images)
        return self.embed_images(crop_to_boxes(images, self.cropper(images, labels)))

    def score(self, preds: torch.Tensor, target: torch.Tensor,
              labels: str | Sequence[str] | None = None) -> torch.Tensor:
        """``preds`` (B, 3, H, W); ``target`` (B or 1, 3, H', W'); ``labels``: the subject's class."""
        _check_images(preds, "preds")
        count = preds.shape[0]
        names = _labels(labels, count) if self.cropper is not None else None
        if target.shape[0] == 1:  # one subject photo: embed it once, however many batches compare with it
            labels_one = names[:1] if names else None
            cached = self._reference
            if cached is None or cached[0] is not target or cached[1] != labels_one or torch.is_grad_enabled():
                cached = (target, labels_one, self._embed(_broadcast(target, 1, "target"), labels_one))
                if not torch.is_grad_enabled():
                    self._reference = cached
            reference = cached[2].expand(count, -1)
        else:
            reference = self._embed(_broadcast(target, count, "target"), names)
        return F.cosine_similarity(self._embed(preds, names), reference, dim=-1)

    def reset(self) -> None:
        super().reset()
        self._reference = None


class DINOScore(IdentitySimilarity):
    """Identity similarity with DINOv2's CLS embedding (instance-level; strongest on animals)."""

    @classmethod
    def from_pretrained(cls, source: str = DINO_MODEL, cropper: Cropper | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DINOScore:
        from ..similarity import DinoSimilarity

        return cls(DinoSimilarity.from_pretrained(source, device=device, dtype=dtype), cropper)


class IRScore(IdentitySimilarity):
    """Identity similarity with the GUIE-2022 image-retrieval embedding (item-level)."""

    @classmethod
    def from_pretrained(cls, source: str, cropper: Cropper | None = None, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> IRScore:
        from ..similarity import IRSimilarity

        return cls(IRSimilarity.from_pretrained(source, device=device, dtype=dtype), cropper)


class CLIPIScore(IdentitySimilarity):
    """CLIP-I: identity similarity with CLIP image embeddings (class-level)."""

    @classmethod
    def from_pretrained(cls, source: str | None = None, cropper: Cropper | None = None,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> CLIPIScore:
        from .clip import CLIPEmbedder

        return cls(CLIPEmbedder.from_pretrained(source or CLIP_MODEL, device=device, dtype=dtype), cropper)


class CLIPTScore(PerImageMetric):
    """CLIP-T: cosine similarity of CLIP's image embedding and the prompt's text embedding.

    A plain cosine in [-1, 1], as DreamBooth and ImagenHub report it (torchmetrics' CLIPScore
    is 100 * max(cos, 0)).
    """

    higher_is_better = True
    is_differentiable = True

    def __init__(self, clip: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.clip = clip

    def score(self, preds: torch.Tensor, prompts: str | Sequence[str]) -> torch.Tensor:
        _check_images(preds, "preds")
        prompts = _labels(prompts, preds.shape[0])
        return F.cosine_similarity(self.clip.embed(preds), self.clip.embed_text(prompts), dim=-1)

    @classmethod
    def from_pretrained(cls, source: str | None = None, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> CLIPTScore:
        from .clip import CLIPEmbedder

        return cls(CLIPEmbedder.from_pretrained(source or CLIP_MODEL, device=device, dtype=dtype))


LpipsNet = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_lpips_net(net_type: str = "alex") -> nn.Module:
    """torchmetrics' LPIPS network (its learned linear layers ship with torchmetrics).

    The backbone comes from torchvision, whose ImageNet weights are downloaded on first use.
    """
    require("torchvision", "LPIPS (its AlexNet/VGG backbone)")
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    return _NoTrainLpips(net=net_type)


class BackgroundLPIPS(PerImageMetric):
    """LPIPS between an edit and its input image outside the subject: lower means a better-kept background.

    As in ImagenHub's BG-LPIPS, both images are mapped to [-1, 1] and multiplied by the
    background mask (1 - subject mask), so the subject region is the same mid-grey in both, and
    LPIPS (AlexNet) compares the results. ``net`` is injectable: any ``net(a, b)`` on [-1, 1]
    images returning one distance per image; by default torchmetrics' LPIPS, which needs
    torchvision.
    """

    higher_is_better = False
    is_differentiable = True

    def __init__(self, net: LpipsNet | None = None, net_type: str = "alex", **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = net if net is not None else default_lpips_net(net_type)

    def score(self, preds: torch.Tensor, scene: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
        """``scene``: the input image(s) the edit started from; ``subject_mask``: (B or 1, [1,] H, W) in
        [0, 1], 1 on the subject (the edited region)."""
        _check_images(preds, "preds")
        target = _broadcast(scene, preds.shape[0], "scene")
        if target.shape[-2:] != preds.shape[-2:]:
            raise ValueError(f"preds {tuple(preds.shape[-2:])} and scene {tuple(target.shape[-2:])} differ in size")
        mask = subject_mask.to(preds.dtype)
        if mask.ndim == 3:
            mask = mask[:, None]
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != preds.shape[-2:]:
            raise ValueError(f"subject_mask must be (B, 1, H, W) or (B, H, W) matching the images, "
                             f"got {tuple(subject_mask.shape)}")
        background = 1.0 - mask
        distances = self.net((2 * preds - 1) * background, (2 * target - 1) * background)
        return distances.reshape(preds.shape[0])


class DiversityMSE(PerImageMetric):
    """Mean squared error (pixels in [0, 1]) between each image and the subject photo.

    Higher means the output is not a copy of the photo (less overfitting, more diversity), the
    reading the SISO paper gives it. The photo is centre-cropped and resized to the image's size.
    """

    higher_is_better = True
    is_differentiable = True

    def score(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``target``: the subject photo (one, or one per image)."""
        _check_images(preds, "preds")
        subject = fit_to(_broadcast(target, preds.shape[0], "target").to(preds.dtype), *preds.shape[-2:])
        return (preds - subject).square().flatten(1).mean(dim=1)
