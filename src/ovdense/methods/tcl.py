"""TCL (Cha et al., CVPR 2023): open-vocabulary segmentation learned from image-caption pairs only.

The grounder keeps CLIP frozen. From the tokens before CLIP's last block it runs a trainable copy of
that block (MaskCLIP's value path, with its residual and FFN), straight into a grounding decoder (gated
residual convolutions, two 2x upsamplings; no LayerNorm before it: the official `encoders.py` replaces
`ln_post` by Identity before `masker.py` copies the tower) and a trainable copy of CLIP's ln_post and
projection, giving dense embeddings at 4x the patch resolution. A text t grounds a mask
M = sigmoid(w * cos(dense, t) + b) with learnable w, b.

Training losses (each a function below): image-level TCL (the image masked by the hard, straight-
through Gumbel mask is re-encoded by the frozen CLIP and matched to its text), feature-level TCL
(mask-pooled dense embeddings against the texts of the batch), area priors on the positive and
negative masks, and total variation of the masks and the dense embeddings. Every computation follows
kakaobrain/tcl (models/tcl/*.py); `ovdense.convert.tcl` reads its released tcl.pth.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import CLIPBackbone
from ..distributed import gather_with_grad
from ..ops import PAMR
from ..presets import Protocol
from ..text import TextEmbeddingCache
from .base import DenseMethod


_NORM_EPS = 1e-6  # the official code normalises every embedding with this eps (us.normalize)


def _unit(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x scaled to unit L2 norm along `dim`."""
    return F.normalize(x, dim=dim, eps=_NORM_EPS)


# ----------------------------------------------------------------------------------------- losses
def gumbel_sigmoid(logits: torch.Tensor, tau: float = 1.0, hard: bool = True) -> torch.Tensor:
    """Sample sigmoid((logits + logistic noise) / tau), the noise log(u / (1 - u)) of u = rand_like(logits); with
    `hard`, binarise at 0.5 with straight-through gradients."""
    u = torch.rand_like(logits)
    soft = torch.sigmoid((logits + torch.log(u / (1 - u))) / tau)
    if not hard:
        return soft
    return (soft > 0.5).to(soft.dtype) - soft.detach() + soft


def tv_loss(x: torch.Tensor) -> torch.Tensor:
    """Total variation of (B, C, H, W): mean absolute difference of horizontal plus vertical neighbours."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def area_loss(masks: torch.Tensor, prior: float) -> torch.Tensor:
    """|mean mask value - prior|: the masks' average area pulled towards `prior` (a fraction of the image)."""
    return (masks.mean() - prior).abs()


