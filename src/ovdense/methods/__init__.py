"""Open-vocabulary dense prediction methods; each turns crops and text embeddings into per-position scores.

Training-free methods are built from a backbone; trained ones are loaded from their checkpoints
(`load_method`), which record the CLIP they were trained on.
"""
from __future__ import annotations

from ..backbones import load_clip
from ..catalog import TRAINED_METHODS
from ..errors import CheckpointError, UsageError
from ..shipped import SHIPPED_TAG, shipped
from .base import DenseMethod, read_trained
from .maskclip import MaskCLIP, refine_output
from .denseclip import DenseCLIP
from .tcl import TCL
from .regionclip import RegionCLIPDetector
from .glip import GLIPDetector

METHODS = {"maskclip": MaskCLIP, "tcl": TCL, "denseclip": DenseCLIP}
DETECTORS = {"regionclip": RegionCLIPDetector, "glip": GLIPDetector}
DEFAULT_DETECTION_PRESETS = {"regionclip": "ov-coco", "glip": "glip"}


def load_method(name: str, model: str | None = None, weights: str | None = None, mode: str | None = None,
                checkpoint: str | None = None, device: str = "cpu") -> DenseMethod:
    """A ready-to-use method: trained methods from `checkpoint` (model / weights override the recorded
    CLIP), training-free ones from the CLIP `model` / `weights` and the dense `mode`."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    if name in TRAINED_METHODS:
        if not checkpoint:
            raise UsageError(f"method {name!r} is trained: pass its checkpoint (--checkpoint PATH), "
                             f"made by `ovdense train {name} --config ...`")
        recorded = read_trained(checkpoint, tensors=False)[0]["model"]
        if model and model != recorded:
            raise ValueError(f"{checkpoint} was trained on {recorded}, not {model}")
        return METHODS[name].from_checkpoint(checkpoint, device=device, weights=weights)
    if checkpoint:
        raise UsageError(f"method {name!r} is training-free and takes no --checkpoint")
    return METHODS[name](load_clip(model, weights, device=device), mode=mode or "maskclip")


def recommended_preset(name: str, model: str | None = None, weights: str | None = None,
                       checkpoint: str | None = None) -> str | None:
    """The inference preset that a trained checkpoint or shipped weights record, or None."""
    if name in TRAINED_METHODS and checkpoint:
        return read_trained(checkpoint, tensors=False)[0].get("preset")
    packaged = shipped("clip", model, weights)
    return packaged.preset if packaged else None


def load_detector(name: str = "regionclip", checkpoint: str | None = None, weights: str | None = None,
                  device: str = "cpu"):
    """A trained detector from `checkpoint` (its CLIP from the recorded name and weights, or `weights`), or the one
    shipped in the package as `weights` (e.g. 'synthetic'); returns (detector, its recommended preset or None)."""
    if name not in DETECTORS:
        raise UsageError(f"unknown detection method {name!r}; choose one of {', '.join(DETECTORS)}")
    if not checkpoint:
        packaged = shipped("detector", name, weights)
        if packaged is None:
            raise UsageError(f"{name} needs a trained detector: --checkpoint FILE (from `ovdense train {name}`) or "
                             f"--weights {SHIPPED_TAG} for the one shipped with ovdense")
        if not packaged.path.is_file():
            raise CheckpointError(f"this ovdense does not ship the {name} detector for --weights {weights} "
                                  f"({packaged.file}); make it with `{packaged.command}` and pass --checkpoint "
                                  f"RUN/{name}.safetensors")
        return DETECTORS[name].from_checkpoint(packaged.path, device=device), packaged.preset
    metadata = read_trained(checkpoint, tensors=False)[0]
    return DETECTORS[name].from_checkpoint(checkpoint, device=device, weights=weights), metadata.get("preset")


__all__ = ["DEFAULT_DETECTION_PRESETS", "DETECTORS", "GLIPDetector", "RegionCLIPDetector", "load_detector", "METHODS", "TRAINED_METHODS", "DenseCLIP", "DenseMethod", "MaskCLIP", "TCL", "load_method", "recommended_preset",
           "refine_output"]
