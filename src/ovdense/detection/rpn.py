"""Class-agnostic region proposals.

ProposalNetwork: torchvision's RPN on one feature map, keeping the objectness scores (ovdense's own RPNs).
OfflineRPN: detectron2's RPN on its ImageNet R-50 (C4 or FPN), as RegionCLIP's released detectors take proposals.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import batched_nms

from ..errors import UsageError
from .msra_resnet import C4, FPN, R50_BLOCKS, pad_to
from .roi import BOX_CLAMP


class ProposalNetwork(RegionProposalNetwork):
    """torchvision's `RegionProposalNetwork` over a single (B, C, h, w) feature map.

    `propose` returns the objectness probabilities that torchvision's `forward` drops (RegionCLIP multiplies
    them into its class scores on LVIS). Sizes are anchor side lengths in input pixels; each of the
    len(sizes) x len(aspect_ratios) anchors sits at every feature location (detectron2's C4 RPN: sizes
    32..512, ratios 0.5/1/2, 15 anchors).
    """

    def __init__(self, in_channels: int, sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0),
                 conv_depth: int = 1, pre_nms_top_n: tuple[int, int] = (12000, 6000),
                 post_nms_top_n: tuple[int, int] = (2000, 1000), nms_thresh: float = 0.7, min_size: float = 0.0,
                 fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256,
                 positive_fraction: float = 0.5):
        anchors = AnchorGenerator((tuple(sizes),), (tuple(aspect_ratios),))
        head = RPNHead(in_channels, anchors.num_anchors_per_location()[0], conv_depth=conv_depth)
        super().__init__(anchors, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction,
                         dict(training=pre_nms_top_n[0], testing=pre_nms_top_n[1]),
                         dict(training=post_nms_top_n[0], testing=post_nms_top_n[1]), nms_thresh)
        self.min_size = min_size

    def propose(self, features: torch.Tensor, images: torch.Tensor, image_sizes: list[tuple[int, int]],
                targets: list[dict[str, torch.Tensor]] | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, torch.Tensor]]:
        """features (B, C, h, w) of the padded images (B, 3, H, W) whose valid parts are `image_sizes` [(H_i, W_i)]
        -> proposals [(P_i, 4) xyxy], objectness probabilities [(P_i,)], and with `targets` ([{'boxes': (G_i, 4)}])
        the RPN losses {'loss_objectness', 'loss_rpn_box_reg'}."""
        image_list = ImageList(images, [tuple(s) for s in image_sizes])
        maps = list(OrderedDict(level=features).values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(image_list, maps)
        counts = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = self.filter_proposals(proposals, objectness, image_list.image_sizes, counts)
        losses = {}
        if targets is not None:
            labels, matched = self.assign_targets_to_anchors(anchors, targets)
            regression = self.box_coder.encode(matched, anchors)
            loss_objectness, loss_box = self.compute_loss(objectness, deltas, labels, regression)
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}
        return boxes, scores, losses


# ------------------------------------------------------------------------------------ detectron2's RPN, as released
D2_PIXEL_MEAN = (103.530, 116.280, 123.675)  # detectron2's MODEL.PIXEL_MEAN: BGR, 0-255 units
D2_PIXEL_STD = (1.0, 1.0, 1.0)
TRUNKS = ("c4", "fpn")


def cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> torch.Tensor:
    """detectron2's `DefaultAnchorGenerator.generate_cell_anchors`: (len(sizes) x len(aspect_ratios), 4) xyxy boxes
    centred on 0, sizes outer and ratios (h / w) inner, w = sqrt(size^2 / ratio), h = ratio x w, not rounded
    (torchvision's AnchorGenerator rounds them and puts the ratios outer)."""
    anchors = []
    for size in sizes:
        for ratio in aspect_ratios:
            w = math.sqrt(size ** 2.0 / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors)


def grid_anchors(cells: torch.Tensor, stride: int, size: tuple[int, int], offset: float = 0.0) -> torch.Tensor:
    """(A, 4) cell anchors tiled over an (h, w) map of `stride`: (h x w x A, 4), location-major, the first cell at
    offset x stride (detectron2's ANCHOR_GENERATOR.OFFSET, 0 by default)."""
    height, width = size
    xs = torch.arange(offset * stride, width * stride, step=stride, dtype=torch.float32, device=cells.device)
    ys = torch.arange(offset * stride, height * stride, step=stride, dtype=torch.float32, device=cells.device)
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([shift_x.reshape(-1), shift_y.reshape(-1)] * 2, dim=1)
    return (shifts[:, None] + cells[None]).reshape(-1, 4)


def top_proposals(boxes: list[torch.Tensor], logits: list[torch.Tensor], image_sizes: list[tuple[int, int]],
                  nms_thresh: float, pre_nms_top_n: int, post_nms_top_n: int, min_size: float = 0.0
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """detectron2's `find_top_rpn_proposals` at test time.

    boxes [(B, N_l, 4)] and logits [(B, N_l)] per level -> per image the proposals [(P_i, 4)] and their objectness
    logits [(P_i,)], best first: the `pre_nms_top_n` best of each level, non-finite ones dropped, clipped to the image,
    those whose width or height is not above `min_size` removed, NMS per level, the first `post_nms_top_n` kept.
    """
    top_boxes, top_logits, levels = [], [], []
    for level, (level_boxes, level_logits) in enumerate(zip(boxes, logits)):
        count = min(level_logits.shape[1], pre_nms_top_n)
        sorted_logits, order = level_logits.sort(descending=True, dim=1)
        top_logits.append(sorted_logits[:, :count])
        top_boxes.append(torch.gather(level_boxes, 1, order[:, :count, None].expand(-1, -1, 4)))
        levels.append(torch.full((count,), level, dtype=torch.int64, device=level_logits.device))
    all_boxes, all_logits, levels = torch.cat(top_boxes, dim=1), torch.cat(top_logits, dim=1), torch.cat(levels)
    out_boxes, out_logits = [], []
    for image_boxes, image_logits, (height, width) in zip(all_boxes, all_logits, image_sizes):
        valid = torch.isfinite(image_boxes).all(dim=1) & torch.isfinite(image_logits)
        image_boxes, image_logits, image_levels = image_boxes[valid], image_logits[valid], levels[valid]
        image_boxes = torch.stack([image_boxes[:, 0].clamp(0, width), image_boxes[:, 1].clamp(0, height),
                                   image_boxes[:, 2].clamp(0, width), image_boxes[:, 3].clamp(0, height)], dim=1)
        sides = image_boxes[:, 2:] - image_boxes[:, :2]
        keep = (sides[:, 0] > min_size) & (sides[:, 1] > min_size)
        image_boxes, image_logits, image_levels = image_boxes[keep], image_logits[keep], image_levels[keep]
        keep = batched_nms(image_boxes, image_logits, image_levels, nms_thresh)[:post_nms_top_n]
        out_boxes.append(image_boxes[keep])
        out_logits.append(image_logits[keep])
    return out_boxes, out_logits


class OfflineRPN(nn.Module):
    """RegionCLIP's offline proposal generator: a detectron2 ImageNet R-50 (`msra_resnet`) with its own RPN, frozen,
    on its own preprocessing (`MODEL.PIXEL_MEAN` / `PIXEL_STD` and `INPUT.FORMAT` of the offline config).

    trunk: 'c4' (res4, stride 16, the 15 anchors of sizes 32-512 at each location: `rpn_coco_*.pth`) or 'fpn' (p2-p6,
        one size per level 32 ... 512: `rpn_lvis_*.pth`). width: the trunk's stem width (64 for R-50).
    fpn_channels, fpn_norm: the FPN's width and whether its convs carry a (frozen) BatchNorm (the LSJ RPN's FPN.NORM).
    head_convs: 3x3 convs of the RPN head (RPN.CONV_DIMS: 1; 2 for the LSJ RPN).
    pre_nms_top_n: PRE_NMS_TOPK_TEST (per level; default 6000 for C4, 1000 for FPN); post_nms_top_n, nms_thresh,
        min_size: POST_NMS_TOPK_TEST, NMS_THRESH (RegionCLIP's OFFLINE_RPN_* overrides), PROPOSAL_GENERATOR.MIN_SIZE.
    Parameters keep detectron2's names under `backbone.`; the head is torchvision's `RPNHead` (same arithmetic).
    """

    def __init__(self, trunk: str = "c4", width: int = 64, fpn_channels: int = 256, fpn_norm: bool = False,
                 head_convs: int = 1, aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
                 pre_nms_top_n: int | None = None, post_nms_top_n: int = 1000, nms_thresh: float = 0.7,
                 min_size: float = 0.0, pixel_mean: tuple[float, ...] = D2_PIXEL_MEAN,
                 pixel_std: tuple[float, ...] = D2_PIXEL_STD, input_format: str = "BGR",
                 blocks: tuple[int, ...] = R50_BLOCKS):
        super().__init__()
        if trunk not in TRUNKS or input_format not in ("BGR", "RGB"):
            raise UsageError(f"trunk must be one of {TRUNKS} and input_format BGR or RGB, got {trunk!r}, "
                             f"{input_format!r}")
        self.backbone = C4(width, tuple(blocks)) if trunk == "c4" else FPN(fpn_channels, width, fpn_norm, tuple(blocks))
        sizes = ((32, 64, 128, 256, 512),) if trunk == "c4" else ((32,), (64,), (128,), (256,), (512,))
        self.cells = [cell_anchors(s, tuple(aspect_ratios)) for s in sizes]
        self.head = RPNHead(self.backbone.out_channels, len(self.cells[0]), conv_depth=head_convs)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0), bbox_xform_clip=BOX_CLAMP)
        self.pre_nms_top_n = pre_nms_top_n or (6000 if trunk == "c4" else 1000)
        self.post_nms_top_n, self.nms_thresh, self.min_size = post_nms_top_n, nms_thresh, min_size
        self.bgr = input_format == "BGR"
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)

    def preprocess(self, rgb: torch.Tensor, image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """(B, 3, H, W) RGB in 0-255 units -> the trunk's input: channels in its order, minus its pixel mean, over its
        std; zero outside each image's (h, w) and padded with zeros to the trunk's size divisibility (detectron2's
        `offline_preprocess_image` and `ImageList.from_tensors`)."""
        x = (rgb[:, [2, 1, 0]] if self.bgr else rgb).float()
        x = (x - self.pixel_mean) / self.pixel_std
        inside = torch.zeros_like(x[:, :1], dtype=torch.bool)
        for mask, (height, width) in zip(inside, image_sizes):
            mask[:, :height, :width] = True
        return pad_to(x * inside, self.backbone.size_divisibility)

    @torch.no_grad()
    def forward(self, rgb: torch.Tensor, image_sizes: list[tuple[int, int]]
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(B, 3, H, W) RGB 0-255 batch and each image's (h, w) -> proposals [(P_i, 4) xyxy] and their objectness
        logits [(P_i,)], best first."""
        maps = self.backbone(self.preprocess(rgb, image_sizes))
        objectness, deltas = self.head(maps)
        boxes, logits = [], []
        for cells, stride, level_logits, level_deltas in zip(self.cells, self.backbone.strides, objectness, deltas):
            batch, _, height, width = level_logits.shape
            anchors = grid_anchors(cells.to(rgb.device), stride, (height, width))
            level_deltas = level_deltas.view(batch, len(cells), 4, height, width).permute(0, 3, 4, 1, 2).reshape(-1, 4)
            decoded = self.box_coder.decode_single(level_deltas, anchors.repeat(batch, 1))
            boxes.append(decoded.view(batch, -1, 4))
            logits.append(level_logits.permute(0, 2, 3, 1).reshape(batch, -1))
        return top_proposals(boxes, logits, image_sizes, self.nms_thresh, self.pre_nms_top_n, self.post_nms_top_n,
                             self.min_size)