def masked_pool(dense: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mask-weighted average: dense (B, C, H, W), masks (B, N, H, W) -> (B, N, C)."""
    weights = masks / (masks.sum(dim=(2, 3), keepdim=True) + eps)
    return torch.einsum("bchw,bnhw->bnc", dense, weights)


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of matching rows: image (B, C), text (B, C); negatives from all ranks under DDP."""
    image, text = _unit(image, -1), _unit(text, -1)
    all_text, offset = gather_with_grad(text)
    all_image, _ = gather_with_grad(image)
    labels = torch.arange(len(image), device=image.device) + offset
    scale = logit_scale.exp().clamp(max=100)
    return 0.5 * (F.cross_entropy(scale * image @ all_text.T, labels) + F.cross_entropy(scale * text @ all_image.T, labels))


def extended_info_nce(pooled: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE where image i has one embedding per text: pooled (B, N, C) (N = texts of all ranks), text (B, C).

    Image-to-text: row i scores pooled[i, j] against text j. Text-to-image: text j scores the
    embeddings that every image pooled for it, pooled[:, j].
    """
    pooled, text = _unit(pooled, -1), _unit(text, -1)
    all_text, offset = gather_with_grad(text)
    batch = len(text)
    labels = torch.arange(batch, device=text.device) + offset
    scale = logit_scale.exp().clamp(max=100)
    per_image = torch.einsum("bnc,nc->bn", pooled, all_text)
    mine, _ = gather_with_grad(pooled[:, offset:offset + batch].contiguous())  # (N, B, C): all images, my texts
    per_text = torch.einsum("nbc,bc->bn", mine, text)
    return 0.5 * (F.cross_entropy(scale * per_image, labels) + F.cross_entropy(scale * per_text, labels))


@dataclass
class TCLLossWeights:
    """The paper's weights: TCL terms 0.1, area priors 0.4 (positive prior 0.4, negative 0), TV 1.0."""

    tcl: float = 0.1
    area: float = 0.4
    area_prior: float = 0.4
    tv: float = 1.0


# ---------------------------------------------------------------------------------------- decoder
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedConv(nn.Module):
    """Pre-activation conv (norm, GELU, conv) scaled by tanh(gate), gate initialised at 0: (B, C, H, W) -> same."""

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        self.norm = LayerNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.gate) * self.conv(F.gelu(self.norm(x)))


class GroundingDecoder(nn.Module):
    """`layers` blocks of (2x nearest upsampling, two gated residual convs): (B, C, h, w) -> (B, C, h*2^layers, w*2^layers).

    The zero-initialised gates make the untrained decoder an upsampler of its input.
    """

    def __init__(self, channels: int, layers: int = 2, kernel_size: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleList([GatedConv(channels, kernel_size), GatedConv(channels, kernel_size)]) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for first, second in self.blocks:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = x + first(x)
            x = x + second(x)
        return x


# ----------------------------------------------------------------------------------------- method
class TCL(DenseMethod):
    """The TCL grounder over a frozen CLIP ViT, trainable with `losses`, usable by the predictor.

    decoder_layers, kernel_size: the grounding decoder (2 upsamplings, 3x3 in the paper).
    init_w, init_b: initial mask scale and bias (10, -2.5); gumbel_tau: the Gumbel temperature.
    kp_weight: at inference, weight of the frozen CLIP's own MaskCLIP masks sigmoid((cos - kp_offset) *
        kp_scale) mixed into TCL's masks (0.3, 0.25, 10 in the released evaluation).
    """

    name = "tcl"
    scores = "probability"
    pamr_on_masks = True

    def __init__(self, backbone: CLIPBackbone, decoder_layers: int = 2, kernel_size: int = 3, init_w: float = 10.0,
                 init_b: float = -2.5, gumbel_tau: float = 1.0, kp_weight: float = 0.3, kp_offset: float = 0.25,
                 kp_scale: float = 10.0):
        super().__init__(backbone)
        if backbone.arch != "vit":
            raise ValueError(f"TCL grounds ViT patch tokens; {backbone.name} is a {backbone.arch}. Use a ViT CLIP.")
        self.config = {"decoder_layers": decoder_layers, "kernel_size": kernel_size, "init_w": init_w,
                       "init_b": init_b, "gumbel_tau": gumbel_tau, "kp_weight": kp_weight, "kp_offset": kp_offset,
                       "kp_scale": kp_scale}
        backbone.requires_grad_(False)
        visual = backbone.visual
        self.block = copy.deepcopy(visual.transformer.resblocks[-1]).requires_grad_(True)
        width = visual.proj.shape[0]
        self.decoder = GroundingDecoder(width, decoder_layers, kernel_size)
        self.proj_norm = LayerNorm2d(width)
        self.proj_norm.load_state_dict(visual.ln_post.state_dict())
        self.proj = nn.Parameter(visual.proj.detach().clone())
        self.w = nn.Parameter(torch.tensor(float(init_w)))
        self.b = nn.Parameter(torch.tensor(float(init_b)))
        self.image_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.feature_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.gumbel_tau = gumbel_tau
        self.kp_weight, self.kp_offset, self.kp_scale = kp_weight, kp_offset, kp_scale

    def train(self, mode: bool = True) -> "TCL":
        super().train(mode)
        self.backbone.eval()  # CLIP is frozen, always in eval mode
        return self

    @property
    def upsampling(self) -> int:
        return 2 ** len(self.decoder.blocks)

    def embed_text(self, queries: list[str], templates: tuple[str, ...], cache: TextEmbeddingCache) -> torch.Tensor:
        """(Q,) names -> (Q, D): the mean of the raw template embeddings, normalised (as the official evaluation)."""
        return cache.embed(self.backbone, queries, templates, raw_mean=True)

    def ground(self, tokens: torch.Tensor, grid: tuple[int, int], train_block: bool = True) -> torch.Tensor:
        """CLIP tokens before the last block (B, 1 + h*w, width) -> dense embeddings (B, D, h*u, w*u), u = 4."""
        with torch.set_grad_enabled(train_block and torch.is_grad_enabled()):
            x, _ = self.backbone.vit_last_block(tokens, "maskclip", grid, block=self.block, with_keys=False)
        x = x[:, 1:].transpose(1, 2).reshape(len(x), -1, *grid)
        x = self.proj_norm(self.decoder(x))
        return torch.einsum("bchw,cd->bdhw", x, self.proj.to(x.dtype))

    def mask_logits(self, dense: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """w * cos(dense, text) + b: dense (B, D, H, W), text (N, D) -> (B, N, H, W)."""
        cosine = torch.einsum("bdhw,nd->bnhw", _unit(dense, 1), _unit(text, -1))
        return self.w * cosine + self.b

    def losses(self, images: torch.Tensor, texts: list[str], weights: TCLLossWeights, train_block: bool = True
               ) -> dict[str, torch.Tensor]:
        """All TCL losses for normalised images (B, 3, H, W) and their texts; 'loss' is the weighted sum.

        train_block=False trains the decoder only (the paper's first phase).
        """
        with torch.no_grad():
            tokens, grid = self.backbone.vit_tokens(images, depth=-1)
            text = self.backbone.encode_text(texts, truncate=True).float()
        dense = self.ground(tokens, grid, train_block)  # (B, D, H', W')
        all_text, offset = gather_with_grad(text)
        logits = self.mask_logits(dense, all_text)  # (B, N, H', W'), N = texts of all ranks
        batch = len(images)
        mine = torch.arange(batch, device=images.device)
        soft = torch.sigmoid(logits)
        positive = soft[mine, mine + offset][:, None]  # (B, 1, H', W')
        negative_select = torch.ones(soft.shape[:2], dtype=torch.bool, device=soft.device)
        negative_select[mine, mine + offset] = False
        negative = soft[negative_select]  # (B * (N - 1), H', W')

        out = {"area_loss": weights.area * area_loss(positive, weights.area_prior),
               "neg_area_loss": weights.area * area_loss(negative, 0.0),
               "tv_mask_loss": weights.tv * tv_loss(soft),
               "tv_dense_loss": weights.tv * tv_loss(dense)}
        pooled = masked_pool(dense, soft)  # (B, N, D)
        out["feature_tcl_loss"] = weights.tcl * extended_info_nce(pooled, text, self.feature_logit_scale)
        hard = gumbel_sigmoid(logits, self.gumbel_tau, hard=True)  # noise for every (image, text), as officially
        hard = F.interpolate(hard[mine, mine + offset][:, None], size=images.shape[-2:], mode="nearest")
        masked_embedding = self.backbone.encode_image(hard * images).float()
        out["image_tcl_loss"] = weights.tcl * info_nce(masked_embedding, text, self.image_logit_scale)
        out["loss"] = sum(out.values())
        out["positive_area"] = positive.detach().mean()
        return out

    # ------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def embed_crops(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, H, W) -> {'dense': (B, D, 4h, 4w) TCL embeddings, 'clip': (B, D, h, w) frozen MaskCLIP ones, unit
        norm; 'pixels': (B, 3, 4h, 4w) the crops at mask resolution, for PAMR}."""
        tokens, grid = self.backbone.vit_tokens(crops, depth=-1)
        dense = self.ground(tokens, grid).float()
        x, _ = self.backbone.vit_last_block(tokens, "maskclip", grid, with_keys=False)
        visual = self.backbone.visual
        clip = (visual.ln_post(x[:, 1:]) @ visual.proj).float().transpose(1, 2).reshape(len(x), -1, *grid)
        pixels = F.interpolate(crops.float(), size=dense.shape[-2:], mode="bilinear", align_corners=True)
        return {"dense": _unit(dense, 1), "clip": _unit(clip, 1), "pixels": pixels}

    @torch.no_grad()
    def crop_logits(self, embedded: dict[str, torch.Tensor], text: torch.Tensor, protocol: Protocol | None = None
                    ) -> torch.Tensor:
        """Soft masks in [0, 1]: (B, Q, 4h, 4w), TCL's masks (refined by PAMR at this resolution when the protocol
        says pamr_at='mask', as the official code) mixed with `kp_weight` of MaskCLIP's."""
        text = text.to(embedded["dense"])
        masks = torch.sigmoid(self.mask_logits(embedded["dense"], text))
        if protocol is not None and protocol.pamr_iterations > 0 and protocol.pamr_at == "mask":
            masks = PAMR(protocol.pamr_iterations, protocol.pamr_dilations)(embedded["pixels"], masks)
        if self.kp_weight > 0:
            cosine = torch.einsum("bdhw,qd->bqhw", embedded["clip"], _unit(text, -1))
            kp = torch.sigmoid((cosine - self.kp_offset) * self.kp_scale)
            kp = F.interpolate(kp, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            masks = self.kp_weight * kp + (1 - self.kp_weight) * masks
        return masks
