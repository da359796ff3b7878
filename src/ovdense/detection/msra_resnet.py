"""detectron2's ImageNet ResNet (the MSRA R-50 of `build_resnet_backbone`) and its FPN, as RegionCLIP's offline RPNs
use them. Module and parameter names are detectron2's, so a detectron2 checkpoint loads after a prefix rename.

torchvision's ResNet cannot stand in: detectron2's MSRA blocks put the stride in the first 1x1 conv (STRIDE_IN_1X1),
torchvision puts it in the 3x3, and its stem and stage widths are fixed (the tests use a narrow trunk).
Every convolution of the trunk is bias-free and followed by a FrozenBatchNorm2d (`conv.norm`); at inference the
SyncBN of RegionCLIP's large-scale-jitter RPN (`OFFLINE_RPN_LSJ_PRETRAINED`) computes the same, so it is frozen too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

R50_BLOCKS = (3, 4, 6, 3)
STAGES = ("res2", "res3", "res4", "res5")


class Conv(nn.Conv2d):
    """detectron2's `layers.Conv2d`: a convolution followed by its optional normalisation (`norm`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, norm: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=not norm)
        self.norm = FrozenBatchNorm2d(out_channels) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return self.norm(x) if self.norm is not None else x


class Stem(nn.Module):
    """`BasicStem`: 7x7 conv (stride 2) + FrozenBN + ReLU, then 3x3 max pooling (stride 2, padding 1): stride 4."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.conv1 = Conv(3, out_channels, 7, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=1)


class Bottleneck(nn.Module):
    """`BottleneckBlock` with stride_in_1x1: 1x1 (stride) -> 3x3 -> 1x1, a projection shortcut when the width
    changes, ReLU after each conv and after the sum."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck: int, stride: int):
        super().__init__()
        self.shortcut = Conv(in_channels, out_channels, 1, stride) if in_channels != out_channels else None
        self.conv1 = Conv(in_channels, bottleneck, 1, stride)
        self.conv2 = Conv(bottleneck, bottleneck, 3)
        self.conv3 = Conv(bottleneck, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class MSRAResNet(nn.Module):
    """detectron2's ResNet up to the last stage named in `out_features`, returning those maps.

    width: the stem's channels (64 for R-50); stage i (res2..res5) has bottleneck width * 2^i and output
    4 * width * 2^i channels; the first block of res3-res5 has stride 2. blocks: blocks per stage (R-50: 3, 4, 6, 3).
    forward: (B, 3, H, W) -> {name: (B, C, ~H/s, ~W/s)} for the stride s of each name (res2 4 ... res5 32).
    """

    def __init__(self, out_features: tuple[str, ...] = ("res4",), width: int = 64,
                 blocks: tuple[int, ...] = R50_BLOCKS):
        super().__init__()
        self.out_features = tuple(out_features)
        self.stem = Stem(width)
        channels, self.channels = width, {}
        for index, name in enumerate(STAGES[:max(STAGES.index(f) for f in out_features) + 1]):
            out, stride = 4 * width * 2 ** index, 1 if index == 0 else 2
            stage = [Bottleneck(channels if b == 0 else out, out, width * 2 ** index, stride if b == 0 else 1)
                     for b in range(blocks[index])]
            self.add_module(name, nn.Sequential(*stage))
            channels = self.channels[name] = out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(x)
        out = {}
        for name in self.channels:
            x = getattr(self, name)(x)
            if name in self.out_features:
                out[name] = x
        return out


class FPN(nn.Module):
    """detectron2's FPN over res2-res5 with `LastLevelMaxPool` (P6 = P5 subsampled by 2): five maps p2-p6 of
    `channels` channels (strides 4 ... 64). norm: FrozenBN after each lateral / output conv (then bias-free), as the
    large-scale-jitter RPN's FPN.NORM; plain convolutions with bias otherwise.
    Input height and width must be multiples of 32 (detectron2 pads to the FPN's size_divisibility).
    """

    size_divisibility = 32
    strides = (4, 8, 16, 32, 64)

    def __init__(self, channels: int = 256, width: int = 64, norm: bool = False, blocks: tuple[int, ...] = R50_BLOCKS):
        super().__init__()
        self.out_channels = channels
        self.bottom_up = MSRAResNet(STAGES, width, blocks)
        for name in STAGES:
            level = name[-1]
            self.add_module(f"fpn_lateral{level}", Conv(self.bottom_up.channels[name], channels, 1, norm=norm))
            self.add_module(f"fpn_output{level}", Conv(channels, channels, 3, norm=norm))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [p2, p3, p4, p5, p6]."""
        features = self.bottom_up(x)
        top = getattr(self, "fpn_lateral5")(features["res5"])
        out = [getattr(self, "fpn_output5")(top)]
        for level in (4, 3, 2):
            top = getattr(self, f"fpn_lateral{level}")(features[f"res{level}"]) + \
                F.interpolate(top, scale_factor=2.0, mode="nearest")
            out.insert(0, getattr(self, f"fpn_output{level}")(top))
        return out + [F.max_pool2d(out[-1], kernel_size=1, stride=2)]


class C4(MSRAResNet):
    """The C4 trunk: detectron2's ResNet to res4 (stride 16), one map; no size divisibility."""

    size_divisibility = 0
    strides = (16,)

    def __init__(self, width: int = 64, blocks: tuple[int, ...] = R50_BLOCKS):
        super().__init__(("res4",), width, blocks)
        self.out_channels = self.channels["res4"]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [res4 (B, 16 * width, ~H/16, ~W/16)]."""
        return [super().forward(x)["res4"]]


def pad_to(images: torch.Tensor, divisible: int) -> torch.Tensor:
    """(B, C, H, W) zero-padded at the bottom and right to multiples of `divisible` (0 or 1: unchanged)."""
    if divisible <= 1:
        return images
    height, width = (math.ceil(s / divisible) * divisible for s in images.shape[-2:])
    return F.pad(images, (0, width - images.shape[-1], 0, height - images.shape[-2]))
