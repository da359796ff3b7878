"""What the training recipes of the methods share: YAML loading and checking, the CLIP they start from, the
synthetic-world data they can ask for, evaluation of the model being trained on a segmentation dataset, and
where a run writes.

Every recipe is checked completely by `load_recipe` (and again by the `train_*` functions) before any data is
exported or any model is loaded; a mistake is an `InputError` naming the file and the key, e.g.
"configs/x.yaml: train.steps: must be an integer >= 1, got 0".

Paths in a recipe: outputs (`export`) that are relative go into the run's output folder; data paths
(`data.sources`, `data.root`, `data.synthesize.root`, `eval.root`) are relative to the current directory,
as data paths on a command line are. Nothing is ever written inside the installed ovdense package.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import open_clip
import yaml

from ..backbones.loading import HF_CLIP, RANDOM_WEIGHTS, is_model_folder
from ..data import DATASETS, SegmentationDataset
from ..data.export import export_world
from ..data.synthetic import SyntheticWorld
from ..errors import InputError
from ..shipped import SHIPPED_TAG, shipped
from ..io import outside_package
from ..predictor import SegmentationPredictor
from ..presets import PRESETS
from . import checks
from .checks import within
from .trainer import TrainConfig, Trainer, check_resume

SYNTHESIZE_DEFAULTS = {"size": 96, "seed": 0, "max_objects": 4, "train": 1000, "val": 100}
EVAL_KEYS = ("dataset", "root", "split", "limit", "preset")


# ------------------------------------------------------------------------------------------------- YAML
class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML would keep the last silently)."""


def _mapping_without_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) or key is None:
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def read_yaml(path: str | Path) -> dict:
    """The top-level mapping of the YAML file `path`; a missing file, a folder, a syntax error (with its line) or
    a top level that is not a mapping is an InputError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a YAML recipe; pass a file such as configs/tcl_tiny_synthetic.yaml")
    if not path.is_file():
        raise InputError(f"recipe {path} does not exist (recipes are YAML files, see configs/)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot be read as a UTF-8 text file ({error})") from error
    try:
        values = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        context = getattr(error, "context", None)
        raise InputError(f"{path}: not valid YAML{where}: {problem}" + (f" ({context})" if context else "")) from error
    if values is None:
        raise InputError(f"{path}: the recipe is empty")
    if not isinstance(values, dict):
        raise InputError(f"{path}: the top level of a recipe must be a mapping of keys (model, train, ...) to "
                         f"values, not a {type(values).__name__}")
    return values


def override(values: dict, assignment: str) -> None:
    """Apply one "KEY=VALUE" to recipe `values` in place: KEY is dotted (train.seed; a number picks a list entry,
    data.sources.0.path), VALUE is read as YAML (1, 5e-4, true, [1, 2], a path). The last key may be new (the
    recipe's checks then judge it); the ones before it must lead to a mapping or a list. InputError otherwise."""
    key, equals, text = assignment.partition("=")
    if not equals or not key.strip():
        raise InputError(f"--set {assignment!r}: write KEY=VALUE, e.g. --set train.seed=1")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InputError(f"--set {assignment!r}: the value is not valid YAML ({error})") from error
    if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        value = float(value)  # 5e-4, which YAML 1.1 reads as text
    parts = key.strip().split(".")
    node = values
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            if not (part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node)):
                raise InputError(f"--set {assignment!r}: {where}: the list there has {len(node)} entries; "
                                 "give the index of one")
            part = int(part)
        elif not isinstance(node, dict):
            raise InputError(f"--set {assignment!r}: {where}: the recipe has a value there, not a mapping or a list")
        if depth == len(parts) - 1:
            node[part] = value
            return
        node = node.setdefault(part, {}) if isinstance(node, dict) else node[part]


def load_recipe(cls, path: str | Path, overrides: tuple[str, ...] | list[str] = ()):
    """Build recipe dataclass `cls` from a YAML file and check all of it (`cls.validate`), keys at every depth
    and values, before anything runs; every mistake is an InputError naming the file and the key.

    overrides: "KEY=VALUE" assignments applied after reading (see `override`), as `ovdense train --set` gives
    them: e.g. ("train.seed=1", "weights=runs/clip/ovdense-tiny-vit.safetensors")."""
    values = read_yaml(path)
    for assignment in overrides:
        override(values, assignment)
    with within(f"{path}: "):
        checks.known_keys(values, cls.keys(), f"a {cls.__name__} recipe")
        recipe = cls(**values, source=str(path))
        recipe.validate()
    return recipe


def validated(recipe: Recipe) -> None:
    """Check a recipe built in Python (or changed after loading) as `load_recipe` checks a file."""
    with within(f"{recipe.source or type(recipe).__name__}: "):
        recipe.validate()


# ------------------------------------------------------------------------------------------------- CLIP
def check_model_name(model) -> str:
    checks.text("model", model)
    if not model.startswith(("hf-hub:", "local-dir:")) and model not in (*open_clip.list_models(), HF_CLIP):
        raise InputError(f"model: unknown CLIP architecture {model!r}{checks.suggest(model, open_clip.list_models())}; "
                         "`ovdense models` lists them")
    return model


