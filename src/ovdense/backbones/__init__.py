"""CLIP backbones with dense features (see `clip.py`) and their loading (`loading.py`; transformers CLIP folders:
`hf_clip.py`)."""
from .clip import DENSE_MODES, CLIPBackbone, DenseFeatures
from .loading import HF_CLIP, RANDOM_WEIGHTS, WeightsNotFoundError, is_model_folder, load_clip

__all__ = ["DENSE_MODES", "CLIPBackbone", "DenseFeatures", "HF_CLIP", "RANDOM_WEIGHTS", "WeightsNotFoundError",
           "is_model_folder", "load_clip"]
