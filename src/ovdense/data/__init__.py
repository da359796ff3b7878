"""Images, standard segmentation datasets and their class names."""
from .datasets import DATASETS, IGNORE_INDEX, SegmentationDataset, builtin_vocabulary
from .images import ImageError, load_image

__all__ = ["DATASETS", "IGNORE_INDEX", "SegmentationDataset", "builtin_vocabulary", "ImageError", "load_image"]
