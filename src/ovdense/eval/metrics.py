"""Semantic-segmentation metrics from a streaming confusion matrix (mmseg's definitions)."""
from __future__ import annotations

import numpy as np
import torch


class SegmentationMetric:
    """Accumulates a (K, K) confusion matrix (rows: ground truth, columns: prediction).

    Pixels whose target equals `ignore_index` (or lies outside 0..K-1) are not counted.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros((num_classes, num_classes), dtype=torch.int64)

    def update(self, prediction, target) -> None:
        """prediction, target: (H, W) integer arrays or tensors of the same shape."""
        prediction = torch.as_tensor(np.array(prediction)).long().flatten()
        target = torch.as_tensor(np.array(target)).long().flatten()
        if prediction.shape != target.shape:
            raise ValueError(f"prediction has {prediction.numel()} pixels but the target {target.numel()}")
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        if (prediction[valid] >= self.num_classes).any() or (prediction[valid] < 0).any():
            raise ValueError(f"predicted labels must lie in 0..{self.num_classes - 1}")
        k = self.num_classes
        self.confusion += torch.bincount(target[valid] * k + prediction[valid], minlength=k * k).view(k, k)

    def merge(self, other: "SegmentationMetric") -> None:
        self.confusion += other.confusion

    def compute(self) -> dict:
        """{'mIoU', 'mAcc', 'aAcc'} in percent, and per-class 'IoU' and 'Acc' lists (NaN for absent classes).

        IoU_k = TP / (TP + FP + FN), NaN when the class is neither in the targets nor predicted;
        Acc_k = TP / (TP + FN), NaN when the class is not in the targets; means skip NaNs.
        """
        conf = self.confusion.double()
        tp = conf.diag()
        gt = conf.sum(dim=1)
        pred = conf.sum(dim=0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
        total = gt.sum()
        return {
            "mIoU": 100 * float(np.nanmean(iou.numpy())) if (union > 0).any() else float("nan"),
            "mAcc": 100 * float(np.nanmean(acc.numpy())) if (gt > 0).any() else float("nan"),
            "aAcc": 100 * float(tp.sum() / total) if total > 0 else float("nan"),
            "IoU": (100 * iou).tolist(),
            "Acc": (100 * acc).tolist(),
        }


def format_table(metrics: dict, class_names: list[str]) -> str:
    """A plain-text table: one row per class (IoU, Acc), then the summary line."""
    width = max(12, *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}", "-" * (width + 18)]
    for name, iou, acc in zip(class_names, metrics["IoU"], metrics["Acc"]):
        lines.append(f"{name:<{width}}  {iou:7.2f}  {acc:7.2f}")
    lines.append("-" * (width + 18))
    lines.append(f"mIoU {metrics['mIoU']:.2f}   mAcc {metrics['mAcc']:.2f}   aAcc {metrics['aAcc']:.2f}")
    return "\n".join(lines)


def group_means(iou: list[float], names: list[str], groups: dict[str, list[str]]) -> dict[str, float]:
    """Mean IoU over named groups of classes, e.g. {'base': [...], 'novel': [...]} (NaN classes skipped)."""
    values = np.array(iou, dtype=float)
    return {group: float(np.nanmean(values[[names.index(c) for c in members]])) if members else float("nan")
            for group, members in groups.items()}
