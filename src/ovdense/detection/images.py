"""Detector input: detectron2's ResizeShortestEdge and normalisation, and batching by zero padding."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge: the short side to `short`, unless the long side would pass `max_size`;
    sizes rounded with int(x + 0.5)."""
    scale = short / min(height, width)
    if max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def prepare_image(rgb: np.ndarray, short: int, max_size: int, mean, std, device="cpu") -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, h, w) float tensor resized (bilinear, antialiased) and normalised with mean / std
    (in [0, 1] units)."""
    height, width = rgb.shape[:2]
    size = shortest_edge_size(height, width, short, max_size)
    pixels = torch.from_numpy(np.array(rgb)).to(device).permute(2, 0, 1).float()[None] / 255
    if size != (height, width):
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    pixels = (pixels[0] - torch.tensor(mean, device=device)[:, None, None]) / torch.tensor(std, device=device)[:, None, None]
    return pixels


def pad_batch(images: list[torch.Tensor], divisible: int = 1, minimum: int = 1) -> torch.Tensor:
    """[(3, h_i, w_i)] -> (B, 3, H, W) zero-padded at the bottom and right; H, W multiples of `divisible`, and at
    least `minimum` (a thin image must survive the backbone's downsampling)."""
    height = -(-max(minimum, *(i.shape[1] for i in images)) // divisible) * divisible
    width = -(-max(minimum, *(i.shape[2] for i in images)) // divisible) * divisible
    batch = images[0].new_zeros(len(images), 3, height, width)
    for out, image in zip(batch, images):
        out[:, :image.shape[1], :image.shape[2]] = image
    return batch
