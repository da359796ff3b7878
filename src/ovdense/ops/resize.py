"""Resizing as the papers' pipelines do it, and bilinear upsampling computed a band of rows at a time."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def short_side_size(height: int, width: int, short_side: int | None, max_long_side: int = 2048) -> tuple[int, int]:
    """(height, width) after resizing so the short side is `short_side`, the long side at most `max_long_side`,
    keeping the ratio; rounded as mmcv's `rescale_size` (`int(x + 0.5)`)."""
    if short_side is None:
        return height, width
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def resize_image(pixels: torch.Tensor, size: tuple[int, int], antialias: bool) -> torch.Tensor:
    """(3, H, W) values in [0, 255] -> (3, *size) bilinear (half-pixel centres), rounded to whole levels as an
    8-bit image is; without antialias it is cv2's INTER_LINEAR resize, which mmseg uses, up to rounding."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    out = F.interpolate(pixels[None].float(), size=size, mode="bilinear", align_corners=False, antialias=antialias)[0]
    return out.round().clamp(0, 255)


def linear_weights(n_out: int, n_in: int, device=None) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear interpolation weights, as F.interpolate(mode='bilinear',
    align_corners=False) computes them for an output size."""
    scale = n_in / n_out
    source = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
    low = source.floor().long().clamp_max(n_in - 1)
    high = torch.where(low < n_in - 1, low + 1, low)
    frac = (source - low).clamp(0, 1)
    weights = torch.zeros(n_out, n_in, dtype=torch.float64, device=device)
    rows = torch.arange(n_out, device=device)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights.float()


def upsampled_rows(maps: torch.Tensor, size: tuple[int, int], rows: int):
    """Bilinear resize (align_corners=False) of (K, h, w) maps to (K, H, W), yielded as (first row, (K, n, W))
    bands of at most `rows` rows, so that K x H x W is never held at once."""
    height, width = size
    if tuple(maps.shape[-2:]) == (height, width):
        for start in range(0, height, rows):
            yield start, maps[:, start:start + rows]
        return
    across = linear_weights(width, maps.shape[-1], maps.device).T  # (w, W)
    down = linear_weights(height, maps.shape[-2], maps.device)  # (H, h)
    for start in range(0, height, rows):
        band = torch.einsum("nh,khw->knw", down[start:start + rows], maps.float())
        yield start, band @ across
