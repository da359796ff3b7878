"""CLIP backbones with dense features (see `clip.py`) and their loading (`loading.py`)."""
from .clip import DENSE_MODES, CLIPBackbone, DenseFeatures
from .loading import RANDOM_WEIGHTS, WeightsNotFoundError, load_clip

__all__ = ["DENSE_MODES", "CLIPBackbone", "DenseFeatures", "RANDOM_WEIGHTS", "WeightsNotFoundError", "load_clip"]
