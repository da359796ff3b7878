"""What the training recipes of the methods share: YAML loading, the synthetic-world data they can
ask for, and evaluation of the model being trained on a segmentation dataset."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Callable

import yaml

from ..data import SegmentationDataset
from ..data.export import export_world
from ..data.synthetic import SyntheticWorld
from ..predictor import SegmentationPredictor


def load_recipe(cls, path: str | Path):
    """Build dataclass `cls` from a YAML file; unknown keys are an error naming the known ones."""
    values = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; a {cls.__name__} has {sorted(known)}")
    return cls(**values)


def ensure_synthetic(spec: dict | None, progress: bool = True) -> None:
    """Export the synthetic world described by `spec` ({root, size, seed, max_objects, train, val}) unless
    `root` already holds that export."""
    if not spec:
        return
    spec = {"size": 64, "seed": 0, "max_objects": 3, "train": 1000, "val": 100, **spec}
    root = Path(spec["root"])
    splits = {"train": spec["train"], "val": spec["val"]}
    info_path = root / "world.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if (info["seed"], info["size"][0], info["max_objects"], info["splits"]) == (
                spec["seed"], spec["size"], spec["max_objects"], splits):
            return
    world = SyntheticWorld(spec["size"], seed=spec["seed"], max_objects=spec["max_objects"])
    export_world(world, root, splits, progress=progress)


def segmentation_evaluator(spec: dict | None, method_of: Callable) -> Callable | None:
    """An `evaluate(model) -> {'mIoU': ...}` for the Trainer, from {dataset, root, split, limit, preset}.

    method_of(model): the segmentation method inside the trained model.
    """
    if not spec:
        return None
    from ..eval import evaluate_segmentation
    dataset = SegmentationDataset(spec["dataset"], spec["root"], spec.get("split", "val"))

    def evaluate(model) -> dict[str, float]:
        predictor = SegmentationPredictor(method_of(model), spec.get("preset", "default"), dataset=spec["dataset"])
        metrics = evaluate_segmentation(predictor, dataset, limit=spec.get("limit"), progress=False)
        return {"mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"]}
    return evaluate
