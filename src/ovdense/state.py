"""What a trained model's checkpoint holds: its trained state, and loading it back strictly.

trained_state(model) -> {name: tensor}: the trainable parameters (requires_grad) and every buffer (e.g. BatchNorm
running statistics), as in model.state_dict(), each tensor of its parameter's or buffer's shape. Frozen weights are
left out: they come from where the model was built from (a CLIP's weights file). Training checkpoints (last.pt's
"model") and the methods' exported safetensors files both hold this dict.
"""
from __future__ import annotations

import torch
from torch import nn

from .errors import CheckpointError


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's trainable parameters and its buffers (e.g. BatchNorm statistics); frozen weights are left out
    of checkpoints, they come from where the model was built from."""
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    return {k: v for k, v in model.state_dict().items() if k in keep}


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a `trained_state`; every trainable parameter and buffer must be in it, and nothing else.

    source: where `state` was read from, for the CheckpointError a state of another model gets."""
    missing = sorted(set(trained_state(model)) - set(state))
    unexpected = sorted(set(state) - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not fit this {type(model).__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # tensors of other shapes: another model size
        raise CheckpointError(f"{source} does not fit this {type(model).__name__}: {error}") from error
