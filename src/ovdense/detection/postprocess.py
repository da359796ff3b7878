"""From per-class scores of boxes to final detections: score threshold, class-wise NMS or soft-NMS, top-k."""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from ..catalog import NMS_KINDS


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, sigma: float = 0.5, iou_threshold: float = 0.5,
             min_score: float = 0.001, method: str = "gaussian", labels: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS (Bodla et al. 2017), class-wise: (N, 4) boxes, (N,) scores, (N,) labels (default: one class) ->
    (kept indices, their new scores), in the order each class kept them.

    Within each class it repeatedly takes the best box and decays the scores of the others by their IoU u with it:
    'linear' multiplies by (1 - u) where u > iou_threshold, 'gaussian' by exp(-u^2 / sigma) everywhere
    (RegionCLIP's test setting, sigma 0.5; note /sigma, not /2 sigma^2), 'hard' zeroes them where
    u > iou_threshold (plain NMS). Boxes whose score is no longer above `min_score` are dropped. All classes
    advance together, one box each per round, so the rounds number the largest class's boxes, not all boxes.
    """
    if method not in ("linear", "gaussian", "hard"):
        raise ValueError(f"soft-NMS method must be 'linear', 'gaussian' or 'hard', got {method!r}")
    labels = torch.zeros(len(scores), dtype=torch.long, device=scores.device) if labels is None else labels
    if not len(scores):
        return torch.zeros(0, dtype=torch.long, device=scores.device), scores.new_zeros(0, dtype=torch.float32)
    # one row per class, its boxes in index order, padded: (C, M) scores and indices, (C, M, 4) boxes
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    rows = torch.repeat_interleave(torch.arange(len(classes), device=labels.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    columns = torch.arange(len(order), device=labels.device) - starts[rows]
    width = int(counts.max())
    index = torch.full((len(classes), width), -1, dtype=torch.long, device=labels.device)
    index[rows, columns] = order
    current = scores.new_zeros(len(classes), width, dtype=torch.float32)
    current[rows, columns] = scores[order].float()
    alive = index >= 0
    grouped = boxes.float()[index.clamp(min=0)]
    every = torch.arange(len(classes), device=labels.device)
    kept, kept_scores = [], []
    while alive.any():
        busy = alive.any(dim=1)
        best = torch.where(alive, current, current.new_tensor(-1.0)).argmax(dim=1)  # (C,) first best of each row
        kept.append(index[every, best][busy])
        kept_scores.append(current[every, best][busy])
        alive[every, best] = False
        overlap = _pairwise_iou(grouped[every, best][:, None], grouped)  # (C, M)
        if method == "gaussian":
            decay = torch.exp(-overlap ** 2 / sigma)
        elif method == "linear":
            decay = torch.where(overlap > iou_threshold, 1 - overlap, torch.ones_like(overlap))
        else:
            decay = (overlap <= iou_threshold).float()
        current = torch.where(alive, current * decay, current)
        alive &= current > min_score
    kept, kept_scores = torch.cat(kept), torch.cat(kept_scores)
    by_class = torch.argsort(labels[kept], stable=True)  # each class's boxes together, in the order it kept them
    return kept[by_class], kept_scores[by_class]


def _pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of (..., 4) xyxy boxes broadcast against each other."""
    width = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    height = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = width * height
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float = 0.05, nms: str = "class",
                      iou_threshold: float = 0.5, max_detections: int = 100, soft_nms_sigma: float = 0.5,
                      soft_nms_method: str = "gaussian", soft_nms_min_score: float = 0.001
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """detectron2's `fast_rcnn_inference_single_image` on one image: (R, 4) class-agnostic boxes (or (R, K, 4)
    per-class) and (R, K) class scores -> (N, 4) boxes, (N,) scores, (N,) labels, best first, N <= max_detections.
    See `select_pairs` for the arguments."""
    rows, labels, scores = select_pairs(boxes, scores, score_threshold, nms, iou_threshold, max_detections,
                                        soft_nms_sigma, soft_nms_method, soft_nms_min_score)
    return (boxes[rows, labels] if boxes.dim() == 3 else boxes[rows]), scores, labels


def select_pairs(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float = 0.05, nms: str = "class",
                 iou_threshold: float = 0.5, max_detections: int = 100, soft_nms_sigma: float = 0.5,
                 soft_nms_method: str = "gaussian", soft_nms_min_score: float = 0.001
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (box, class) pairs `select_detections` keeps: (N,) box rows, (N,) classes, (N,) scores, best first.

    Every (box, class) pair scoring above `score_threshold` is a candidate; nms: 'class' (class-wise NMS at
    `iou_threshold`), 'soft' (class-wise soft-NMS, its IoU threshold is `iou_threshold`) or 'none'.
    """
    if nms not in NMS_KINDS:
        raise ValueError(f"nms must be one of {', '.join(NMS_KINDS)}, got {nms!r}")
    classes = scores.shape[1]
    per_class = boxes if boxes.dim() == 3 else boxes[:, None].expand(-1, classes, 4)
    candidate = scores > score_threshold
    rows, labels = candidate.nonzero(as_tuple=True)
    boxes, scores = per_class[rows, labels], scores[rows, labels]
    if nms == "class":
        keep = batched_nms(boxes.float(), scores.float(), labels, iou_threshold)
        rows, scores, labels = rows[keep], scores[keep], labels[keep]
    elif nms == "soft":
        keep, scores = soft_nms(boxes, scores, soft_nms_sigma, iou_threshold, soft_nms_min_score, soft_nms_method,
                                labels=labels)
        rows, labels = rows[keep], labels[keep]
    order = torch.argsort(scores, descending=True, stable=True)[:max_detections]
    return rows[order], labels[order], scores[order]
