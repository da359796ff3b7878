"""Train TCL from image-caption pairs with the shared engine (`ovdense train tcl --config ...`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch

from ..backbones import load_clip
from ..data.captions import ImageTextDataset, expand_sources
from ..errors import InputError
from ..methods.tcl import TCL, TCLLossWeights
from ..predictor import IMAGENET_MEAN_STD
from . import checks
from .checks import within
from .recipe import MethodRecipe, check_eval, check_synthesize, finish_run, segmentation_evaluator, start_run
from .trainer import Trainer, seeded


TCL_DATA_KEYS = ("sources", "text", "image_size", "scale", "normalize", "synthesize")


@dataclass
class TCLRecipe(MethodRecipe):
    """A TCL training recipe (YAML).

    model, weights: the frozen CLIP (open_clip name and tag / file); a ViT.
    method: TCL constructor arguments; loss: TCLLossWeights fields.
    decoder_only_steps: the first steps train the decoder only, not the copied last block (the
        paper's 30k of 50k).
    data: sources (CSV / JSONL / tar patterns, one or a list), text ('caption' or 'phrase'), image_size,
        scale (random-resized-crop area range, 0 < low <= high <= 1), normalize ('model': the CLIP's mean / std,
        the default; 'imagenet': ImageNet's, as kakaobrain/tcl trains and evaluates, to pair with the 'tcl'
        preset), and optionally synthesize ({root, size, seed, max_objects, train, val}: export the synthetic
        world there first). Paths are relative to the current directory.
    eval: {dataset, root, split, limit, preset} evaluated every train.eval_every steps.
    train: TrainConfig fields; train.seed also draws the grounder's initial weights.
    export: where the trained grounder goes (safetensors); relative: in the run's output folder; default
        OUT/tcl.safetensors.
    """

    model: str = "ViT-B-16"
    method: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    decoder_only_steps: int = 0
    eval: dict | None = None

    def check_model(self) -> None:
        super().check_model()
        vision = (open_clip.get_model_config(self.model) or {}).get("vision_cfg", {})
        if isinstance(vision.get("layers"), (list, tuple)):
            raise InputError(f"model: TCL grounds ViT patch tokens; {self.model} is a ResNet CLIP. Use a ViT CLIP.")

    def check_keys(self) -> None:
        method = checks.arguments(self.method, TCL.__init__, "method", exclude=("self", "backbone"))
        with within("method."):
            checks.integer("decoder_layers", method.get("decoder_layers", 2), minimum=0)
            checks.integer("kernel_size", method.get("kernel_size", 3), minimum=1)
            if method.get("kernel_size", 3) % 2 == 0:
                raise InputError(f"kernel_size: must be odd (the maps keep their size), got {method['kernel_size']}")
            checks.number("gumbel_tau", method.get("gumbel_tau", 1.0), positive=True)
            checks.number("kp_weight", method.get("kp_weight", 0.3), minimum=0, maximum=1)
        loss = checks.arguments(self.loss, TCLLossWeights, "loss")
        with within("loss."):
            for key, value in loss.items():
                checks.number(key, value, minimum=0)
        checks.integer("decoder_only_steps", self.decoder_only_steps, minimum=0)
        data = checks.mapping("data", self.data)
        with within("data."):
            checks.known_keys(data, TCL_DATA_KEYS, "the data section of a TCL recipe")
            sources = checks.required(data, "sources", "a TCL recipe (caption files or shards)")
            if not isinstance(sources, (str, list)) or not sources:
                raise InputError(f"sources: must be a path or a non-empty list of paths, got {sources!r}")
            for i, source in enumerate([sources] if isinstance(sources, str) else sources):
                checks.text(f"sources[{i}]", source)
            checks.choice("text", data.get("text", "caption"), ("caption", "phrase"))
            checks.choice("normalize", data.get("normalize", "model"), ("model", "imagenet"))
            if "image_size" in data:
                checks.integer("image_size", data["image_size"], minimum=1)
            checks.pair("scale", data.get("scale", (0.5, 1.0)),
                        lambda key, v: checks.number(key, v, positive=True, maximum=1), ordered=True)
            if data.get("synthesize") is not None:
                check_synthesize(data["synthesize"])
        check_eval(self.eval)

    def sources(self) -> list[str]:
        sources = self.data["sources"]
        return [sources] if isinstance(sources, str) else list(sources)


def _collate(items):
    images, texts = zip(*items)
    return torch.stack(images), list(texts)


def build_tcl(recipe: TCLRecipe, backbone) -> TCL:
    """The TCL grounder over `backbone`, its new layers drawn from train.seed."""
    with seeded(recipe.train_config().seed):
        return TCL(backbone, **(recipe.method or {}))


def _check_sources(recipe: TCLRecipe) -> None:
    """Every caption file / shard of data.sources exists (after synthesize), before the CLIP is loaded."""
    for source in recipe.sources():
        try:
            if not expand_sources(source):
                raise FileNotFoundError(f"no file matches {source}")
        except (OSError, ValueError) as error:
            raise InputError(f"{recipe.source or 'TCLRecipe'}: data.sources: {error}") from error


def train_tcl(recipe: TCLRecipe, out_dir: str | Path, device: str = "cpu", resume: bool = True,
              max_steps: int | None = None, progress: bool = True) -> tuple[TCL, Path | None]:
    """Train, then save the grounder; returns the model and the path of the saved grounder.

    The recipe is checked first; its data is synthesized and found before the CLIP is loaded. A run stopped by
    `max_steps` before train.steps saves nothing (the path is None): it resumes from out_dir/last.pt.
    """
    out_dir, export, config = start_run(recipe, out_dir, "tcl", resume, progress)
    _check_sources(recipe)
    with within(f"{recipe.source or 'TCLRecipe'}: "):
        evaluate = segmentation_evaluator(recipe.eval, lambda m: m.tcl)
    backbone = load_clip(recipe.model, recipe.weights, device=device)
    model = build_tcl(recipe, backbone)
    size = recipe.data.get("image_size", backbone.image_size)
    mean, std = (IMAGENET_MEAN_STD if recipe.data.get("normalize", "model") == "imagenet"
                 else (backbone.image_mean, backbone.image_std))
    dataset = ImageTextDataset(recipe.sources(), size, mean, std,
                               text=recipe.data.get("text", "caption"), scale=recipe.data.get("scale", (0.5, 1.0)),
                               seed=config.seed, progress=progress)
    weights = TCLLossWeights(**(recipe.loss or {}))
    trainer = None

    def loss_fn(wrapped, batch):
        images, texts = batch
        return wrapped(images, texts, weights, train_block=trainer.step >= recipe.decoder_only_steps)

    run = {"method": "tcl", "recipe": recipe.source,
           "model": {"model": recipe.model, "weights": recipe.weights, "method": model.config}}
    trainer = Trainer(_Losses(model), loss_fn, dataset, config, out_dir, collate=_collate, evaluate=evaluate,
                      device=device, progress=progress, find_unused_parameters=recipe.decoder_only_steps > 0,
                      run=run)
    trainer.fit(resume=resume, max_steps=max_steps)
    saved = finish_run(trainer, export, lambda: model.save(export, preset=(recipe.eval or {}).get("preset")))
    return model.eval(), saved


class _Losses(torch.nn.Module):
    """TCL with `forward` = its losses, so that DistributedDataParallel wraps the call that trains."""

    def __init__(self, tcl: TCL):
        super().__init__()
        self.tcl = tcl

    def forward(self, images, texts, weights, train_block=True):
        return self.tcl.losses(images, texts, weights, train_block)
