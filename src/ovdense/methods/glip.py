"""GLIP (Li et al., CVPR 2022): detection as phrase grounding with deep vision-language fusion (microsoft/GLIP:
`vldyhead.py`, `fuse_helper.py`, `rpn/loss.py`, `rpn/inference.py`).

A prompt ("heart. red star. bar. " or a free caption) is tokenized; every anchor of an FPN (P3-P7, one square anchor
of side 8 x stride per location) gets alignment logits with every token, S = O P^T / exp(log_scale) + bias, and a
box. Before that, N layers of [bi-directional image-text cross-attention (all levels flattened into one sequence),
a text self-attention layer, a DyHead conv block (scale, deformable spatial and DyReLU task attention)] let image
and text features read each other. `fusion=False` drops the cross-attention and the text layers (GLIP-T(A)).
Training: ATSS assignment, token sigmoid focal loss, GIoU weighted by centerness, centerness BCE.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, generalized_box_iou_loss, stochastic_depth
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from ..backbones import CLIPBackbone
from ..errors import InputError
from ..detection import atss
from ..ops.deform_conv import deform_conv2d
from ..text.tokens import BertTokenText, CLIPTokenText, TokenizedText
from .base import NO_CLIP, TrainedModel
from .regionclip import freeze_resnet_tower

STRIDES = (8, 16, 32, 64, 128)
ANCHOR_SCALE = 8  # anchor side = 8 x stride: 64 .. 1024 px
PRIOR = 0.01
CLAMP = 50000.0
PRE_NMS_THRESHOLD = 0.05  # a phrase's score must pass this before centerness (ATSS.INFERENCE_TH)
PRE_NMS_TOP_N = 1000  # candidates kept per level and image
PROMPT_ROWS = 1000  # rows of the prompt-tuning table (GLIP's tunable_linear: Linear(768, 1000))
CACHED_PROMPTS = 32  # encoded prompts kept for inference (they depend on the text only)


def clamp(x: torch.Tensor) -> torch.Tensor:
    """GLIP's guard against fp16 overflow and underflow of attention logits: clamp to +-50000."""
    return x.clamp(min=-CLAMP, max=CLAMP)


# ------------------------------------------------------------------------------------------------ backbones
class CLIPPyramid(nn.Module):
    """C3-C5 maps (strides 8, 16, 32) from an open_clip image tower: ResNet layer2-4; a ViT's last block output
    resized to the three strides (a simple pyramid, as ViTDet's without its convolutions: the FPN's 1x1
    laterals follow).

    clip: the CLIPBackbone (its image tower is trained in place unless `frozen`).
    """

    def __init__(self, clip: CLIPBackbone, frozen: bool = False):
        super().__init__()
        self.clip = clip
        clip.visual.requires_grad_(not frozen)
        if clip.arch == "resnet":
            freeze_resnet_tower(clip.visual)  # FrozenBN, stem and layer1 frozen (detectron2's FREEZE_AT 2)
        probe = self(torch.zeros(1, 3, 64, 64, device=clip.device))
        self.channels = [m.shape[1] for m in probe]

    @property
    def image_mean(self) -> tuple[float, ...]:
        return self.clip.image_mean

    @property
    def image_std(self) -> tuple[float, ...]:
        return self.clip.image_std

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised -> [(B, C_i, ceil(H / s), ceil(W / s)) for s in 8, 16, 32]."""
        if self.clip.arch == "resnet":
            return [m.float() for m in self.clip.feature_maps(images, [1, 2, 3])]
        tokens = self.clip.feature_maps(images, [-1])[0].float()
        height, width = images.shape[-2:]
        return [F.interpolate(tokens, size=(-(-height // s), -(-width // s)), mode="bilinear", align_corners=False)
                for s in STRIDES[:3]]


SWIN = {  # GLIP's backbones (MODEL.SWINT of its configs) and timm's ImageNet model of the same layout (GLIP's init)
    "swin-t": {"embed_dim": 96, "depths": [2, 2, 6, 2], "heads": [3, 6, 12, 24], "window": 7, "drop_path": 0.2,
               "timm": "swin_tiny_patch4_window7_224"},  # GLIP-T
    "swin-l": {"embed_dim": 192, "depths": [2, 2, 18, 2], "heads": [6, 12, 24, 48], "window": 12, "drop_path": 0.4,
               "timm": "swin_large_patch4_window12_384"},  # GLIP-L
}
SWIN_ARCH = ("embed_dim", "depths", "heads", "window")  # what a `swin` override may change
SHIFT_MASK = -100.0  # the shifted windows' attention mask between tokens of different regions


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * H/w * W/w, w * w, C), windows row-major."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def _unwindow(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `_windows`: (B * nW, w * w, C) -> (B, H, W, C)."""
    channels = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


