"""Load and validate user photos; convert between PIL images and tensors in [0, 1].

Everything a camera or an editor can produce is accepted (EXIF rotation, grayscale, RGBA, CMYK,
palette, 16-bit); what cannot be a usable photo is refused with a message naming the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import SisoError
from .files import check_name_lengths

MIN_SIDE = 64
MAX_SIDE = 8192
# Reference photos are only ever resized down to a few hundred pixels for the similarity
# models; capping them here keeps a 8k photo from costing gigabytes as a float tensor.
MAX_WORKING_SIDE = 2048


def load_image(path: str | Path, role: str = "subject photo") -> Image.Image:
    """Open ``path`` as an upright RGB image, or raise :class:`SisoError` saying why not."""
    path = Path(path)
    check_name_lengths(path, f"The {role}")
    if not path.exists():
        raise SisoError(f"The {role} {path} does not exist; check the path.")
    if path.is_dir():
        raise SisoError(f"The {role} {path} is a directory; pass an image file (JPEG, PNG, WebP, ...).")
    if not path.is_file():  # a FIFO, a device such as /dev/zero: nothing an image is read from
        raise SisoError(f"The {role} {path} is not a regular file (a pipe or a device?); pass an image file.")
    if path.stat().st_size == 0:
        raise SisoError(f"The {role} {path} is empty (0 bytes); the download or copy may have failed.")
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its pixel limit; treat that as the bomb it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(image.size, path, role)
                image.load()
                image = ImageOps.exif_transpose(image)
    except SisoError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise SisoError(
            f"The {role} {path} claims an enormous size and looks like a decompression bomb; "
            "use an ordinary photo."
        ) from err
    except UnidentifiedImageError as err:
        raise SisoError(
            f"The {role} {path} is not an image format siso can read; use a JPEG, PNG or WebP file."
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        raise SisoError(f"The {role} {path} could not be read ({err}); the file may be truncated or corrupt.") from err
    return _to_rgb(image)


def _check_size(size: tuple[int, int], path: Path, role: str) -> None:
    width, height = size
    if min(width, height) < MIN_SIDE:
        raise SisoError(
            f"The {role} {path} is {width}x{height} pixels; each side must be at least {MIN_SIDE} px. "
            "Use a larger image."
        )
    if max(width, height) > MAX_SIDE:
        raise SisoError(
            f"The {role} {path} is {width}x{height} pixels; sides over {MAX_SIDE} px are refused. "
            "Downscale the photo first."
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (and 32-bit integer) grayscale: scale the real range onto 8 bits.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
        key = image.info.get("transparency")
        if isinstance(key, int):
            # A 16-bit colour key must be matched before scaling merges neighbouring values into it.
            alpha = Image.fromarray(np.where(array == key, 0, 255).astype(np.uint8), mode="L")
            gray = Image.merge("LA", (gray, alpha))
        image = gray
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        # Palettes, and the colour keys (PNG tRNS) that optimisers write instead of an alpha
        # channel: convert applies them, so the rule below makes those areas white too.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        # Transparent areas become white, as in most viewers, instead of arbitrary hidden colours.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def working_copy(image: Image.Image, max_side: int = MAX_WORKING_SIDE) -> Image.Image:
    """Shrink very large photos once, before they become float tensors."""
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 tensor in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) tensor in [0, 1] -> PIL image, quantised as diffusers does."""
    if image.ndim == 4:
        image = image[0]
    array = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((array * 255).round().astype(np.uint8))
