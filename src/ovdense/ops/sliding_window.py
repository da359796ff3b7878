"""Short-side resizing and sliding-window crops, and merging of per-window predictions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Window = tuple[int, int, int, int]  # (y0, y1, x0, x1)


def short_side_size(height: int, width: int, short_side: int | None, max_long_side: int = 2048) -> tuple[int, int]:
    """The (height, width) after resizing so the short side is `short_side` (long side capped), keeping the ratio."""
    if short_side is None:
        return height, width
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def sliding_windows(height: int, width: int, crop: int | None, stride: int | None) -> list[Window]:
    """Windows of size min(crop, side) every `stride` pixels; the last one in each direction touches the border.

    crop=None gives one window over the whole image.
    """
    if crop is None:
        return [(0, height, 0, width)]
    stride = stride or crop
    windows = []
    crop_h, crop_w = min(crop, height), min(crop, width)
    rows = max(height - crop_h + stride - 1, 0) // stride + 1
    cols = max(width - crop_w + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y1, x1 = min(r * stride + crop_h, height), min(c * stride + crop_w, width)
            windows.append((y1 - crop_h, y1, x1 - crop_w, x1))
    return windows


def crop_windows(image: torch.Tensor, windows: list[Window]) -> torch.Tensor:
    """(C, H, W) image -> (N, C, h, w) crops, one per window (all windows have the same size)."""
    return torch.stack([image[:, y0:y1, x0:x1] for y0, y1, x0, x1 in windows])


def merge_windows(logits: torch.Tensor, windows: list[Window], size: tuple[int, int]) -> torch.Tensor:
    """(N, K, h', w') per-window logits -> (K, H, W): each window upsampled to its box, overlaps averaged."""
    total = logits.new_zeros((logits.shape[1], *size))
    count = logits.new_zeros((1, *size))
    for window_logits, (y0, y1, x0, x1) in zip(logits, windows):
        total[:, y0:y1, x0:x1] += F.interpolate(window_logits[None], size=(y1 - y0, x1 - x0), mode="bilinear",
                                                align_corners=False)[0]
        count[:, y0:y1, x0:x1] += 1
    return total / count
