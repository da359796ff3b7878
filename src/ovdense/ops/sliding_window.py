"""Sliding-window crops, their padding to the patch size, and merging of per-window predictions."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Window = tuple[int, int, int, int]  # (y0, y1, x0, x1)


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


Padding = tuple[int, int, int, int]  # (left, right, top, bottom)


def crop_padding(height: int, width: int, patch: int, to_multiple: bool, min_patches: int = 1) -> Padding:
    """Centred zero padding of a (height, width) crop: to a multiple of `patch` (ClearCLIP, TCL) when `to_multiple`,
    and in any case to at least `min_patches` patches, so that the patch embedding sees a whole patch (and a head
    that pools, enough of them)."""
    def split(size: int) -> tuple[int, int]:
        target = -(-size // patch) * patch if to_multiple else size
        target = max(target, patch * min_patches)
        return (target - size) // 2, target - size - (target - size) // 2
    return (*split(width), *split(height))


def crop_windows(image: torch.Tensor, windows: list[Window], padding: Padding = (0, 0, 0, 0)) -> torch.Tensor:
    """(C, H, W) image -> (N, C, h, w) crops, one per window (all windows have the same size), zero-padded."""
    return F.pad(torch.stack([image[:, y0:y1, x0:x1] for y0, y1, x0, x1 in windows]), padding)


def merge_windows(logits: torch.Tensor, windows: list[Window], size: tuple[int, int],
                  padding: Padding = (0, 0, 0, 0)) -> torch.Tensor:
    """(N, K, h', w') per-window logits -> (K, H, W): each (padded) window upsampled to its padded box, the padding
    cut off, overlaps averaged (mmseg's slide inference)."""
    total = logits.new_zeros((logits.shape[1], *size))
    count = logits.new_zeros((1, *size))
    left, right, top, bottom = padding
    for window_logits, (y0, y1, x0, x1) in zip(logits, windows):
        padded = (y1 - y0 + top + bottom, x1 - x0 + left + right)
        up = F.interpolate(window_logits[None], size=padded, mode="bilinear", align_corners=False)[0]
        total[:, y0:y1, x0:x1] += up[:, top:top + y1 - y0, left:left + x1 - x0]
        count[:, y0:y1, x0:x1] += 1
    return total / count
