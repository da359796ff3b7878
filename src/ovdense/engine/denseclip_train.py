"""Fine-tune DenseCLIP (or its no-language baseline) on a segmentation dataset with the shared engine
(`ovdense train denseclip --config ...`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..backbones import load_clip
from ..data.transforms import AugmentedSegmentation, SegmentationAugment
from ..errors import InputError
from ..methods.denseclip import PYRAMID_LAYOUTS, DenseCLIP
from . import checks
from .checks import within
from .recipe import (MethodRecipe, check_dataset_keys, check_eval, check_synthesize, finish_run,
                     segmentation_dataset, segmentation_evaluator, start_run)
from .trainer import Trainer, seeded


DENSECLIP_DATA_KEYS = ("dataset", "root", "split", "synthesize", "augment")
_POSITIVE_INTEGERS = ("context_tokens", "name_length", "decoder_width", "decoder_heads", "decoder_layers",
                      "fpn_channels")


@dataclass
class DenseCLIPRecipe(MethodRecipe):
    """A DenseCLIP training recipe (YAML).

    model, weights: the CLIP it starts from. method: DenseCLIP constructor arguments (class_names
        default to the training dataset's; the official recipes set train_size to the crop and loss_average
        'all'). data: dataset, root, split, optional synthesize (see
        TCLRecipe) and `augment` (SegmentationAugment fields); paths relative to the current directory.
        train: TrainConfig fields; the paper uses lr_mult {'denseclip.backbone': 0.1} (the text tower is
        frozen anyway); train.seed also draws the new layers' initial weights.
    export: where the trained model goes (safetensors); relative: in the run's output folder; default
        OUT/denseclip.safetensors.
    """

    method: dict = field(default_factory=dict)
    eval: dict | None = None

    def check_keys(self) -> None:
        method = checks.arguments(self.method, DenseCLIP.__init__, "method", exclude=("self", "backbone"))
        with within("method."):
            checks.choice("prompting", method.get("prompting", "post"), ("post", "pre"))
            checks.choice("inference", method.get("inference", "head"), ("head", "score_map"))
            if method.get("inference") == "score_map" and method.get("language_guidance") is False:
                raise InputError("inference: the baseline (language_guidance: false) has no score map; use 'head'")
            for key in _POSITIVE_INTEGERS:
                checks.integer(key, method.get(key, 1), minimum=1)
            checks.choice("loss_average", method.get("loss_average", "valid"), ("valid", "all"))
            checks.choice("pyramid", method.get("pyramid", "official"), PYRAMID_LAYOUTS)
            checks.number("tau", method.get("tau", 0.07), positive=True)
            checks.number("aux_weight", method.get("aux_weight", 0.4), minimum=0)
            if method.get("train_size") is not None:
                checks.integer("train_size", method["train_size"], minimum=1)
            for key in ("language_guidance", "class_embedding_twice", "text_tower_in_file"):
                checks.boolean(key, method.get(key, False))
            names = method.get("class_names")
            if names is not None:
                if not isinstance(names, list) or not names:
                    raise InputError(f"class_names: must be a non-empty list of names, got {names!r}")
                for i, name in enumerate(names):
                    checks.text(f"class_names[{i}]", name)
                if len(set(names)) != len(names):
                    raise InputError("class_names: the names must be distinct")
            if method.get("levels") is not None:
                levels = method["levels"]
                if not isinstance(levels, list) or len(levels) != 4:
                    raise InputError(f"levels: must be a list of 4 backbone levels, got {levels!r}")
                for i, level in enumerate(levels):
                    checks.integer(f"levels[{i}]", level, minimum=0)
            if method.get("score_level") is not None:
                score_level = checks.integer("score_level", method["score_level"], minimum=0)
                if score_level > 3:
                    raise InputError(f"score_level: one of the 4 levels (0..3), got {score_level}")
        data = checks.mapping("data", self.data)
        with within("data."):
            checks.known_keys(data, DENSECLIP_DATA_KEYS, "the data section of a DenseCLIP recipe")
            check_dataset_keys(data, "a DenseCLIP recipe", "train")
            if data.get("synthesize") is not None:
                check_synthesize(data["synthesize"])
            check_augment(data.get("augment"))
        check_eval(self.eval)


def check_augment(values) -> SegmentationAugment:
    """data.augment: SegmentationAugment fields, each checked."""
    values = checks.arguments(values, SegmentationAugment, "augment")
    with within("augment."):
        augment = SegmentationAugment(**values)
        checks.integer("crop", augment.crop, minimum=1)
        checks.pair("scale", augment.scale, lambda key, v: checks.integer(key, v, minimum=1))
        checks.pair("ratio_range", augment.ratio_range, lambda key, v: checks.number(key, v, positive=True),
                    ordered=True)
        checks.number("cat_max_ratio", augment.cat_max_ratio, positive=True, maximum=1)
    return augment


def build_denseclip(recipe: DenseCLIPRecipe, backbone, class_names: list[str]) -> DenseCLIP:
    """DenseCLIP over `backbone` for `class_names` (unless method.class_names), new layers drawn from train.seed."""
    with seeded(recipe.train_config().seed):
        return DenseCLIP(backbone, **{"class_names": class_names, **(recipe.method or {})})


class _Losses(torch.nn.Module):
    """DenseCLIP with `forward` = its losses, for DistributedDataParallel."""

    def __init__(self, denseclip: DenseCLIP):
        super().__init__()
        self.denseclip = denseclip

    def forward(self, images, labels):
        return self.denseclip.losses(images, labels)


def train_denseclip(recipe: DenseCLIPRecipe, out_dir: str | Path, device: str = "cpu", resume: bool = True,
                    max_steps: int | None = None, progress: bool = True) -> tuple[DenseCLIP, Path | None]:
    """Train, then save the model; returns it and the path of the saved weights.

    The recipe is checked first; its data is synthesized and opened before the CLIP is loaded. A run stopped by
    `max_steps` before train.steps saves nothing (the path is None): it resumes from out_dir/last.pt.
    """
    out_dir, export, config = start_run(recipe, out_dir, "denseclip", resume, progress)
    data = recipe.data
    with within(f"{recipe.source or 'DenseCLIPRecipe'}: "):
        segmentation = segmentation_dataset("data", data["dataset"], data["root"], data.get("split", "train"))
        evaluate = segmentation_evaluator(recipe.eval, lambda m: m.denseclip)
    backbone = load_clip(recipe.model, recipe.weights, device=device)
    model = build_denseclip(recipe, backbone, segmentation.vocabulary.names)
    augment = SegmentationAugment(**(data.get("augment") or {}))
    dataset = AugmentedSegmentation(segmentation, augment, backbone.image_mean, backbone.image_std, seed=config.seed)
    run = {"method": "denseclip", "recipe": recipe.source,
           "model": {"model": recipe.model, "weights": recipe.weights, "method": model.config}}
    trainer = Trainer(_Losses(model), lambda wrapped, batch: wrapped(*batch), dataset, config, out_dir,
                      evaluate=evaluate, device=device, progress=progress, run=run)
    trainer.fit(resume=resume, max_steps=max_steps)
    saved = finish_run(trainer, export, lambda: model.save(export, preset=(recipe.eval or {}).get("preset")))
    return model.eval(), saved
