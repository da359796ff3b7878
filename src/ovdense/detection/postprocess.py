"""From per-class scores of boxes to final detections: score threshold, class-wise NMS or soft-NMS, top-k."""
from __future__ import annotations

import itertools

import torch
from torchvision.ops import batched_nms

from ..catalog import NMS_KINDS


SHARED_IOU_BOXES = 4096  # distinct boxes up to which soft-NMS computes their IoU once (a 64 MB matrix at most)


def soft_nms(boxes: torch.Tensor, scores: torch.Tensor, sigma: float = 0.5, iou_threshold: float = 0.5,
             min_score: float = 0.001, method: str = "gaussian", labels: torch.Tensor | None = None,
             box_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS (Bodla et al. 2017), class-wise: (N, 4) boxes, (N,) scores, (N,) labels (default: one class) ->
    (kept indices, their new scores), in the order each class kept them.

    Within each class it repeatedly takes the best box and decays the scores of the others by their IoU u with it:
    'linear' multiplies by (1 - u) where u > iou_threshold, 'gaussian' by exp(-u^2 / sigma) everywhere
    (RegionCLIP's test setting, sigma 0.5; note /sigma, not /2 sigma^2), 'hard' zeroes them where
    u > iou_threshold (plain NMS). Boxes whose score is no longer above `min_score` are dropped. All classes
    advance together, one box each per round, so the rounds number the largest class's boxes, not all boxes.
    box_ids: (N,) which candidates share one box (class-agnostic boxes scored for several classes): the IoU of the
    distinct boxes is then computed once instead of every round (the same values).
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
    dead = float("-inf")
    current = scores.new_full((len(classes), width), dead, dtype=torch.float32)  # a dead entry is -inf
    current[rows, columns] = scores[order].float()
    every = torch.arange(len(classes), device=labels.device)

    def decay_of(overlap: torch.Tensor) -> torch.Tensor:
        if method == "gaussian":
            return torch.exp(-overlap ** 2 / sigma)
        if method == "linear":
            return torch.where(overlap > iou_threshold, 1 - overlap, torch.ones_like(overlap))
        return (overlap <= iou_threshold).float()

    if box_ids is not None and int(box_ids.max()) < SHARED_IOU_BOXES:  # the decays between the boxes, once
        distinct = boxes.float().new_zeros(int(box_ids.max()) + 1, 4).index_copy_(0, box_ids, boxes.float())
        decays = decay_of(_pairwise_iou(distinct[:, None], distinct[None])).flatten()  # (D * D,)
        table = box_ids[index.clamp(min=0)]  # (C, M) box ids
        decay_from = lambda best: decays[table[every, best][:, None] * len(distinct) + table]  # noqa: E731
    else:
        table = boxes.float()[index.clamp(min=0)]  # (C, M, 4) boxes
        decay_from = lambda best: decay_of(_pairwise_iou(table[every, best][:, None], table))  # noqa: E731
    kept, kept_scores = [], []
    for round_ in itertools.count(1):
        if round_ % 32 == 0:  # drop the dead columns once they are half the table (each row keeps its order)
            alive = current > dead
            width = int(alive.sum(dim=1).max())
            if width <= current.shape[1] // 2:
                columns = torch.argsort((~alive).to(torch.uint8), dim=1, stable=True)[:, :width]
                current, index = current.gather(1, columns), index.gather(1, columns)
                table = table[every[:, None], columns]
        best = current.argmax(dim=1)  # (C,) the first best of each row
        top = current[every, best]
        busy = top > dead
        if not busy.any():
            break
        kept.append(index[every, best][busy])
        kept_scores.append(top[busy])
        current[every, best] = dead
        current = current * decay_from(best)  # (C, M); a dead entry stays -inf (or NaN where the decay is 0)
        current.masked_fill_(~(current > min_score), dead)
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
    class_agnostic = boxes.dim() == 2  # each row's box serves every class
    per_class = boxes[:, None].expand(-1, classes, 4) if class_agnostic else boxes
    candidate = scores > score_threshold
    rows, labels = candidate.nonzero(as_tuple=True)
    boxes, scores = per_class[rows, labels], scores[rows, labels]
    if nms == "class":
        keep = batched_nms(boxes.float(), scores.float(), labels, iou_threshold)
        rows, scores, labels = rows[keep], scores[keep], labels[keep]
    elif nms == "soft":
        keep, scores = soft_nms(boxes, scores, soft_nms_sigma, iou_threshold, soft_nms_min_score, soft_nms_method,
                                labels=labels, box_ids=rows if class_agnostic else None)
        rows, labels = rows[keep], labels[keep]
    order = torch.argsort(scores, descending=True, stable=True)[:max_detections]
    return rows[order], labels[order], scores[order]