def shift_mask(height: int, width: int, window: int, shift: int, device=None) -> torch.Tensor:
    """The shifted windows' additive attention mask of a padded (height, width) map (swint.py `BasicLayer`): the map
    cut into 3 x 3 regions by the slices [0, -w), [-w, -shift), [-shift, end) of each axis; two tokens of one window
    in different regions get -100 -> (nW, w * w, w * w)."""
    regions = torch.zeros(1, height, width, 1, device=device)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, (rows, columns) in enumerate((r, c) for r in cuts for c in cuts):
        regions[:, rows, columns] = i
    labels = _windows(regions, window)[..., 0]  # (nW, w * w)
    return torch.where(labels[:, None, :] != labels[:, :, None], SHIFT_MASK, 0.0)


def relative_position_index(window: int) -> torch.Tensor:
    """(w * w, w * w) index into the (2w - 1)^2-row bias table of each pair of positions of a window."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)  # (w*w, w*w, 2)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with a learned relative-position bias per head."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B * nW, w * w, C), mask (nW, w * w, w * w) or None -> (B * nW, w * w, C)."""
        count, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(count, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias.reshape(tokens, tokens, -1).permute(2, 0, 1)
        if mask is not None:
            logits = (logits.reshape(-1, len(mask), self.heads, tokens, tokens) + mask[None, :, None])
            logits = logits.reshape(count, self.heads, tokens, tokens)
        return self.proj((logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(count, tokens, dim))


class SwinMlp(nn.Module):
    """Swin's feed-forward: fc1 (4x wider), exact GELU, fc2."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    """A Swin block as GLIP's `swint.py` runs it on any size: pre-norm window attention (the normalised map zero-padded
    at the bottom / right to whole windows, then cyclically shifted when `shift`), pre-norm MLP, stochastic depth."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, drop_path: float):
        super().__init__()
        self.window, self.shift, self.drop_path = window, shift, drop_path
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = SwinMlp(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, H, W, C); mask: `shift_mask` of the padded map -> (B, H, W, C)."""
        height, width = x.shape[1:3]
        w, s = self.window, self.shift
        y = F.pad(self.norm1(x), (0, 0, 0, -width % w, 0, -height % w))
        if s:
            y = torch.roll(y, (-s, -s), dims=(1, 2))
        y = _unwindow(self.attn(_windows(y, w), mask if s else None), w, *y.shape[1:3])
        if s:
            y = torch.roll(y, (s, s), dims=(1, 2))
        x = x + stochastic_depth(y[:, :height, :width], self.drop_path, "row", self.training)
        return x + stochastic_depth(self.mlp(self.norm2(x)), self.drop_path, "row", self.training)


class PatchMerging(nn.Module):
    """2 x 2 neighbours concatenated (x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] in (row, column);
    odd sizes zero-padded), layer-normed and projected to twice the width."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, ceil(H / 2), ceil(W / 2), 2C)."""
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """4 x 4 patches (the image zero-padded at the right / bottom to whole patches), projected and layer-normed."""

    def __init__(self, dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, ceil(H / 4), ceil(W / 4), C)."""
        height, width = images.shape[-2:]
        images = F.pad(images, (0, -width % self.patch, 0, -height % self.patch))
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


class SwinStage(nn.Module):
    """Patch merging (stages 1-3) then blocks alternating plain and shifted windows (shift = window // 2)."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, drop_paths: list[float], merge: bool):
        super().__init__()
        self.window = window
        self.downsample = PatchMerging(dim // 2) if merge else nn.Identity()
        self.blocks = nn.ModuleList([SwinBlock(dim, heads, window, window // 2 if j % 2 else 0, drop_paths[j])
                                     for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C_in) -> (B, H', W', dim)."""
        x = self.downsample(x)
        w, (height, width) = self.window, x.shape[1:3]
        mask = None  # one mask for the stage's shifted blocks (the odd ones)
        if len(self.blocks) > 1:
            mask = shift_mask(-(-height // w) * w, -(-width // w) * w, w, w // 2, x.device)
        for block in self.blocks:
            x = block(x, mask)
        return x


class SwinTransformer(nn.Module):
    """GLIP's Swin (maskrcnn_benchmark `swint.py`, v1, no absolute position embedding) under timm's parameter names
    (`layers_{i}`, patch merging at the start of stage i rather than the end of stage i - 1), so that timm's ImageNet
    weights load as they are. timm's own Swin cannot stand in for it: it shifts before padding to whole windows and
    drops the shift where a map is no larger than a window; GLIP pads first and always shifts."""

    def __init__(self, embed_dim: int, depths: list[int], heads: list[int], window: int, drop_path: float = 0.0):
        super().__init__()
        self.patch_embed = PatchEmbed(embed_dim)
        rates = torch.linspace(0, drop_path, sum(depths), device="cpu").tolist()
        for i, (depth, head) in enumerate(zip(depths, heads)):
            start = sum(depths[:i])
            self.add_module(f"layers_{i}", SwinStage(embed_dim * 2 ** i, depth, head, window,
                                                     rates[start:start + depth], merge=i > 0))
        self.stages = len(depths)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        """`SwinTransformer.init_weights`: truncated normal (0.02) linear weights, zero biases, unit LayerNorms."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> every stage's output [(B, H_i, W_i, C_i)], strides 4, 8, 16, 32."""
        x, out = self.patch_embed(images), []
        for i in range(self.stages):
            x = getattr(self, f"layers_{i}")(x)
            out.append(x)
        return out


class SwinPyramid(nn.Module):
    """GLIP's backbone: Swin-T (or Swin-L), stages 2-4 (strides 8, 16, 32), each stage output layer-normed (GLIP's
    norm1..3), any input size (padded to patches, windows and merges as GLIP does). Input: RGB normalised with
    ImageNet's mean / std (the converter turns GLIP's BGR 0-255 patch embedding into this).

    arch: changes to the variant's embed_dim, depths, heads or window (a tiny Swin for tests); pretrained: timm's
    ImageNet weights of the variant (GLIP's initialisation), downloaded once.
    """

    image_mean = (0.485, 0.456, 0.406)
    image_std = (0.229, 0.224, 0.225)

    def __init__(self, variant: str = "swin-t", frozen: bool = False, pretrained: bool = False,
                 arch: dict | None = None):
        super().__init__()
        unknown = set(arch or {}) - set(SWIN_ARCH)
        if unknown:
            raise InputError(f"swin may change {', '.join(SWIN_ARCH)}, not {', '.join(sorted(unknown))}")
        spec = {**SWIN[variant], **(arch or {})}
        self.swin = SwinTransformer(spec["embed_dim"], list(spec["depths"]), list(spec["heads"]), spec["window"],
                                    spec["drop_path"])
        self.channels = [spec["embed_dim"] * 2 ** i for i in (1, 2, 3)]
        self.norms = nn.ModuleList([nn.LayerNorm(c) for c in self.channels])
        if pretrained:
            if arch:
                raise InputError(f"timm has ImageNet weights for {variant} itself, not for a changed {variant}")
            self.swin.load_state_dict(_timm_swin_state(spec["timm"], variant))
        self.requires_grad_(not frozen)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_i, ceil(H / s), ceil(W / s)) for s in 8, 16, 32]."""
        maps = self.swin(images)[1:]
        return [norm(x).permute(0, 3, 1, 2) for norm, x in zip(self.norms, maps)]


def _timm_swin_state(name: str, variant: str) -> dict[str, torch.Tensor]:
    """timm's ImageNet weights of a Swin (downloaded once; the same names as `SwinTransformer`'s)."""
    try:
        import timm
    except ImportError as error:
        raise InputError("the ImageNet Swin weights come from timm: pip install 'ovdense[glip]'") from error
    try:
        return timm.create_model(name, pretrained=True, features_only=True, out_indices=(1, 2, 3)).state_dict()
    except (OSError, RuntimeError) as error:
        raise InputError(f"cannot load timm's ImageNet {variant} weights ({error}); online they download once, "
                         "offline set pretrained_image: false") from error


# -------------------------------------------------------------------------------------------------- fusion
class BiAttention(nn.Module):
    """Bi-directional multi-head attention (`BiMultiHeadAttention`): one logits tensor serves both directions.

    Image queries attend over the text tokens (padding masked); text queries attend over all image positions
    (no mask, as the official code). Logits are clamped to +-50000; the text side subtracts its row maximum first.

    Computed in a folded, exactly equal form: the image positions are never projected to the fusion width (2048 in
    GLIP-T). Per head h, q_h k_h^T = v (Wq_h^T k_h^T) + bq_h k_h^T, so the keys are folded into the query weights
    (v_dim x heads*T); the image-side output sum_h P_h (values_l)_h Wout_h^T folds the values into the output
    weights (heads*T x v_dim); the text side multiplies its attention by v before the value projection.
    """

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, heads: int, dropout: float = 0.1):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"fusion dim {embed_dim} is not a multiple of its {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.v_proj, self.l_proj = nn.Linear(v_dim, embed_dim), nn.Linear(l_dim, embed_dim)
        self.values_v_proj, self.values_l_proj = nn.Linear(v_dim, embed_dim), nn.Linear(l_dim, embed_dim)
        self.out_v_proj, self.out_l_proj = nn.Linear(embed_dim, v_dim), nn.Linear(embed_dim, l_dim)
        for layer in (self.v_proj, self.l_proj, self.values_v_proj, self.values_l_proj, self.out_v_proj,
                      self.out_l_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, v: torch.Tensor, l: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v (B, N, v_dim) image positions, l (B, T, l_dim) tokens, text_mask (B, T) bool -> updates (dv, dl)."""
        batch, tokens, heads = l.shape[0], l.shape[1], self.heads
        head_dim = self.v_proj.out_features // heads
        scale = head_dim ** -0.5
        keys = self.l_proj(l).reshape(batch, tokens, heads, head_dim) * scale  # (B, T, H, d)
        query_weight = self.v_proj.weight.reshape(heads, head_dim, -1)  # (H, d, v_dim)
        folded = torch.einsum("bthd,hdc->bcht", keys, query_weight).flatten(2)  # (B, v_dim, H*T)
        offset = torch.einsum("bthd,hd->bht", keys, self.v_proj.bias.reshape(heads, head_dim)).flatten(1)
        logits = clamp(torch.baddbmm(offset[:, None], v, folded)).reshape(batch, -1, heads, tokens)  # (B, N, H, T)

        image_side = logits.masked_fill(~text_mask[:, None, None, :], -9e15).softmax(dim=-1)  # over tokens
        image_side = F.dropout(image_side, self.dropout, self.training)
        values = self.values_l_proj(l).reshape(batch, tokens, heads, head_dim)
        out_weight = self.out_v_proj.weight.reshape(-1, heads, head_dim)  # (v_dim, H, d)
        value_out = torch.einsum("bthd,chd->bhtc", values, out_weight).flatten(1, 2)  # (B, H*T, v_dim)
        dv = torch.baddbmm(self.out_v_proj.bias, image_side.flatten(2), value_out)

        text_side = clamp(logits - logits.amax(dim=1, keepdim=True)).softmax(dim=1)  # over positions
        text_side = F.dropout(text_side, self.dropout, self.training).flatten(2)  # (B, N, H*T)
        attended = (text_side.transpose(1, 2) @ v).reshape(batch, heads, tokens, -1)  # (B, H, T, v_dim)
        value_weight = self.values_v_proj.weight.reshape(heads, head_dim, -1)  # (H, d, v_dim)
        dl = torch.einsum("bhtc,hdc->bthd", attended, value_weight)
        dl = dl + text_side.sum(dim=1).reshape(batch, heads, tokens).transpose(1, 2)[..., None] \
            * self.values_v_proj.bias.reshape(heads, head_dim)  # each weight row's sum times the value bias
        return dv, self.out_l_proj(dl.flatten(2))


class FusionLayer(nn.Module):
    """`BiAttentionBlock`: pre-LayerNorm on both sides, bi-attention, residuals gated by layer-scale vectors
    (initialised to 1 / layers). As the official code, the residual adds to the normalised features."""

    def __init__(self, v_dim: int, l_dim: int, embed_dim: int, heads: int, init_scale: float, dropout: float = 0.1):
        super().__init__()
        self.norm_v, self.norm_l = nn.LayerNorm(v_dim), nn.LayerNorm(l_dim)
        self.attn = BiAttention(v_dim, l_dim, embed_dim, heads, dropout)
        self.gamma_v = nn.Parameter(torch.full((v_dim,), init_scale))
        self.gamma_l = nn.Parameter(torch.full((l_dim,), init_scale))

    def forward(self, levels: list[torch.Tensor], text: torch.Tensor, text_mask: torch.Tensor
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """levels [(B, C, h_i, w_i)], text (B, T, l_dim) -> the same shapes, each side updated by the other."""
        sizes = [m.shape[-2:] for m in levels]
        v = self.norm_v(torch.cat([m.flatten(2).transpose(1, 2) for m in levels], dim=1))  # (B, sum h_i w_i, C)
        l = self.norm_l(text)
        dv, dl = self.attn(v, l, text_mask)
        v, l = v + self.gamma_v * dv, l + self.gamma_l * dl
        out = v.transpose(1, 2).split([h * w for h, w in sizes], dim=2)
        return [m.reshape(len(m), -1, h, w) for m, (h, w) in zip(out, sizes)], l


class TextLayer(nn.Module):
    """GLIP's `BertEncoderLayer`: a post-LayerNorm BERT layer (self-attention, GELU feed-forward) with its clamps."""

    def __init__(self, width: int, heads: int, dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.attention_out, self.attention_norm = nn.Linear(width, width), nn.LayerNorm(width, eps=eps)
        self.intermediate, self.output = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.output_norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, width), mask (B, T) bool -> (B, T, width)."""
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = clamp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
        scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0  # BERT's extended attention mask
        attended = (self.dropout(scores.softmax(dim=-1)) @ v).transpose(1, 2).flatten(2)
        x = self.attention_norm(self.dropout(self.attention_out(attended)) + x)
        hidden = clamp(F.gelu(clamp(self.intermediate(x))))
        return clamp(self.output_norm(clamp(self.dropout(self.output(hidden)) + x)))


def h_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return F.relu6(x + 3) / 6


class DyReLU(nn.Module):
    """DyHead's task attention: out = max(x a1 + b1, x a2 + b2) with per-channel (a1, b1, a2, b2) from the pooled
    features; a1 = 2 (y - 0.5) + 1, a2 = 2 (y - 0.5), b = y - 0.5 (y in [0, 1] by h_sigmoid)."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        squeeze = channels // reduction  # DYReLU with its reduction 4 (no rounding to a multiple of 4 then)
        self.fc = nn.Sequential(nn.Linear(channels, squeeze), nn.ReLU(inplace=True), nn.Linear(squeeze, 4 * channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = h_sigmoid(self.fc(x.mean(dim=(2, 3))))[:, :, None, None]
        a1, b1, a2, b2 = y.split(x.shape[1], dim=1)
        return torch.maximum(x * ((a1 - 0.5) * 2 + 1) + (b1 - 0.5), x * ((a2 - 0.5) * 2) + (b2 - 0.5))


class ConvNorm(nn.Module):
    """`Conv3x3Norm`: a 3x3 modulated deformable (or plain) convolution, then GroupNorm."""

    def __init__(self, channels: int, stride: int, groups: int, deformable: bool):
        super().__init__()
        self.stride, self.deformable = stride, deformable
        self.weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(channels))
        bound = 1 / math.sqrt(channels * 9)
        nn.init.uniform_(self.weight, -bound, bound) if deformable else nn.init.normal_(self.weight, 0, 0.01)
        self.norm = nn.GroupNorm(groups, channels)

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        if self.deformable:
            x = deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=1, mask=mask)
        else:
            x = F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=1)
        return self.norm(x)


def _reused(buffer: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The official CUDA kernel reads a level's offsets (B, K, h, w) for the coarser level's smaller output as the
    first K x h' x w' values of each image's buffer; reproduced so that GLIP's weights see what they were trained
    with (torchvision would reject the mismatched shape)."""
    batch, channels = buffer.shape[:2]
    return buffer.reshape(batch, -1)[:, :channels * size[0] * size[1]].reshape(batch, channels, *size)


class DyConv(nn.Module):
    """One DyHead block over all levels: each level mixes itself (stride 1), the finer level (stride 2) and the
    coarser level (stride 1, upsampled), weighted by scale attention, then DyReLU. Offsets and masks for the
    deformable convolutions come from the level itself."""

    def __init__(self, channels: int, groups: int = 16, deformable: bool = True):
        super().__init__()
        self.convs = nn.ModuleList([ConvNorm(channels, s, groups, deformable) for s in (1, 1, 2)])
        self.scale_attention = nn.Conv2d(channels, 1, 1)
        nn.init.normal_(self.scale_attention.weight, 0, 0.01)
        nn.init.zeros_(self.scale_attention.bias)
        self.relu = DyReLU(channels)
        self.offset = nn.Conv2d(channels, 27, 3, padding=1) if deformable else None

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        return h_sigmoid(F.relu(self.scale_attention(x.mean(dim=(2, 3), keepdim=True))))

    def forward(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, x in enumerate(levels):
            offset = mask = None
            if self.offset is not None:
                om = self.offset(x)
                offset, mask = om[:, :18].contiguous(), om[:, 18:].sigmoid().contiguous()
            terms = [self.convs[1](x, offset, mask)]
            if i > 0:
                terms.append(self.convs[2](levels[i - 1], offset, mask))
            if i < len(levels) - 1:
                size = levels[i + 1].shape[-2:]
                coarser = self.convs[0](levels[i + 1], offset if offset is None else _reused(offset, size),
                                        mask if mask is None else _reused(mask, size))
                terms.append(F.interpolate(coarser, size=x.shape[-2:], mode="bilinear", align_corners=True))
            out.append(torch.stack([t * self._attention(t) for t in terms]).mean(dim=0))
        return [self.relu(x) for x in out]


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class _NoCLIP:
    """What a GLIP-T file records as its CLIP: none (Swin-T and BERT travel in the file)."""

    name = weights = NO_CLIP


_NO_CLIP = _NoCLIP()


# ---------------------------------------------------------------------------------------------- the model
def token_focal_loss(logits: torch.Tensor, targets: torch.Tensor, text_mask: torch.Tensor, alpha: float = 0.25,
                     gamma: float = 2.0) -> torch.Tensor:
    """GLIP's `token_sigmoid_binary_focal_loss`, summed: logits and 0/1 targets (B, A, T), text_mask (B, T) bool ->
    sum over anchors and real tokens of -alpha_t (1 - p_t)^gamma log(p_t)."""
    selected = text_mask[:, None, :].expand_as(logits)
    x, t = logits[selected], targets[selected].float()
    p = x.sigmoid()
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    return (ce * (1 - p_t) ** gamma * (alpha * t + (1 - alpha) * (1 - t))).sum()


def _mean_over_ranks(value: float) -> float:
    """GLIP normalises its losses by counts averaged over the GPUs (at least 1)."""
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor([value], dtype=torch.float32, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total)
        value = float(total) / dist.get_world_size()
    return value


class GLIPDetector(TrainedModel, nn.Module):
    """GLIP on an open_clip image tower or Swin, and a token text encoder (the CLIP's text tower or BERT).

    clip: the CLIP whose image tower is the backbone (image='clip') and whose text tower encodes prompts (text='clip');
        None for GLIP-T / GLIP-L themselves (image='swin-t' / 'swin-l', text='bert').
    channels: FPN / head width (256 in GLIP-T). layers: fusion + conv layers (6). fusion: deep fusion on/off.
    fusion_dim, fusion_heads: the bi-attention's width and heads (2048, 8). text_heads: heads of the text layers
    (None: the text encoder's own, as GLIP's BERT layers).
    swin: changes to the Swin's embed_dim, depths, heads or window (see `SwinPyramid`; None for GLIP's own).
    text_source: the BERT (a Hugging Face name or folder); pretrained_text: load its weights (False when they come
    from a GLIP checkpoint); pretrained_image: start the Swin from timm's ImageNet weights (GLIP's init).
    deformable: DyHead's deformable convs. train_backbone / train_text: fine-tune the towers (GLIP fine-tunes both).
    prompt_tuning: GLIP's `language_prompt_v2`: a zero-initialised table (one row per token position) added to the
    token features, everything else frozen.
    """

    name = "glip"

    def __init__(self, clip: CLIPBackbone | None, channels: int = 256, layers: int = 6, fusion: bool = True,
                 fusion_dim: int = 2048, fusion_heads: int = 8, text_heads: int | None = 12, groups: int = 16,
                 image: str = "clip", text: str = "clip", text_source: str = "bert-base-uncased",
                 pretrained_text: bool = True, pretrained_image: bool = False, deformable: bool = True,
                 train_backbone: bool = True, train_text: bool = True, topk: int = 9, dropout: float = 0.1,
                 prompt_tuning: bool = False, swin: dict | None = None):
        super().__init__()
        if image not in ("clip", *SWIN) or text not in ("clip", "bert"):
            raise InputError(f"image must be 'clip', 'swin-t' or 'swin-l' and text 'clip' or 'bert', got {image!r}, "
                             f"{text!r}")
        if clip is None and "clip" in (image, text):
            raise InputError("image='clip' or text='clip' needs a CLIP")
        self.clip = clip = copy.deepcopy(clip).requires_grad_(False) if clip is not None else None  # fine-tuned here
        self.image = (CLIPPyramid(clip, not train_backbone) if image == "clip"
                      else SwinPyramid(image, not train_backbone, pretrained=pretrained_image, arch=swin))
        self.text = CLIPTokenText(clip) if text == "clip" else BertTokenText(text_source, pretrained=pretrained_text)
        text_heads = self.text.heads if text_heads is None else text_heads
        self.config = {"channels": channels, "layers": layers, "fusion": fusion, "fusion_dim": fusion_dim,
                       "fusion_heads": fusion_heads, "text_heads": text_heads, "groups": groups, "image": image,
                       "text": text, "text_source": text_source, "deformable": deformable,
                       "train_backbone": train_backbone, "train_text": train_text, "topk": topk, "dropout": dropout,
                       "prompt_tuning": prompt_tuning, "swin": swin}
        self.text.trainable(train_text)
        self.fpn = FeaturePyramidNetwork(self.image.channels, channels, extra_blocks=LastLevelP6P7(channels, channels))
        width = self.text.width
        self.fusion = fusion
        self.fusion_layers = nn.ModuleList(
            [FusionLayer(channels, width, fusion_dim, fusion_heads, 1 / layers, dropout) for _ in range(layers)]
            if fusion else [])
        self.text_layers = nn.ModuleList([TextLayer(width, text_heads, dropout) for _ in range(layers)]
                                         if fusion else [])
        self.conv_layers = nn.ModuleList([DyConv(channels, groups, deformable) for _ in range(layers)])
        self.bbox_pred, self.centerness = nn.Conv2d(channels, 4, 1), nn.Conv2d(channels, 1, 1)
        for conv in (self.bbox_pred, self.centerness):
            nn.init.normal_(conv.weight, 0, 0.01)
            nn.init.zeros_(conv.bias)
        self.scales = nn.ModuleList([Scale() for _ in STRIDES])
        self.text_projection = nn.Linear(width, channels)
        self.log_scale = nn.Parameter(torch.zeros(1))
        self.bias_lang = nn.Parameter(torch.zeros(width))
        self.bias0 = nn.Parameter(torch.tensor([-math.log((1 - PRIOR) / PRIOR)]))
        self.topk = topk
        self.prompt_table = None
        self._encoded_prompts: OrderedDict = OrderedDict()
        if prompt_tuning:
            self.tune_prompts()

    def tune_prompts(self) -> None:
        """Switch to GLIP's prompt tuning (`language_prompt_v2`): everything frozen but a new zero table added to the
        token features, one row per token position."""
        self.requires_grad_(False)
        self.prompt_table = nn.Parameter(torch.zeros(PROMPT_ROWS, self.text.width, device=self.bias0.device))
        self.config["prompt_tuning"] = True

    def train(self, mode: bool = True) -> "GLIPDetector":
        super().train(mode)
        self._encoded_prompts.clear()
        if self.prompt_table is not None:  # GLIP runs the frozen head in eval mode (no dropout) when prompt-tuning
            for module in self.children():
                module.eval()
        return self

    @property
    def image_mean(self) -> tuple[float, ...]:
        """The normalisation the image tower expects (its pyramid knows it)."""
        return self.image.image_mean

    @property
    def image_std(self) -> tuple[float, ...]:
        return self.image.image_std

    @property
    def backbone(self):
        """The CLIP the model was built on (recorded in saved files), or a stand-in named 'none' for GLIP-T."""
        return self.clip if self.clip is not None else _NO_CLIP

    @property
    def saved_prefixes(self) -> tuple[str, ...]:
        """Towers that no CLIP restores are saved whole, trained or frozen: Swin-T and BERT."""
        return (("image.",) if self.config["image"] in SWIN else ()) + \
            (("text.model.",) if self.config["text"] == "bert" else ())

    @classmethod
    def restore_arguments(cls, config: dict) -> dict:
        """BERT is built from its config: a GLIP file holds its weights."""
        return {**config, "pretrained_text": False} if config.get("text") == "bert" else config

    @property
    def device(self) -> torch.device:
        return self.bias0.device

    @property
    def max_tokens(self) -> int:
        return self.text.max_tokens

    # --------------------------------------------------------------------------------- the two halves
    def embed_image(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised, padded to a multiple of 32 -> FPN levels P3-P7 [(B, channels, h_l, w_l)]: all
        that does not depend on the words."""
        maps = self.image(images)
        return list(self.fpn({str(i): m for i, m in enumerate(maps)}).values())

    def tokenize(self, captions: list[str], truncate: bool = False) -> TokenizedText:
        return self.text.tokenize(captions, truncate)

    def count_tokens(self, text: str) -> int:
        """The number of tokens of `text` without the special ones."""
        return self.text.count_tokens(text)

    def encode_text(self, text: TokenizedText) -> torch.Tensor:
        """(B, T) tokenized prompts -> (B, T, width) token features (with the prompt-tuning table). In inference
        (eval mode, no gradients) the last CACHED_PROMPTS are kept: they depend on the text and the text weights
        only (a change of those weights, e.g. an optimizer step or `load_state_dict`, misses the cache; weights made
        under `torch.inference_mode` keep no version count: changed in place, call `train()` to clear it)."""
        if self.training or torch.is_grad_enabled():
            return self._encode_text(text)
        weights = [*self.text.parameters(), *([self.prompt_table] if self.prompt_table is not None else [])]
        key = (text.ids.cpu().numpy().tobytes(), text.mask.cpu().numpy().tobytes(), tuple(text.ids.shape),
               tuple((w.data_ptr(), None if w.is_inference() else w._version) for w in weights))
        if key in self._encoded_prompts:
            self._encoded_prompts.move_to_end(key)
        else:
            self._encoded_prompts[key] = self._encode_text(text)
            while len(self._encoded_prompts) > CACHED_PROMPTS:
                self._encoded_prompts.popitem(last=False)
        return self._encoded_prompts[key]

    def _encode_text(self, text: TokenizedText) -> torch.Tensor:
        tokens = self.text(text)  # (B, T, width)
        return tokens if self.prompt_table is None else tokens + self.prompt_table[:tokens.shape[1]]

    def head(self, levels: list[torch.Tensor], text: TokenizedText) -> dict[str, torch.Tensor]:
        """FPN levels and a tokenized prompt per image -> {'logits': (B, A, T) token alignment logits, 'deltas':
        (B, A, 4), 'centerness': (B, A) logits, 'shapes': [(h_l, w_l)]}, anchors level by level, row-major."""
        mask = text.mask.to(self.device)
        tokens = self.encode_text(text)
        if self.fusion:
            for fusion, text_layer, conv in zip(self.fusion_layers, self.text_layers, self.conv_layers):
                levels, tokens = fusion(levels, tokens, mask)
                tokens = text_layer(tokens, mask)
                levels = conv(levels)
        else:
            for conv in self.conv_layers:
                levels = conv(levels)
            tokens = tokens * mask[..., None]  # GLIP's 'embedded' features: padding zeroed
        unit = F.normalize(tokens, dim=-1)
        projected = self.text_projection(unit / 2.0)  # (B, T, channels)
        token_bias = unit @ self.bias_lang + self.bias0  # (B, T)
        logits, deltas, ctr = [], [], []
        for x, scale in zip(levels, self.scales):
            queries = x.flatten(2).transpose(1, 2)  # (B, hw, C)
            logits.append(clamp(queries @ projected.transpose(1, 2) / self.log_scale.exp() + token_bias[:, None]))
            deltas.append(scale(self.bbox_pred(x)).flatten(2).transpose(1, 2))
            ctr.append(self.centerness(x).flatten(2)[:, 0])
        return {"logits": torch.cat(logits, 1), "deltas": torch.cat(deltas, 1), "centerness": torch.cat(ctr, 1),
                "shapes": [tuple(x.shape[-2:]) for x in levels]}

    def anchors(self, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Per level (h_l * w_l, 4) pixel-index anchors."""
        return atss.anchors_for(shapes, STRIDES, [ANCHOR_SCALE * s for s in STRIDES], self.device)

    # ------------------------------------------------------------------------------------------ training
    def losses(self, images: torch.Tensor, text: TokenizedText, targets: list[dict[str, torch.Tensor]]
               ) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W) normalised and padded; text: one prompt per image; targets [{'boxes': (G_i, 4)
        continuous xyxy in the resized pixels, 'positive_map': (G_i, T) bool, the tokens of each box's phrase}]
        -> {'loss', 'loss_token', 'loss_reg', 'loss_centerness'} (GLIP's weights 1, 2, 1)."""
        out = self.head(self.embed_image(images), text)
        anchors = self.anchors(out["shapes"])
        every = torch.cat(anchors)
        tokens = out["logits"].shape[2]
        token_targets = torch.zeros_like(out["logits"], dtype=torch.bool)
        positive, matched_boxes, matched_anchors, pred_deltas, pred_ctr = [], [], [], [], []
        for b, target in enumerate(targets):
            boxes = atss.to_inclusive(target["boxes"].to(every))
            matched = atss.atss_assign(anchors, boxes, self.topk)
            pos = matched >= 0
            token_targets[b, pos] = target["positive_map"].to(self.device)[matched[pos], :tokens]
            if tokens == self.max_tokens:  # unmatched anchors: GLIP's "no object" token, the last of 256
                token_targets[b, ~pos, -1] = True
            positive.append(pos)
            matched_boxes.append(boxes[matched[pos]])
            matched_anchors.append(every[pos])
            pred_deltas.append(out["deltas"][b, pos])
            pred_ctr.append(out["centerness"][b, pos])
        mask = text.mask.to(self.device)
        num_pos = max(_mean_over_ranks(float(sum(int(p.sum()) for p in positive))), 1.0)
        loss_token = token_focal_loss(out["logits"].float(), token_targets, mask) / num_pos
        boxes, anchors_pos = torch.cat(matched_boxes), torch.cat(matched_anchors)
        deltas, ctr = torch.cat(pred_deltas).float(), torch.cat(pred_ctr).float()
        if len(boxes):
            ctr_target = atss.centerness(boxes, anchors_pos)
            predicted = atss.decode(deltas, anchors_pos)
            predicted = torch.cat([predicted[:, :2], torch.maximum(predicted[:, 2:], predicted[:, :2])], dim=1)
            giou = generalized_box_iou_loss(predicted, boxes, reduction="none", eps=1e-7)
            loss_reg = 2.0 * (giou * ctr_target).sum() / max(_mean_over_ranks(float(ctr_target.sum())), 1e-6)
            loss_ctr = F.binary_cross_entropy_with_logits(ctr, ctr_target, reduction="sum") / num_pos
        else:
            loss_reg, loss_ctr = deltas.sum(), ctr.sum()
        return {"loss": loss_token + loss_reg + loss_ctr, "loss_token": loss_token, "loss_reg": loss_reg,
                "loss_centerness": loss_ctr}

    # ----------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def predict(self, levels: list[torch.Tensor], text: TokenizedText, token_maps: list[torch.Tensor],
                score_threshold: float = PRE_NMS_THRESHOLD) -> list[dict[str, torch.Tensor]]:
        """Per image and phrase, candidate boxes before NMS: levels of B images, text (B prompts), token_maps [(P_b,
        T) bool] (each phrase's tokens) -> [{'boxes': (N, 4) pixel-index xyxy, 'scores': (N,) sqrt(phrase score x
        centerness), 'labels': (N,) phrase index}], GLIP's per-level candidates (phrase score, the mean of its
        tokens' sigmoids, above `score_threshold`, then the best 1000 by score x centerness)."""
        return self.candidates(self.head(levels, text), token_maps, score_threshold)

    def candidates(self, out: dict[str, torch.Tensor], token_maps: list[torch.Tensor],
                   score_threshold: float = PRE_NMS_THRESHOLD) -> list[dict[str, torch.Tensor]]:
        """`predict` after the head: its output `out` -> the candidates per image."""
        anchors = self.anchors(out["shapes"])
        sizes = [len(a) for a in anchors]
        results = []
        for b, token_map in enumerate(token_maps):
            token_map = token_map.to(self.device, torch.float32)[:, :out["logits"].shape[2]]
            probs = out["logits"][b].sigmoid() @ token_map.T / token_map.sum(dim=1).clamp(min=1)  # (A, P)
            ctr = out["centerness"][b].sigmoid()
            boxes = atss.decode(out["deltas"][b], torch.cat(anchors))
            picked = {"boxes": [], "scores": [], "labels": []}
            for level, start in zip(anchors, [sum(sizes[:i]) for i in range(len(sizes))]):
                span = slice(start, start + len(level))
                candidate = probs[span] > score_threshold
                scores = (probs[span] * ctr[span, None])[candidate]
                rows, labels = candidate.nonzero(as_tuple=True)
                best = scores.topk(min(PRE_NMS_TOP_N, len(scores))).indices
                picked["boxes"].append(boxes[span][rows[best]])
                picked["scores"].append(torch.sqrt(probs[span][rows[best], labels[best]] * ctr[span][rows[best]]))
                picked["labels"].append(labels[best])
            results.append({k: torch.cat(v) for k, v in picked.items()})
        return results

