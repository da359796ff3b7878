"""The registry of shipped models tells the truth: each file is there and was made by the recipe it names."""
import json
import shlex
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from ovdense.cli import build_parser
from ovdense.shipped import KINDS, SHIPPED, SHIPPED_CLIP, of_kind, shipped

ROOT = Path(__file__).resolve().parent.parent


def _metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as handle:
        return handle.metadata() or {}


@pytest.mark.parametrize("model", [m for m in SHIPPED if m.file], ids=lambda m: m.name)
def test_each_shipped_file_was_made_by_its_recipe(model):
    recipe = yaml.safe_load((ROOT / model.recipe).read_text())
    recorded = _metadata(model.path)
    assert model.kind in KINDS and model.metrics and model.measured_by
    if model.kind == "clip":  # the tiny CLIPs record their architecture and how many steps they trained
        assert (recorded["model"], int(recorded["steps"])) == (model.name, recipe["train"]["steps"])
        assert recipe["export"] == model.file
        return
    assert (recorded["method"], recorded["model"], recorded["preset"]) == (model.name, recipe["model"], model.preset)
    config = json.loads(recorded["config"])
    shared = set(recipe.get("method", {})) & set(config)
    assert shared and {k: recipe["method"][k] for k in shared} == {k: config[k] for k in shared}


@pytest.mark.parametrize("model", [m for m in SHIPPED if m.recipe], ids=lambda m: m.name)
def test_each_shipped_command_is_a_train_command_the_cli_takes(model):
    args = build_parser().parse_args(shlex.split(model.command)[1:])
    assert args.command == "train" and args.config == model.recipe


def test_lookups():
    assert shipped("clip").name == SHIPPED_CLIP
    assert shipped("segmenter") is of_kind("segmenter")[0]  # the best first
    assert shipped("detector", "glip").recipe == "configs/glip_a_tiny_synthetic.yaml"  # the no-fusion model
    assert shipped("detector", "glip", "openai") is None and shipped("segmenter", "unknown") is None
    assert shipped("segmenter", "maskclip").path is None and shipped("segmenter", "maskclip").command == "training-free"
