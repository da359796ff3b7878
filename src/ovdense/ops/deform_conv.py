"""Modulated deformable convolution (DCNv2) for the CPU. Per kernel tap, one `embedding_bag` gathers every output
position's four bilinear corners (all channels at once, weighted by bilinear weight x modulation mask) and one
matmul applies that tap's weights. Equal to torchvision's `deform_conv2d` (its sampling rule: zero outside
(-1, H) x (-1, W), corners outside the image zero) and 3-5x faster on a CPU, where torchvision's kernel
recomputes the bilinear coordinates for every channel on one core (`benchmarks/bench_speed.py`). Other devices use
torchvision's kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d


def deform_conv2d(x: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride: int = 1, padding: int = 0, dilation: int = 1, mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x (B, C, H, W), offset (B, 2*k*k, Ho, Wo) as (dy, dx) per tap, weight (C_out, C, k, k), mask (B, k*k, Ho, Wo)
    -> (B, C_out, Ho, Wo). One offset group and one weight group (DyHead's); torchvision's kernel otherwise."""
    taps = weight.shape[-2] * weight.shape[-1]
    if x.device.type != "cpu" or offset.shape[1] != 2 * taps or weight.shape[1] != x.shape[1]:
        return torchvision_deform_conv2d(x, offset, weight, bias, stride=stride, padding=padding,
                                         dilation=dilation, mask=mask)
    batch, channels = x.shape[:2]
    out_h, out_w = offset.shape[-2:]
    indices, weights = bilinear_taps(x.shape, offset, weight.shape[-2:], stride, padding, dilation, mask)
    pixels = x.permute(0, 2, 3, 1).contiguous().view(-1, channels)  # (B*H*W, C): a pixel's channels, one row
    tap_weights = weight.permute(2, 3, 0, 1).reshape(taps, -1, channels).transpose(1, 2)  # (k*k, C, C_out)
    out = None
    for tap in range(taps):  # one tap at a time keeps the sampled block (B*Ho*Wo, C) small
        sampled = F.embedding_bag(indices[tap], pixels, per_sample_weights=weights[tap].to(x.dtype), mode="sum")
        if out is None:  # under autocast this picks the lower precision; the in-place sums follow it
            out = torch.addmm(bias, sampled, tap_weights[tap]) if bias is not None else sampled @ tap_weights[tap]
        else:
            out.addmm_(sampled.to(out.dtype), tap_weights[tap].to(out.dtype))
    return out.reshape(batch, out_h, out_w, -1).permute(0, 3, 1, 2).contiguous()


def bilinear_taps(shape: torch.Size, offset: torch.Tensor, kernel: tuple[int, int], stride: int, padding: int,
                  dilation: int, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each tap samples: (k*k, B*Ho*Wo, 4) rows of the (B*H*W, C) pixel table (the four bilinear corners) and
    their weights (bilinear weight x mask, 0 for corners outside the image)."""
    batch, _, height, width = shape
    out_h, out_w = offset.shape[-2:]
    kh, kw = kernel
    taps, device = kh * kw, offset.device
    dtype = torch.promote_types(offset.dtype, torch.float32)  # positions need float32 at least
    rows = torch.arange(out_h, device=device, dtype=dtype) * stride - padding
    cols = torch.arange(out_w, device=device, dtype=dtype) * stride - padding
    tap_y = (torch.arange(kh, device=device, dtype=dtype) * dilation).repeat_interleave(kw)[:, None, None, None]
    tap_x = (torch.arange(kw, device=device, dtype=dtype) * dilation).repeat(kh)[:, None, None, None]
    offset = offset.to(dtype).reshape(batch, taps, 2, out_h, out_w).transpose(0, 1)  # (k*k, B, 2, Ho, Wo)
    y = tap_y + rows[:, None] + offset[:, :, 0]  # (k*k, B, Ho, Wo), as torchvision adds them
    x = tap_x + cols + offset[:, :, 1]
    scale = ((y > -1) & (y < height) & (x > -1) & (x < width)).to(dtype)
    if mask is not None:
        scale = scale * mask.transpose(0, 1)
    y0, x0 = y.floor(), x.floor()
    ly, lx = y - y0, x - x0
    y0, x0 = y0.long(), x0.long()
    image_start = torch.arange(batch, device=device)[:, None, None] * (height * width)
    indices, weights = [], []
    for dy, dx, w in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        indices.append(image_start + yy.clamp(0, height - 1) * width + xx.clamp(0, width - 1))
        weights.append(w * scale * inside)
    indices = torch.stack(indices, -1).reshape(taps, -1, 4)
    return (indices.int() if indices.numel() and int(indices.max()) < 2 ** 31 else indices), \
        torch.stack(weights, -1).reshape(taps, -1, 4)
