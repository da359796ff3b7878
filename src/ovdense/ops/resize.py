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


def _linear_taps(n_out: int, n_in: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of n_out positions, the two source indices and the weight of the second, as F.interpolate
    (mode='bilinear', align_corners=False) computes them for an output size."""
    source = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    low = source.floor().long().clamp_max(n_in - 1)
    high = torch.where(low < n_in - 1, low + 1, low)
    return low, high, (source - low).clamp(0, 1).float()


def upsampled_rows(maps: torch.Tensor, size: tuple[int, int], rows: int):
    """Bilinear resize (align_corners=False) of (K, h, w) maps to (K, H, W), yielded as (first row, (K, n, W))
    bands of at most `rows` rows, so that K x H x W is never held at once."""
    height, width = size
    low, high, frac = _linear_taps(height, maps.shape[-2], maps.device)
    for start in range(0, height, rows):
        stop = min(start + rows, height)
        weight = frac[start:stop, None]
        band = maps[:, low[start:stop]] * (1 - weight) + maps[:, high[start:stop]] * weight  # (K, n, w)
        if band.shape[-1] != width:  # the rows are already at their height: only the width is resized
            band = F.interpolate(band[None].float(), size=(stop - start, width), mode="bilinear",
                                 align_corners=False)[0]
        yield start, band
