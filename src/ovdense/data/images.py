"""Reading images safely: any file PIL reads, any mode, EXIF orientation applied, size checked first."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 80_000_000  # a 10k x 8k image; larger ones are refused before decoding


class ImageError(ValueError):
    """The input is not a usable image."""


def _to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB; transparency is composited on white, 16-bit/float rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def load_image(source, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A path, PIL image or array -> (H, W, 3) uint8 RGB array.

    Arrays may be (H, W), (H, W, 3) or (H, W, 4), uint8, uint16 or float in [0, 1].
    Raises ImageError with the reason for unreadable, empty or over-large inputs.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_pixels)
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such file")
        try:
            image = Image.open(path)
        except (UnidentifiedImageError, OSError) as error:
            raise ImageError(f"{path}: not an image PIL can read ({error})") from error
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"{getattr(image, 'filename', 'image')}: {width}x{height} is {width * height / 1e6:.0f} "
                         f"megapixels, over the limit of {max_pixels / 1e6:.0f}; downscale it first or raise the limit")
    if width == 0 or height == 0:
        raise ImageError("the image is empty (0 pixels)")
    try:
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt pixel data
        raise ImageError(f"{getattr(image, 'filename', 'image')}: the pixel data is damaged ({error})") from error


def _array_to_rgb(array: np.ndarray, max_pixels: int) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape[:2]:
        raise ImageError(f"an image array must be (H, W), (H, W, 3) or (H, W, 4); got shape {array.shape}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise ImageError(f"the array has {array.shape[0] * array.shape[1] / 1e6:.0f} megapixels, over the limit")
    if array.dtype == np.uint16:
        array = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif array.dtype.kind == "f":
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"unsupported image array dtype {array.dtype}")
    return _to_rgb(Image.fromarray(array.squeeze(2) if array.shape[2] == 1 else array))


def to_tensor(image: np.ndarray, mean, std, size: int | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) normalised float tensor."""
    if size is not None and image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255)
    return (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
