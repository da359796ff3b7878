"""Evaluation: streaming segmentation metrics and the dataset evaluation loop."""
from .evaluate import evaluate_segmentation
from .metrics import SegmentationMetric, format_table, group_means

__all__ = ["SegmentationMetric", "evaluate_segmentation", "format_table", "group_means"]