def check_clip(model, weights) -> None:
    """`model` names an open_clip architecture and `weights` a source of its weights that could be there: a
    packaged file (present), 'random[:SEED]', an existing file, or a pretrained tag of that architecture."""
    checks.text("weights", weights)
    if is_model_folder(weights):  # a transformers CLIP folder: its config.json says the architecture
        return
    check_model_name(model)
    if model.startswith(("hf-hub:", "local-dir:")):
        return
    if (packaged := shipped("clip", model, weights)) is not None:
        path = packaged.path
        if not path.is_file():
            raise InputError(f"weights: the packaged weights {path} are missing from this installation")
    elif weights == RANDOM_WEIGHTS or re.fullmatch(rf"{RANDOM_WEIGHTS}:\d+", weights):
        return
    elif Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in weights:
        if not Path(weights).expanduser().is_file():
            raise InputError(f"weights: the file {weights} does not exist")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model) + [SHIPPED_TAG] * bool(shipped("clip", model))
        if weights not in tags:
            raise InputError(f"weights: {weights!r} is neither a file nor a pretrained tag of {model}"
                             f"{checks.suggest(weights, tags)}; its tags: {', '.join(tags) or 'none'}, or 'random'")


# ------------------------------------------------------------------------------------- synthetic data
def check_world(values, key: str = "world") -> dict:
    """SyntheticWorld arguments {size, seed, max_objects}."""
    values = checks.arguments(values, SyntheticWorld.__init__, key)
    with within(f"{key}."):
        checks.integer("size", values.get("size", 96), minimum=16)
        checks.integer("seed", values.get("seed", 0), minimum=0)
        checks.integer("max_objects", values.get("max_objects", 4), minimum=1)
    return values


def check_synthesize(spec) -> dict:
    """{root, size, seed, max_objects, train, val}: the synthetic world to export to `root` (relative to the
    current directory, never inside the package); returns it with the defaults filled in."""
    spec = checks.mapping("synthesize", spec)
    with within("synthesize."):
        checks.known_keys(spec, ["root", *SYNTHESIZE_DEFAULTS], "synthesize")
        root = checks.text("root", checks.required(spec, "root", "synthesize (the folder the world is written to)"))
        outside_package(root, "root (the synthetic world is written there)")
        spec = {**SYNTHESIZE_DEFAULTS, **spec}
        checks.integer("size", spec["size"], minimum=16)
        checks.integer("seed", spec["seed"], minimum=0)
        checks.integer("max_objects", spec["max_objects"], minimum=1)
        checks.integer("train", spec["train"], minimum=0)
        checks.integer("val", spec["val"], minimum=0)
        if not spec["train"] and not spec["val"]:
            raise InputError("train, val: both are 0; nothing would be synthesized")
    return spec


def ensure_synthetic(spec: dict | None, progress: bool = True) -> None:
    """Export the synthetic world described by `spec` ({root, size, seed, max_objects, train, val}) unless
    `root` already holds that export."""
    if not spec:
        return
    spec = check_synthesize(spec)
    root = Path(spec["root"])
    splits = {"train": spec["train"], "val": spec["val"]}
    info_path = root / "world.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            if (info.get("version"), info["seed"], info["size"][0], info["max_objects"], info["splits"]) == (
                    SyntheticWorld.version, spec["seed"], spec["size"], spec["max_objects"], splits):
                return
        except (ValueError, KeyError, TypeError, IndexError):
            pass  # not an export of ours: export again
    world = SyntheticWorld(spec["size"], seed=spec["seed"], max_objects=spec["max_objects"])
    export_world(world, root, splits, progress=progress)


# ------------------------------------------------------------------------------------------- evaluation
def check_dataset_keys(spec: dict, what: str, split: str) -> None:
    """The dataset, root and split keys of a section naming a segmentation dataset (`what`: for messages)."""
    checks.choice("dataset", checks.required(spec, "dataset", what), DATASETS)
    checks.text("root", checks.required(spec, "root", what))
    checks.text("split", spec.get("split", split))


def check_eval(spec) -> None:
    """{dataset, root, split, limit, preset}: the segmentation dataset evaluated during training."""
    if spec is None:
        return
    checks.mapping("eval", spec)
    with within("eval."):
        checks.known_keys(spec, EVAL_KEYS, "eval")
        check_dataset_keys(spec, "eval", "val")
        if spec.get("limit") is not None:
            checks.integer("limit", spec["limit"], minimum=1)
        checks.choice("preset", spec.get("preset", "default"), PRESETS)


def segmentation_dataset(key: str, name: str, root, split: str) -> SegmentationDataset:
    """The dataset of recipe section `key` ('data', 'eval'); a missing or malformed one is an InputError."""
    try:
        return SegmentationDataset(name, root, split)
    except (OSError, ValueError) as error:
        if isinstance(error, InputError):
            raise type(error)(f"{key}: {error}") from error
        raise InputError(f"{key}: {error}") from error


