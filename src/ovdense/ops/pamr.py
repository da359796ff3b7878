"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as the official SCLIP / NACLIP / TCL code
computes it, in bounded memory."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_AROUND = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _shifted(x: torch.Tensor, dilations: tuple[int, ...], centre: bool = False):
    """Views of (B, C, H, W) `x` moved to each of the 8 neighbours at every dilation (replicate-padded), and to the
    pixel itself once per dilation when `centre`."""
    height, width = x.shape[-2:]
    offsets = _AROUND + [(0, 0)] if centre else _AROUND
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in offsets:
            yield padded[..., d + dy * d:d + dy * d + height, d + dx * d:d + dx * d + width]


class PAMR(nn.Module):
    """Refine masks by averaging each pixel over its neighbours, weighted by image similarity.

    Affinities: softmax over the 8 neighbours at every dilation of -|I_i - I_j| / (1e-8 + 0.1 * local std)
    (std unbiased, over the 3x3 taps of all dilations), averaged over colour channels; then `iterations` steps
    of m_i <- sum_j a_ij m_j. Masks are refined `chunk` channels at a time, neighbour by neighbour, so memory
    stays near (8 * dilations + chunk) x H x W.
    """

    def __init__(self, iterations: int = 10, dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24), chunk: int = 16):
        super().__init__()
        self.iterations = iterations
        self.dilations = tuple(dilations)
        self.chunk = chunk

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) image -> (B, P, H, W) neighbour weights, P = 8 * len(dilations), summing to 1 over P."""
        image = image.float()
        std = torch.stack(list(_shifted(image, self.dilations, centre=True)), dim=2).std(dim=2)  # (B, 3, H, W)
        scale = 1e-8 + 0.1 * std
        logits = torch.stack([(-(image - n).abs() / scale).mean(dim=1) for n in _shifted(image, self.dilations)], 1)
        return logits.softmax(dim=1)

    def forward(self, image: torch.Tensor, masks: torch.Tensor, align_corners: bool = True,
                affinity: torch.Tensor | None = None) -> torch.Tensor:
        """image: (B, 3, H, W); masks: (B, K, h, w) -> (B, K, H, W) refined. The masks are first resized to the
        image bilinearly, a chunk at a time: align_corners=True inside the official PAMR module, False where the
        official code resizes logits to the image size before calling it (SCLIP, NACLIP).
        affinity: `self.affinity(image)` when the caller already has it (one image, many vocabularies)."""
        affinity = self.affinity(image) if affinity is None else affinity
        out = masks.new_empty((masks.shape[0], masks.shape[1], *image.shape[-2:]), dtype=torch.float32)
        for start in range(0, masks.shape[1], self.chunk):
            part = F.interpolate(masks[:, start:start + self.chunk].float(), size=image.shape[-2:], mode="bilinear",
                                 align_corners=align_corners)
            for _ in range(self.iterations):
                refined = torch.zeros_like(part)
                for p, neighbour in enumerate(_shifted(part, self.dilations)):
                    refined += neighbour * affinity[:, p:p + 1]
                part = refined
            out[:, start:start + part.shape[1]] = part
        return out
