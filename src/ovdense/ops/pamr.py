"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


_AROUND = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _neighbourhoods(x: torch.Tensor, dilations: tuple[int, ...], centre: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, P, H, W): the 8 neighbours at each dilation (replicate-padded), P = 8 * len(dilations),
    plus the pixel itself once per dilation when `centre` (P = 9 * len(dilations))."""
    height, width = x.shape[-2:]
    offsets = _AROUND + [(0, 0)] if centre else _AROUND
    shifted = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        shifted += [padded[..., d + dy * d:d + dy * d + height, d + dx * d:d + dx * d + width] for dy, dx in offsets]
    return torch.stack(shifted, dim=2)


class PAMR(nn.Module):
    """Refine masks by averaging each pixel over its neighbours, weighted by image similarity.

    Affinities: softmax over the 8 neighbours at every dilation of -|I_i - I_j| / (0.1 * local std),
    averaged over colour channels; then `iterations` steps of m_i <- sum_j a_ij m_j.
    """

    def __init__(self, iterations: int = 10, dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)):
        super().__init__()
        self.iterations = iterations
        self.dilations = tuple(dilations)

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, H, W); masks: (B, K, h, w) -> (B, K, H, W) refined."""
        masks = F.interpolate(masks.float(), size=image.shape[-2:], mode="bilinear", align_corners=True)
        image = image.float()
        std = _neighbourhoods(image, self.dilations, centre=True).std(dim=2, keepdim=True)
        diff = (image.unsqueeze(2) - _neighbourhoods(image, self.dilations)).abs()  # (B, 3, 8D, H, W)
        affinity = F.softmax((-diff / (1e-8 + 0.1 * std)).mean(dim=1, keepdim=True), dim=2)  # (B, 1, 8D, H, W)
        for _ in range(self.iterations):
            masks = (_neighbourhoods(masks, self.dilations) * affinity).sum(dim=2)
        return masks
