"""Choosing the device a command runs on."""
from __future__ import annotations

import functools
import logging
import re
import time

from .errors import UsageError

logger = logging.getLogger(__name__)
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


def half_precision(device):
    """The lower precision `--half` encodes images in on `device`, or None to stay in float32: float16 on CUDA and
    MPS; on a CPU bfloat16 only where it measures faster than float32 (a matmul test of about 50 ms, once per
    process): CPUs with bf16 matrix units (AMX) run it about 5x faster, CPUs without them several times slower."""
    import torch
    if device.type in ("cuda", "mps"):
        return torch.float16
    ratio = _cpu_bfloat16_time_ratio()
    if ratio < 0.8:
        return torch.bfloat16
    logger.warning("--half: bfloat16 matmuls run %.1fx the time of float32 on this CPU (no bf16 matrix units); "
                   "staying in float32", ratio)
    return None


@functools.cache
def _cpu_bfloat16_time_ratio() -> float:
    """Time of a bfloat16 matmul / the same in float32 on this CPU (best of 3 each, after a warm-up)."""
    import torch

    def best(dtype) -> float:
        a, b = torch.randn(512, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times[1:])
    return best(torch.bfloat16) / best(torch.float32)
