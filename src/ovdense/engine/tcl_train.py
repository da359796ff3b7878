"""Train TCL from image-caption pairs with the shared engine (`ovdense train tcl --config ...`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbones import load_clip
from ..data.captions import ImageTextDataset
from ..methods.tcl import TCL, TCLLossWeights
from .recipe import ensure_synthetic, segmentation_evaluator
from .trainer import TrainConfig, Trainer


@dataclass
class TCLRecipe:
    """A TCL training recipe (YAML).

    model, weights: the frozen CLIP (open_clip name and tag / file).
    method: TCL constructor arguments; loss: TCLLossWeights fields.
    decoder_only_steps: the first steps train the decoder only, not the copied last block (the
        paper's 30k of 50k).
    data: sources (CSV / JSONL / tar patterns), text ('caption' or 'phrase'), image_size, scale
        (random-resized-crop area range), and optionally synthesize ({root, size, seed, max_objects,
        train, val}: export the synthetic world there first).
    eval: {dataset, root, split, limit, preset} evaluated every train.eval_every steps.
    export: where the trained grounder goes (safetensors); default OUT/tcl.safetensors.
    """

    model: str = "ViT-B-16"
    weights: str = "openai"
    method: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    decoder_only_steps: int = 0
    data: dict = field(default_factory=dict)
    eval: dict | None = None
    train: dict = field(default_factory=dict)
    export: str | None = None


def _collate(items):
    images, texts = zip(*items)
    return torch.stack(images), list(texts)


def train_tcl(recipe: TCLRecipe, out_dir: str | Path, device: str = "cpu", resume: bool = True,
              max_steps: int | None = None, progress: bool = True) -> tuple[TCL, Path]:
    """Train, then save the grounder; returns the model and the path of the saved grounder."""
    ensure_synthetic(recipe.data.get("synthesize"), progress)
    backbone = load_clip(recipe.model, recipe.weights, device=device)
    model = TCL(backbone, **recipe.method)
    size = recipe.data.get("image_size", backbone.visual.image_size[0])
    dataset = ImageTextDataset(recipe.data["sources"], size, backbone.image_mean, backbone.image_std,
                               text=recipe.data.get("text", "caption"), scale=recipe.data.get("scale", (0.5, 1.0)),
                               progress=progress)
    weights = TCLLossWeights(**recipe.loss)
    trainer = None

    def loss_fn(wrapped, batch):
        images, texts = batch
        return wrapped(images, texts, weights, train_block=trainer.step >= recipe.decoder_only_steps)

    config = TrainConfig(**recipe.train)
    trainer = Trainer(_Losses(model), loss_fn, dataset, config, out_dir, collate=_collate,
                      evaluate=segmentation_evaluator(recipe.eval, lambda m: m.tcl), device=device, progress=progress,
                      find_unused_parameters=recipe.decoder_only_steps > 0)
    trainer.fit(resume=resume, max_steps=max_steps)
    export = Path(recipe.export or Path(out_dir) / "tcl.safetensors")
    if trainer.rank == 0:
        model.save(export)
    return model.eval(), export


class _Losses(torch.nn.Module):
    """TCL with `forward` = its losses, so that DistributedDataParallel wraps the call that trains."""

    def __init__(self, tcl: TCL):
        super().__init__()
        self.tcl = tcl

    def forward(self, images, texts, weights, train_block=True):
        return self.tcl.losses(images, texts, weights, train_block)