def segmentation_evaluator(spec: dict | None, method_of: Callable) -> Callable | None:
    """An `evaluate(model) -> {'mIoU': ...}` for the Trainer, from {dataset, root, split, limit, preset}; the
    dataset is opened now (so that a missing one is found before training).

    method_of(model): the segmentation method inside the trained model.
    """
    if not spec:
        return None
    check_eval(spec)
    from ..eval import evaluate_segmentation
    dataset = segmentation_dataset("eval", spec["dataset"], spec["root"], spec.get("split", "val"))

    def evaluate(model) -> dict[str, float]:
        predictor = SegmentationPredictor(method_of(model), spec.get("preset", "default"), dataset=spec["dataset"])
        metrics = evaluate_segmentation(predictor, dataset, limit=spec.get("limit"), progress=False)
        return {"mIoU": metrics["mIoU"], "mAcc": metrics["mAcc"]}
    return evaluate


# ------------------------------------------------------------------------------------------- outputs
def check_export(export) -> None:
    if export is not None:
        checks.text("export", export)


def run_paths(out_dir: str | Path, export: str | Path | None, default_name: str) -> tuple[Path, Path]:
    """(output folder, export file) of a run: a relative `export` (else `default_name`) goes into the output folder.

    Either inside the installed ovdense package, the output folder being a file or the export a folder, is an
    InputError (checked before anything is written).
    """
    out_dir = outside_package(out_dir, "output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"output folder: {out_dir} is a file, not a folder")
    export = Path(export or default_name).expanduser()
    if not export.is_absolute():
        export = out_dir / export
    outside_package(export, "export")
    if export.is_dir():
        raise InputError(f"export: {export} is a folder; give the file the weights go to (.safetensors)")
    return out_dir, export


# ------------------------------------------------------------------------------------------- recipes
_FIRST_KEYS = ("model", "weights")  # a recipe's keys are listed in this order: these, its own, then the last ones
_LAST_KEYS = ("data", "eval", "train", "export")


@dataclass
class Recipe:
    """What every training recipe (YAML) has; a method's recipe adds its own keys as fields, and their checks in
    `check_keys`.

    model: the model trained (each recipe says what it names). train: TrainConfig fields. export: where the trained
    weights go (safetensors); relative: in the run's output folder. source: the YAML file (set by load_recipe).
    """

    model: str = "RN50"
    train: dict = field(default_factory=dict)
    export: str | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def keys(cls) -> list[str]:
        """The recipe's YAML keys (its fields but source) in the order messages list them: model and weights, the
        recipe's own keys as its class declares them, then data, eval, train and export."""
        names = [f.name for f in fields(cls) if f.name != "source"]
        first, last = [n for n in _FIRST_KEYS if n in names], [n for n in _LAST_KEYS if n in names]
        return first + [n for n in names if n not in first + last] + last

    def validate(self) -> None:
        """Check every key and value (InputError naming the key); nothing is built or read. The order, hence which
        of several mistakes is reported: the model, the recipe's own keys, train, export."""
        self.check_model()
        self.check_keys()
        self.train_config()
        check_export(self.export)

    def check_model(self) -> None:
        """model: an open_clip architecture (trained from random weights)."""
        check_model_name(self.model)

    def check_keys(self) -> None:
        """The recipe's own keys (those of its class, not of Recipe)."""

    def train_config(self) -> TrainConfig:
        """The `train` mapping, read as a checked TrainConfig."""
        train = checks.mapping("train", self.train if self.train is not None else {})
        with within("train."):
            return TrainConfig.from_dict(train)


@dataclass
class MethodRecipe(Recipe):
    """The recipe of a method trained over a pretrained CLIP, on data the recipe names: model (an open_clip
    architecture) and weights (a source of its weights, see `check_clip`) give the CLIP; data: its keys are the
    method's (data.synthesize, {root, size, seed, max_objects, train, val}, exports the synthetic world first).
    """

    weights: str = "openai"
    data: dict = field(default_factory=dict)

    def check_model(self) -> None:
        check_clip(self.model, self.weights)


def start_run(recipe: MethodRecipe, out_dir: str | Path, method: str, resume: bool, progress: bool
              ) -> tuple[Path, Path, TrainConfig]:
    """The start of a method's training: the whole recipe checked, the run folder and the export path, a
    checkpoint to resume checked to be this method's, and the recipe's synthetic data exported."""
    validated(recipe)
    out_dir, export = run_paths(out_dir, recipe.export, f"{method}.safetensors")
    if resume:
        check_resume(out_dir, method)
    with within(f"{recipe.source or type(recipe).__name__}: data."):
        ensure_synthetic(recipe.data.get("synthesize"), progress)
    return out_dir, export, recipe.train_config()


def finish_run(trainer: Trainer, export: Path, save: Callable[[], None]) -> Path | None:
    """The end of a method's training, after `trainer.fit`: once the run has reached train.steps, rank 0 calls
    `save()` (which writes `export`) and `export` is returned; a run stopped by `max_steps` before that saves nothing
    and returns None (it resumes from out_dir/last.pt)."""
    if not trainer.finished:
        return None
    if trainer.rank == 0:
        save()
    return export
