"""Open-vocabulary dense prediction methods; each turns crops and text embeddings into per-position scores."""
from .maskclip import MaskCLIP, key_smoothing

METHODS = {"maskclip": MaskCLIP}

__all__ = ["METHODS", "MaskCLIP", "key_smoothing"]
