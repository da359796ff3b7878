"""Fine-tune DenseCLIP (or its no-language baseline) on a segmentation dataset with the shared engine
(`ovdense train denseclip --config ...`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbones import load_clip
from ..data import SegmentationDataset
from ..data.transforms import AugmentedSegmentation, SegmentationAugment
from ..methods.denseclip import DenseCLIP
from .recipe import ensure_synthetic, segmentation_evaluator
from .trainer import TrainConfig, Trainer


@dataclass
class DenseCLIPRecipe:
    """A DenseCLIP training recipe (YAML).

    model, weights: the CLIP it starts from. method: DenseCLIP constructor arguments (class_names
        default to the training dataset's). data: dataset, root, split, optional synthesize (see
        TCLRecipe) and `augment` (SegmentationAugment fields). train: TrainConfig fields; the paper
        uses lr_mult {'denseclip.backbone': 0.1} (the text tower is frozen anyway).
    """

    model: str = "RN50"
    weights: str = "openai"
    method: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    eval: dict | None = None
    train: dict = field(default_factory=dict)
    export: str | None = None


class _Losses(torch.nn.Module):
    """DenseCLIP with `forward` = its losses, for DistributedDataParallel."""

    def __init__(self, denseclip: DenseCLIP):
        super().__init__()
        self.denseclip = denseclip

    def forward(self, images, labels):
        return self.denseclip.losses(images, labels)


def train_denseclip(recipe: DenseCLIPRecipe, out_dir: str | Path, device: str = "cpu", resume: bool = True,
                    max_steps: int | None = None, progress: bool = True) -> tuple[DenseCLIP, Path]:
    """Train, then save the model; returns it and the path of the saved weights."""
    data = recipe.data
    ensure_synthetic(data.get("synthesize"), progress)
    segmentation = SegmentationDataset(data["dataset"], data["root"], data.get("split", "train"))
    backbone = load_clip(recipe.model, recipe.weights, device=device)
    method = {"class_names": segmentation.vocabulary.names, **recipe.method}
    model = DenseCLIP(backbone, **method)
    augment = SegmentationAugment(**data.get("augment", {}))
    dataset = AugmentedSegmentation(segmentation, augment, backbone.image_mean, backbone.image_std,
                                    seed=recipe.train.get("seed", 0))
    config = TrainConfig(**recipe.train)
    trainer = Trainer(_Losses(model), lambda wrapped, batch: wrapped(*batch), dataset, config, out_dir,
                      evaluate=segmentation_evaluator(recipe.eval, lambda m: m.denseclip), device=device,
                      progress=progress)
    trainer.fit(resume=resume, max_steps=max_steps)
    export = Path(recipe.export or Path(out_dir) / "denseclip.safetensors")
    if trainer.rank == 0:
        model.save(export)
    return model.eval(), export
