"""One-stage dense detection pieces of ATSS (Zhang et al., CVPR 2020) as GLIP uses them (microsoft/GLIP:
`anchor_generator.py`, `vldyhead.BoxCoder`, `loss.ATSSLossComputation.prepare_targets`).

Boxes here follow maskrcnn-benchmark's pixel-index convention, which GLIP's weights were trained with: a box
[x0, y0, x1, y1] covers pixels x0..x1 inclusive, so its width is x1 - x0 + 1. `to_inclusive` / `to_continuous`
convert from / to the continuous boxes (width x1 - x0) the rest of ovdense uses.
"""
from __future__ import annotations

import math

import torch

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
BOX_CLAMP = math.log(1000.0 / 16)
INSIDE_MARGIN = 0.01  # an anchor centre must lie this far inside a box to be a positive


def to_inclusive(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) continuous boxes -> pixel-index boxes (x1, y1 minus one)."""
    return boxes - boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def to_continuous(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) pixel-index boxes -> continuous boxes (x1, y1 plus one)."""
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


def level_anchors(height: int, width: int, stride: int, size: float, device=None) -> torch.Tensor:
    """The one square anchor per location of a (height, width) level: (height * width, 4), row-major.

    The anchor of cell (i, j) is centred on (j * stride + (stride - 1) / 2, i * stride + (stride - 1) / 2) with
    side `size` (Detectron's base anchor [-(size - stride) / 2, ..., (size + stride) / 2 - 1] shifted).
    """
    half = (size - 1) / 2
    centre = (stride - 1) / 2
    ys = torch.arange(height, device=device, dtype=torch.float32) * stride + centre
    xs = torch.arange(width, device=device, dtype=torch.float32) * stride + centre
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)


def anchors_for(shapes: list[tuple[int, int]], strides, sizes, device=None) -> list[torch.Tensor]:
    """Per level (h_l, w_l), stride and anchor side -> [(h_l * w_l, 4)] anchors."""
    return [level_anchors(h, w, s, a, device) for (h, w), s, a in zip(shapes, strides, sizes)]


def _centres_and_sizes(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Centres (x0 + x1) / 2 and +1 sizes, as GLIP's BoxCoder (not maskrcnn-benchmark's, whose centre is x0 + w / 2)."""
    return ((boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2, boxes[:, 2] - boxes[:, 0] + 1,
            boxes[:, 3] - boxes[:, 1] + 1)


def encode(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(N, 4) target boxes relative to (N, 4) anchors -> (N, 4) deltas (dx, dy, dw, dh) with weights (10, 10, 5, 5)."""
    ax, ay, aw, ah = _centres_and_sizes(anchors)
    gx, gy, gw, gh = _centres_and_sizes(boxes)
    wx, wy, ww, wh = BOX_WEIGHTS
    return torch.stack([wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)], 1)


def decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode`: (N, 4) deltas on (N, 4) anchors -> (N, 4) boxes; dw, dh clamped at log(1000 / 16)."""
    ax, ay, aw, ah = _centres_and_sizes(anchors.to(deltas.dtype))
    wx, wy, ww, wh = BOX_WEIGHTS
    cx = deltas[:, 0] / wx * aw + ax
    cy = deltas[:, 1] / wy * ah + ay
    w = torch.exp((deltas[:, 2] / ww).clamp(max=BOX_CLAMP)) * aw
    h = torch.exp((deltas[:, 3] / wh).clamp(max=BOX_CLAMP)) * ah
    return torch.stack([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)], dim=1)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 4), (M, 4) pixel-index boxes -> (N, M) IoU with maskrcnn-benchmark's +1 areas."""
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    low = torch.maximum(a[:, None, :2], b[None, :, :2])
    high = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (high - low + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area(a)[:, None] + area(b)[None] - inter)


def atss_assign(anchors: list[torch.Tensor], boxes: torch.Tensor, topk: int = 9) -> torch.Tensor:
    """ATSS: which ground-truth box each anchor learns, or -1.

    anchors: per level (A_l, 4); boxes: (G, 4), both pixel-index boxes -> (sum A_l,) int64 box index or -1.
    For each box, the `topk` anchors of each level nearest its centre are candidates; the candidates whose IoU
    reaches the mean + std (unbiased) of the candidates' IoUs and whose centre lies more than 0.01 inside the
    box are positives; an anchor positive for several boxes takes the one it overlaps most (the first on ties).
    """
    every = torch.cat(anchors)
    matched = torch.full((len(every),), -1, dtype=torch.long, device=every.device)
    if not len(boxes):
        return matched
    iou = pairwise_iou(every, boxes)  # (A, G)
    ax, ay = (every[:, 0] + every[:, 2]) / 2, (every[:, 1] + every[:, 3]) / 2
    gx, gy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    distance = torch.sqrt((ax[:, None] - gx[None]) ** 2 + (ay[:, None] - gy[None]) ** 2)  # (A, G)
    candidates, start = [], 0
    for level in anchors:
        k = min(topk, len(level))
        nearest = distance[start:start + len(level)].topk(k, dim=0, largest=False).indices  # (k, G)
        candidates.append(nearest + start)
        start += len(level)
    candidates = torch.cat(candidates)  # (C, G)
    candidate_iou = iou.gather(0, candidates)
    threshold = candidate_iou.mean(dim=0) + candidate_iou.std(dim=0)
    positive = candidate_iou >= threshold[None]
    margins = torch.stack([ax[candidates] - boxes[None, :, 0], ay[candidates] - boxes[None, :, 1],
                           boxes[None, :, 2] - ax[candidates], boxes[None, :, 3] - ay[candidates]]).amin(dim=0)
    positive &= margins > INSIDE_MARGIN
    allowed = torch.full_like(iou, -math.inf)
    columns = torch.arange(len(boxes), device=every.device).expand_as(candidates)
    allowed[candidates[positive], columns[positive]] = iou[candidates[positive], columns[positive]]
    best, index = allowed.max(dim=1)
    return torch.where(best > -math.inf, index, matched)


def centerness(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(N, 4) boxes, (N, 4) anchors -> (N,) sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of the anchor centre
    within its box (ATSS's centerness target)."""
    ax, ay = (anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2
    left, top = ax - boxes[:, 0], ay - boxes[:, 1]
    right, bottom = boxes[:, 2] - ax, boxes[:, 3] - ay
    lr = torch.stack([left, right], 1)
    tb = torch.stack([top, bottom], 1)
    return torch.sqrt(lr.amin(1) / lr.amax(1) * tb.amin(1) / tb.amax(1))
