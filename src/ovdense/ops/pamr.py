"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _neighbourhoods(x: torch.Tensor, dilations: tuple[int, ...]) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, 9 * len(dilations), H, W): the 3x3 neighbourhood at each dilation (replicate-padded).

    Along dim 2, index 4 of each group of 9 is the centre pixel.
    """
    batch, channels, height, width = x.shape
    groups = []
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        groups.append(F.unfold(padded, kernel_size=3, dilation=d).view(batch, channels, 9, height, width))
    return torch.cat(groups, dim=2)


class PAMR(nn.Module):
    """Refine masks by averaging each pixel over its neighbours, weighted by image similarity.

    Affinities: softmax over the 8 neighbours at every dilation of -|I_i - I_j| / (0.1 * local std),
    averaged over colour channels; then `iterations` steps of m_i <- sum_j a_ij m_j.
    """

    def __init__(self, iterations: int = 10, dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)):
        super().__init__()
        self.iterations = iterations
        self.dilations = tuple(dilations)
        self._not_centre = [i for i in range(9 * len(self.dilations)) if i % 9 != 4]

    def forward(self, image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, H, W); masks: (B, K, h, w) -> (B, K, H, W) refined."""
        masks = F.interpolate(masks.float(), size=image.shape[-2:], mode="bilinear", align_corners=True)
        image = image.float()
        around = _neighbourhoods(image, self.dilations)  # (B, 3, 9D, H, W)
        std = around.std(dim=2, keepdim=True)
        diff = (image.unsqueeze(2) - around[:, :, self._not_centre]).abs()
        affinity = F.softmax((-diff / (1e-8 + 0.1 * std)).mean(dim=1, keepdim=True), dim=2)  # (B, 1, 8D, H, W)
        for _ in range(self.iterations):
            masks = (_neighbourhoods(masks, self.dilations)[:, :, self._not_centre] * affinity).sum(dim=2)
        return masks
