"""MaskCLIP and its training-free successors (SCLIP, ClearCLIP, NACLIP): dense labels straight from CLIP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones import CLIPBackbone
from ..presets import Protocol
from .base import DenseMethod

# MaskCLIP measures a position's confidence as the softmax of 100 x cosine over the classes.
_CONFIDENCE_SCALE = 100.0


def key_smoothing(cosine: torch.Tensor, keys: torch.Tensor, threshold: float) -> torch.Tensor:
    """MaskCLIP's key smoothing. cosine: (B, K, h, w); keys: (B, C, h, w) -> (B, K, h, w).

    Positions whose confidence (max softmax probability) is below `threshold` take the average of
    all positions' scores weighted by the (non-negative, row-normalised) cosine affinity of keys.
    """
    batch, classes, height, width = cosine.shape
    scores = cosine.flatten(2)  # (B, K, N)
    k = F.normalize(keys.flatten(2), dim=1)
    affinity = (k.transpose(1, 2) @ k).clamp_min(0)  # (B, N, N)
    affinity = affinity / affinity.sum(dim=-1, keepdim=True)
    smoothed = scores @ affinity.transpose(1, 2)  # (B, K, N)
    unsure = (scores * _CONFIDENCE_SCALE).softmax(dim=1).amax(dim=1, keepdim=True) < threshold
    return torch.where(unsure, smoothed, scores).view(batch, classes, height, width)


class MaskCLIP(DenseMethod):
    """Training-free open-vocabulary segmentation from a CLIP backbone.

    mode: the dense-feature switch of `CLIPBackbone.dense_features` ('maskclip', 'sclip',
        'clearclip', 'naclip', 'plain').
    Inference follows `DenseMethod`: embed_crops caches the pixels, crop_logits adds any vocabulary.
    """

    name = "maskclip"

    def __init__(self, backbone: CLIPBackbone, mode: str = "maskclip"):
        super().__init__(backbone)
        if mode not in backbone.supported_modes():
            raise ValueError(f"dense mode {mode!r} is not available for {backbone.name}; "
                             f"choose one of {', '.join(backbone.supported_modes())}")
        self.mode = mode

    @torch.no_grad()
    def embed_crops(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised crops -> {'features': (B, D, h, w) unit-norm, 'keys': (B, C, h, w)}."""
        dense = self.backbone.dense_features(crops, self.mode)
        return {"features": F.normalize(dense.features.float(), dim=1), "keys": dense.keys.float()}

    @torch.no_grad()
    def crop_logits(self, embedded: dict[str, torch.Tensor], text: torch.Tensor, protocol: Protocol | None = None
                    ) -> torch.Tensor:
        """Cosine similarity of every position with every text: (B, D, h, w) x (Q, D) -> (B, Q, h, w)."""
        features = embedded["features"]
        cosine = torch.einsum("bdhw,qd->bqhw", features, text.to(features))
        if protocol is not None and protocol.key_smoothing > 0:
            cosine = key_smoothing(cosine, embedded["keys"], protocol.key_smoothing)
        return cosine
