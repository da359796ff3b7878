"""What every detector here shares: results, input resizing, the class-agnostic RPN, proposal sampling,
post-processing (NMS / soft-NMS) and the predictor. No method-specific code."""
from .postprocess import select_detections, soft_nms
from .structures import DetectionResult

__all__ = ["DetectionResult", "select_detections", "soft_nms"]
