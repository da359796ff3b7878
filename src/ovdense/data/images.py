"""Reading images safely: any file PIL reads, any mode, EXIF orientation applied, size checked first.

Non-8-bit data is mapped to 0..255 as follows (anything else is refused with an ImageError, never clipped):
  files   16-bit ('I;16*')            / 65535
          32-bit integer ('I')         values within 0..255 as they are, within 0..65535 / 65535
          32-bit float ('F')           values within [0, 1] x 255, within [0, 255] as they are
          1-bit ('1')                  0 / 255
  arrays  uint8 as it is, uint16 / 257, bool 0 / 255, other integers within 0..255 as they are,
          float within [0, 1] x 255 (the usual convention for float images)
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

MAX_PIXELS = 80_000_000  # a 10k x 8k image; larger ones are refused before decoding


class ImageError(InputError):
    """The input is not a usable image."""


def _gray_to_uint8(values: np.ndarray, integer: bool, name: str) -> np.ndarray:
    """(H, W) 32-bit integer or float pixel values -> (H, W) uint8, by the ranges in the module docstring."""
    low, high = float(values.min()), float(values.max())  # NaN propagates and fails both tests below
    if integer and 0 <= low and high <= 65535:
        scale = 1.0 if high <= 255 else 255 / 65535
    elif not integer and 0 <= low and high <= 255:
        scale = 255.0 if high <= 1 else 1.0
    else:
        expected = "integer values within 0..65535" if integer else "float values within [0, 1] or [0, 255]"
        raise ImageError(f"{name}: expected {expected}, but they span [{low:g}, {high:g}]; "
                         "convert it to an 8-bit image first")
    return (values.astype(np.float64) * scale).round().astype(np.uint8)


def _to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB; transparency is composited on white, 16/32-bit rescaled."""
    if image.mode.startswith("I;16"):
        gray = (np.asarray(image, dtype=np.float64) * (255 / 65535)).round().astype(np.uint8)
    elif image.mode in ("I", "F"):
        gray = _gray_to_uint8(np.asarray(image), image.mode == "I", name)
    elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    else:
        try:
            return np.asarray(image.convert("RGB"))
        except ValueError as error:  # e.g. LAB, which PIL cannot convert
            raise ImageError(f"{name}: cannot convert PIL mode {image.mode} to RGB ({error})") from error
    return np.repeat(gray[..., None], 3, axis=2)


def _pil_to_rgb(image: Image.Image, name: str, max_pixels: int) -> np.ndarray:
    """Check the size from the header, then decode (first frame), apply the EXIF orientation, convert."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} is {width * height / 1e6:.0f} megapixels, over the limit of "
                         f"{max_pixels / 1e6:.0f}; downscale it first or raise the limit")
    if width == 0 or height == 0:
        raise ImageError(f"{name}: the image is empty (0 pixels)")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # truncated or corrupt pixel data
        raise ImageError(f"{name}: the pixel data is damaged or truncated ({error})") from error
    return _to_rgb(ImageOps.exif_transpose(image), name)


def load_image(source, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A path, the bytes of an image file, a PIL image or an array -> (H, W, 3) uint8 RGB array.

    Arrays may be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); dtypes and value ranges as in the module
    docstring. Multi-frame files give their first frame. Raises ImageError, naming the file, for missing,
    unreadable, damaged, empty or over-large inputs; an over-large file is refused from its header,
    before any pixel is decoded. Limits above 2 x PIL.Image.MAX_IMAGE_PIXELS need that raised too.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, max_pixels)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, getattr(source, "filename", "") or "the image", max_pixels)
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("the image data is empty (0 bytes)")
        return _open_to_rgb(io.BytesIO(source), "the image data", max_pixels)
    path = Path(source)
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes)")
    return _open_to_rgb(path, str(path), max_pixels)


_COMMON_FORMATS = {"png", "jpeg", "webp", "tiff", "bmp", "gif"}


def _open_to_rgb(file, name: str, max_pixels: int) -> np.ndarray:
    """Open a path or binary file with PIL (refusing a decompression bomb from its header), then `_pil_to_rgb`."""
    try:
        with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS; our own limit speaks instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name}: over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, too many to decode safely "
                         f"(PIL: {error}); downscale it first") from error
    except UnidentifiedImageError as error:
        formats = ", ".join(sorted({f.lower() for f in Image.registered_extensions().values()} & _COMMON_FORMATS))
        raise ImageError(f"{name}: not an image PIL can read (it reads {formats}, ...); the file is of another kind "
                         "or damaged") from error
    except OSError as error:  # e.g. no read permission
        raise ImageError(f"{name}: cannot be read ({error.strerror or error})") from error
    with image:
        return _pil_to_rgb(image, name, max_pixels)


def _array_to_rgb(array: np.ndarray, max_pixels: int) -> np.ndarray:
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape[:2]:
        raise ImageError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got shape {array.shape}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise ImageError(f"the array has {array.shape[0] * array.shape[1] / 1e6:.0f} megapixels, over the limit")
    if array.dtype == np.uint16:
        array = (array.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind not in "iuf":
        raise ImageError(f"unsupported image array dtype {array.dtype}")
    elif array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        integer = array.dtype.kind in "iu"
        if not (0 <= low and high <= (255 if integer else 1)):
            expected = "0..255" if integer else "[0, 1]"
            raise ImageError(f"{array.dtype} image arrays must hold values within {expected}, but these span "
                             f"[{low:g}, {high:g}]; rescale the array or pass uint8")
        array = (array.astype(np.float64) * (1 if integer else 255)).round().astype(np.uint8)
    return _to_rgb(Image.fromarray(array.squeeze(2) if array.shape[2] == 1 else array), "the array")


def to_tensor(image: np.ndarray, mean, std, size: int | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) normalised float tensor."""
    if size is not None and image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(255)
    return (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
