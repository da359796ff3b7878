"""Choosing the device a command runs on."""
from __future__ import annotations

import re

from .errors import UsageError

DEVICE_NAMES = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """`name` if it names a kind of device ovdense runs on (checked without importing torch), else UsageError."""
    if not DEVICE_NAMES.fullmatch(name):
        raise UsageError(f"--device {name!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return name


def resolve_device(name: str = "auto"):
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', 'mps' -> a torch.device that exists here.

    Raises UsageError naming --device when the device is unknown or not available on this machine."""
    import torch
    if check_device_name(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: only {count} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: Apple MPS is not available here; use --device cpu or auto")
    return device
