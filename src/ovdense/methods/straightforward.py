"""The straightforward forms of the fast inference paths, written as the official code computes them: the
specification the fast forms are tested against (`tests/test_exact_rewrites.py`) and the "before" of
`benchmarks/bench_speed.py`.

  GLIP bi-attention     both sides projected to the fusion width (2048 in GLIP-T), as `BiMultiHeadAttention`
  deformable conv       torchvision's `deform_conv2d` kernel
  RoI attention pool    CLIP's attention pool with every token projected to keys and values
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from ..backbones.clip import CLIPBackbone
from . import glip


def bi_attention(module, v: torch.Tensor, l: torch.Tensor, text_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`BiAttention.forward` unfolded (inference: no dropout): v (B, N, v_dim), l (B, T, l_dim) -> (dv, dl)."""
    def heads(x):
        return x.reshape(x.shape[0], x.shape[1], module.heads, -1).transpose(1, 2)
    q = heads(module.v_proj(v))
    logits = glip.clamp(q * q.shape[-1] ** -0.5 @ heads(module.l_proj(l)).transpose(-1, -2))  # (B, H, N, T)
    text_side = logits.transpose(-1, -2)
    text_side = glip.clamp(text_side - text_side.amax(dim=-1, keepdim=True)).softmax(dim=-1)  # over positions
    image_side = logits.masked_fill(~text_mask[:, None, None, :], -9e15).softmax(dim=-1)  # over tokens
    dv = (image_side @ heads(module.values_l_proj(l))).transpose(1, 2).flatten(2)
    dl = (text_side @ heads(module.values_v_proj(v))).transpose(1, 2).flatten(2)
    return module.out_v_proj(dv), module.out_l_proj(dl)


def global_attention_pool(clip, x: torch.Tensor) -> torch.Tensor:
    """CLIP's `AttentionPool2d` as CLIP and RegionCLIP run it (one query, the mean token; every token projected to
    keys and values): (B, C, h, w) -> (B, D)."""
    pool = clip.visual.attnpool
    tokens = clip._pool_tokens(x)
    out, _ = F.multi_head_attention_forward(
        query=tokens[:1], key=tokens, value=tokens, embed_dim_to_check=tokens.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0]


@contextmanager
def straightforward_forms():
    """Run GLIP, RegionCLIP and CLIP with the straightforward forms inside the block."""
    saved = glip.BiAttention.forward, glip.deform_conv2d, CLIPBackbone.global_attention_pool
    glip.BiAttention.forward, glip.deform_conv2d = bi_attention, deform_conv2d
    CLIPBackbone.global_attention_pool = global_attention_pool
    try:
        yield
    finally:
        glip.BiAttention.forward, glip.deform_conv2d, CLIPBackbone.global_attention_pool = saved
