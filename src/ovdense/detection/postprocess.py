"""From per-class scores of boxes to final detections: score threshold, class-wise NMS or soft-NMS, top-k."""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_iou

from ..catalog import NMS_KINDS


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, sigma: float = 0.5, iou_threshold: float = 0.5,
             min_score: float = 0.001, method: str = "gaussian") -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS (Bodla et al. 2017) of one class: (N, 4) boxes, (N,) scores -> (kept indices, their new scores),
    best first.

    Repeatedly takes the best box and decays the scores of the others by their IoU u with it: 'linear'
    multiplies by (1 - u) where u > iou_threshold, 'gaussian' by exp(-u^2 / sigma) everywhere (RegionCLIP's test
    setting, sigma 0.5; note /sigma, not /2 sigma^2), 'hard' zeroes them where u > iou_threshold (plain NMS). Boxes
    whose score is no longer above `min_score` are dropped.
    """
    if method not in ("linear", "gaussian", "hard"):
        raise ValueError(f"soft-NMS method must be 'linear', 'gaussian' or 'hard', got {method!r}")
    scores = scores.clone().float()
    remaining = torch.arange(len(scores), device=scores.device)
    iou = box_iou(boxes, boxes)
    kept, kept_scores = [], []
    while remaining.numel():
        best = int(torch.argmax(scores[remaining]))
        index = remaining[best]
        kept.append(index)
        kept_scores.append(scores[index])
        remaining = torch.cat([remaining[:best], remaining[best + 1:]])
        overlap = iou[index, remaining]
        if method == "gaussian":
            decay = torch.exp(-overlap ** 2 / sigma)
        elif method == "linear":
            decay = torch.where(overlap > iou_threshold, 1 - overlap, torch.ones_like(overlap))
        else:
            decay = (overlap <= iou_threshold).float()
        scores[remaining] *= decay
        remaining = remaining[scores[remaining] > min_score]
    if not kept:
        return torch.zeros(0, dtype=torch.long, device=scores.device), scores.new_zeros(0)
    return torch.stack(kept), torch.stack(kept_scores)


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float = 0.05, nms: str = "class",
                      iou_threshold: float = 0.5, max_detections: int = 100, soft_nms_sigma: float = 0.5,
                      soft_nms_method: str = "gaussian", soft_nms_min_score: float = 0.001
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """detectron2's `fast_rcnn_inference_single_image` on one image: (R, 4) class-agnostic boxes (or (R, K, 4)
    per-class) and (R, K) class scores -> (N, 4) boxes, (N,) scores, (N,) labels, best first, N <= max_detections.

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
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    elif nms == "soft":
        parts = []
        for label in labels.unique().tolist():
            index = (labels == label).nonzero(as_tuple=True)[0]
            kept, new_scores = soft_nms(boxes[index], scores[index], soft_nms_sigma, iou_threshold,
                                        soft_nms_min_score, soft_nms_method)
            parts.append((index[kept], new_scores))
        index = torch.cat([p[0] for p in parts]) if parts else rows[:0]
        new_scores = torch.cat([p[1] for p in parts]) if parts else scores[:0].float()
        boxes, scores, labels = boxes[index], new_scores, labels[index]
    order = torch.argsort(scores, descending=True, stable=True)[:max_detections]
    return boxes[order], scores[order], labels[order]
