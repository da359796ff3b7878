"""Evaluation: streaming segmentation metrics, detection metrics (COCO, OV-COCO, LVIS) and the evaluation loops."""
from .detection import PROTOCOLS, default_protocol, evaluate_detection, score_detections
from .evaluate import evaluate_segmentation
from .metrics import SegmentationMetric, format_table, group_means

__all__ = ["PROTOCOLS", "SegmentationMetric", "default_protocol", "evaluate_detection", "evaluate_segmentation",
           "format_table", "group_means", "score_detections"]
