"""torchrun support: join the process group that torchrun describes in the environment."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group (NCCL on GPU, else Gloo) when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, ...) on each rank -> (world * B, ...) from all ranks, differentiable, and this rank's offset in it."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x.contiguous())), dist.get_rank() * x.shape[0]
