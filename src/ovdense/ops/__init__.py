"""Tensor operations shared by the methods: PAMR refinement, resizing and sliding-window inference."""
from .pamr import PAMR
from .resize import resize_image, short_side_size, upsampled_rows
from .sliding_window import crop_padding, crop_windows, merge_windows, sliding_windows

__all__ = ["PAMR", "crop_padding", "crop_windows", "merge_windows", "resize_image", "short_side_size",
           "sliding_windows", "upsampled_rows"]
