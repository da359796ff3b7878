"""MaskCLIP and its training-free successors (SCLIP, ClearCLIP, NACLIP): dense labels straight from CLIP."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones import CLIPBackbone
from ..errors import UsageError
from ..presets import Protocol
from .base import DenseMethod

# MaskCLIP measures a position's confidence as the softmax of 100 x cosine over the classes.
_CONFIDENCE_SCALE = 100.0


def refine_output(cosine: torch.Tensor, keys: torch.Tensor, denoise: float = 0.0, smooth: float = 0.0
                  ) -> torch.Tensor:
    """MaskCLIP's prompt denoising and key smoothing (`maskclip_head.py`, `refine_output`), on one image or crop.

    cosine: (B, K, h, w) cosine similarities; keys: (B, C, h, w) key features.
    Prompt denoising (denoise > 0): a class whose confidence softmax(100 x cosine) stays under `denoise` at every
    position gets cosine -100 everywhere. Key smoothing (smooth > 0): the output becomes the confidences, and
    positions whose best confidence is under `smooth` take sum_j (k_i . k_j) conf_j, with each key channel
    L2-normalised over the positions (the official code's `F.normalize` of (B, h*w, C) keys along dim 1).
    Returns (B, K, h, w): cosines (smoothing off) or confidences (smoothing on).
    """
    batch, classes, height, width = cosine.shape
    if denoise > 0:
        confidence = (cosine * _CONFIDENCE_SCALE).softmax(dim=1).flatten(2).amax(dim=2)  # (B, K)
        cosine = cosine.masked_fill((confidence < denoise)[:, :, None, None], -100.0)
    if smooth <= 0:
        return cosine
    probs = (cosine * _CONFIDENCE_SCALE).softmax(dim=1).flatten(2).transpose(1, 2)  # (B, N, K)
    k = F.normalize(keys.flatten(2).transpose(1, 2), dim=1)  # (B, N, C), unit norm over positions
    smoothed = (k @ k.transpose(1, 2)) @ probs  # (B, N, K)
    unsure = probs.amax(dim=-1, keepdim=True) < smooth
    probs = torch.where(unsure, smoothed, probs)
    return probs.transpose(1, 2).reshape(batch, classes, height, width)


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
            raise UsageError(f"dense mode {mode!r} is not available for {backbone.name}; "
                             f"choose one of {', '.join(backbone.supported_modes())}")
        self.mode = mode

    @torch.no_grad()
    def embed_crops(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised crops -> {'features': (B, D, h, w) unit-norm, 'keys': (B, C, h, w)}."""
        dense = self.backbone.dense_features(crops, self.mode)
        return {"features": F.normalize(dense.features.float(), dim=1), "keys": dense.keys.float()}

    def score_kind(self, protocol: Protocol) -> str:
        """Key smoothing turns the cosines into confidences."""
        return "probability" if protocol.key_smoothing > 0 else "cosine"

    @torch.no_grad()
    def crop_logits(self, embedded: dict[str, torch.Tensor], text: torch.Tensor, protocol: Protocol | None = None
                    ) -> torch.Tensor:
        """Cosine similarity of every position with every text: (B, D, h, w) x (Q, D) -> (B, Q, h, w), refined by
        MaskCLIP's prompt denoising and key smoothing where the protocol asks (see `refine_output`)."""
        features = embedded["features"]
        cosine = torch.einsum("bdhw,qd->bqhw", features, text.to(features))
        if protocol is None:
            return cosine
        return refine_output(cosine, embedded["keys"], protocol.prompt_denoising, protocol.key_smoothing)
