"""The shared training loop (`trainer.py`) and the CLIP pre-training on the synthetic world (`clip_pretrain.py`)."""
from .trainer import TrainConfig, Trainer, batch_positions, lr_at

__all__ = ["TrainConfig", "Trainer", "batch_positions", "lr_at"]
