"""Tensor operations shared by the methods: PAMR refinement and sliding-window inference."""
from .pamr import PAMR
from .sliding_window import crop_windows, merge_windows, short_side_size, sliding_windows

__all__ = ["PAMR", "crop_windows", "merge_windows", "short_side_size", "sliding_windows"]
