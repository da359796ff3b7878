"""Recipes are checked completely before any work; training never writes into the installed package, never
exports a partial run, never resumes another method's checkpoint, and starts from weights drawn from its seed."""
import copy
import hashlib
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file

from ovdense.backbones import load_clip
from ovdense.cli import build_parser
from ovdense.engine import clip_pretrain, denseclip_train, recipe as recipe_module, tcl_train
from ovdense.engine.clip_pretrain import PretrainConfig, build_clip, pretrain_clip
from ovdense.engine.denseclip_train import DenseCLIPRecipe, build_denseclip
from ovdense.engine.recipe import load_recipe
from ovdense.engine.tcl_train import TCLRecipe, build_tcl
from ovdense.engine.trainer import Trainer, TrainConfig
from ovdense.errors import CheckpointError, InputError, UsageError
from ovdense.io import PACKAGE_DIR
from ovdense.state import trained_state

REPO = Path(__file__).resolve().parents[1]
PACKAGED = PACKAGE_DIR / "weights" / "ovdense-tiny-vit-synthetic.safetensors"
RECIPES = {"clip": PretrainConfig, "tcl": TCLRecipe, "denseclip": DenseCLIPRecipe}
DELETE = object()
SMALL_TRAIN = {"steps": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 1}


def _recipes(root: Path) -> dict[str, dict]:
    """A small valid recipe of each kind; its data (a synthetic world) would go to root/world."""
    world = str(root / "world")
    synthesize = {"root": world, "size": 64, "seed": 0, "max_objects": 2, "train": 16, "val": 4}
    evaluation = {"dataset": "folder", "root": world, "split": "val", "limit": 1, "preset": "synthetic"}
    return {
        "clip": {"model": "tiny-vit", "world": {"size": 64, "seed": 0, "max_objects": 2}, "scenes": 8,
                 "captions_per_scene": 1, "eval_scenes": 1, "train": dict(SMALL_TRAIN)},
        "tcl": {"model": "tiny-vit", "weights": "random", "method": {"decoder_layers": 1, "kp_weight": 0.0},
                "loss": {"tcl": 0.1}, "data": {"synthesize": synthesize, "sources": [f"{world}/grounding_train.jsonl"],
                                               "text": "phrase", "image_size": 64, "scale": [1.0, 1.0]},
                "eval": evaluation, "train": dict(SMALL_TRAIN)},
        "denseclip": {"model": "tiny-vit", "weights": "random",
                      "method": {"context_tokens": 2, "decoder_width": 16, "decoder_layers": 1, "fpn_channels": 16},
                      "data": {"synthesize": synthesize, "dataset": "folder", "root": world, "split": "train",
                               "augment": {"crop": 64, "scale": [128, 64], "flip": False, "photometric": False}},
                      "eval": evaluation, "train": dict(SMALL_TRAIN)},
    }


def _write(path: Path, values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _changed(values: dict, key: str, value) -> dict:
    values = copy.deepcopy(values)
    *parents, last = key.split(".")
    node = values
    for parent in parents:
        node = node[parent]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return values


def _cli(*argv) -> int:
    args = build_parser().parse_args(["train", *map(str, argv)])
    return args.func(args)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any data is exported or any model is built."""
    def forbidden(*args, **kwargs):
        raise AssertionError("data was exported or a model built before the mistake was found")
    monkeypatch.setattr(recipe_module, "export_world", forbidden)
    monkeypatch.setattr(tcl_train, "load_clip", forbidden)
    monkeypatch.setattr(denseclip_train, "load_clip", forbidden)
    monkeypatch.setattr(clip_pretrain, "build_clip", forbidden)
    monkeypatch.setattr(open_clip, "create_model", forbidden)


def test_the_small_recipes_are_valid(tmp_path, tiny_model_configs):
    for what, values in _recipes(tmp_path).items():
        recipe = load_recipe(RECIPES[what], _write(tmp_path / f"{what}.yaml", values))
        assert recipe.source == str(tmp_path / f"{what}.yaml")
    assert not (tmp_path / "world").exists()


BAD = [  # (method, key changed, value, what the message must say)
    ("clip", "train.steps", 0, "train.steps: must be an integer >= 1, got 0"),
    ("clip", "token_loss", -0.5, "token_loss: must be >= 0"),
    ("clip", "scene_loss", "strong", "scene_loss: must be a number, got the text 'strong'"),
    ("clip", "close_up_views", "random", "close_up_views: unknown value 'random'; choose one of centred, anywhere"),
    ("clip", "close_up_fill", [0.9, 0.3], "close_up_fill: the first value must not exceed the second"),
    ("clip", "close_up_fill", [0, 0.5], "close_up_fill[0]: must be > 0, got 0"),
    ("clip", "train.steps", "ten", "train.steps: must be an integer, got the text 'ten'"),
    ("clip", "train.batch_size", 0, "train.batch_size: must be an integer >= 1"),
    ("clip", "train.accumulate", 3, "train.batch_size: 4 is not divisible by accumulate (3)"),
    ("clip", "train.lr", -0.001, "train.lr: must be > 0"),
    ("clip", "train.lr", "1e-4", "train.lr: must be a number, got the text '1e-4' (YAML reads"),
    ("clip", "train.schedule", "cosin", "train.schedule: unknown value 'cosin' (did you mean `cosine`?)"),
    ("clip", "train.stesp", 5, "train.stesp: unknown key (did you mean `steps`?)"),
    ("clip", "train", [1, 2], "train: must be a mapping"),
    ("clip", "world.sise", 64, "world.sise: unknown key (did you mean `size`?)"),
    ("clip", "world.size", 0, "world.size: must be an integer >= 16"),
    ("clip", "scenes", 0, "scenes: must be an integer >= 1"),
    ("clip", "close_ups", 1.5, "close_ups: must be <= 1"),
    ("clip", "modle", "tiny-vit", "modle: unknown key (did you mean `model`?)"),
    ("clip", "model", "tiny-vitt", "model: unknown CLIP architecture 'tiny-vitt' (did you mean `tiny-vit`?)"),
    ("clip", "export", 3, "export: must be a non-empty string"),
    ("clip", "weights", "runs/none.safetensors", "weights: the file runs/none.safetensors does not exist"),
    ("clip", "weights", "opneai", "weights: 'opneai' is neither a file nor a pretrained tag of tiny-vit"),
    ("tcl", "method.decoder_layer", 2, "method.decoder_layer: unknown key (did you mean `decoder_layers`?)"),
    ("tcl", "method.backbone", "x", "method.backbone: unknown key"),
    ("tcl", "method.kernel_size", 2, "method.kernel_size: must be odd"),
    ("tcl", "method.init_w", "ten", "method.init_w: must be a number"),
    ("tcl", "loss.tlc", 0.1, "loss.tlc: unknown key (did you mean `tcl`?)"),
    ("tcl", "loss.area", -1, "loss.area: must be >= 0"),
    ("tcl", "decoder_only_steps", -1, "decoder_only_steps: must be an integer >= 0"),
    ("tcl", "data.image_size", 0, "data.image_size: must be an integer >= 1"),
    ("tcl", "data.augment", {}, "data.augment: unknown key"),
    ("tcl", "data.text", "phrases", "data.text: unknown value 'phrases' (did you mean `phrase`?)"),
    ("tcl", "data.scale", [1.0, 0.5], "data.scale: the first value must not exceed the second"),
    ("tcl", "data.sources", DELETE, "data.sources: missing"),
    ("tcl", "data.synthesize.sise", 64, "data.synthesize.sise: unknown key (did you mean `size`?)"),
    ("tcl", "data.synthesize.train", -5, "data.synthesize.train: must be an integer >= 0"),
    ("tcl", "data.synthesize.root", str(PACKAGE_DIR / "data" / "world"),
     "data.synthesize.root (the synthetic world is written there): "),
    ("tcl", "eval.limit", 0, "eval.limit: must be an integer >= 1"),
    ("tcl", "eval.preset", "synthetc", "eval.preset: unknown value 'synthetc' (did you mean `synthetic`?)"),
    ("tcl", "eval.dataset", "ade", "eval.dataset: unknown value 'ade'"),
    ("tcl", "eval.splitt", "val", "eval.splitt: unknown key (did you mean `split`?)"),
    ("tcl", "weights", "randon", "weights: 'randon' is neither a file nor a pretrained tag of tiny-vit"),
    ("tcl", "weights", "/nowhere/clip.pt", "weights: the file /nowhere/clip.pt does not exist"),
    ("tcl", "model", "tiny-rn", "model: TCL grounds ViT patch tokens"),
    ("denseclip", "method.prompting", "postt", "method.prompting: unknown value 'postt' (did you mean `post`?)"),
    ("denseclip", "method.decoder_width", 0, "method.decoder_width: must be an integer >= 1"),
    ("denseclip", "method.class_names", ["a", "a"], "method.class_names: the names must be distinct"),
    ("denseclip", "data.augment.crop", 0, "data.augment.crop: must be an integer >= 1"),
    ("denseclip", "data.augment.flip", "yes", "data.augment.flip: must be true or false"),
    ("denseclip", "data.augment.crops", 64, "data.augment.crops: unknown key (did you mean `crop`?)"),
    ("denseclip", "data.dataset", "ade", "data.dataset: unknown value 'ade'"),
    ("denseclip", "data.sources", ["x.jsonl"], "data.sources: unknown key"),
    ("denseclip", "train.lr_mult", {"denseclip.backbone": -1}, "train.lr_mult.denseclip.backbone: must be >= 0"),
    ("denseclip", "eval", "val", "eval: must be a mapping"),
]


@pytest.mark.parametrize("what, key, value, message", BAD, ids=[f"{w}:{k}={v!r}"[:60] for w, k, v, _ in BAD])
def test_a_bad_recipe_is_refused_before_any_work(what, key, value, message, tmp_path, tiny_model_configs, no_work):
    path = _write(tmp_path / "bad.yaml", _changed(_recipes(tmp_path)[what], key, value))
    with pytest.raises(InputError) as error:
        _cli(what, "--config", path, "--output", tmp_path / "run")
    assert str(error.value).startswith(f"{path}: "), str(error.value)
    assert message in str(error.value), str(error.value)
    assert not (tmp_path / "world").exists() and not (tmp_path / "run").exists()


def test_set_changes_recipe_values_and_its_mistakes_are_refused_before_any_work(tmp_path, tiny_model_configs, no_work):
    values = _recipes(tmp_path)["tcl"]
    path = _write(tmp_path / "tcl.yaml", values)
    recipe = load_recipe(TCLRecipe, path, ["train.seed=7", "train.lr=5e-4", f"data.sources.0={tmp_path}/other.jsonl",
                                           "method.kp_weight=0.5"])
    assert recipe.train["seed"] == 7 and recipe.train["lr"] == 5e-4 and recipe.method["kp_weight"] == 0.5
    assert recipe.data["sources"] == [f"{tmp_path}/other.jsonl"] and recipe.train["steps"] == values["train"]["steps"]
    assert load_recipe(TCLRecipe, path).train.get("seed") is None  # the file is not changed
    cases = {"train.steps=0": "train.steps: must be an integer >= 1", "train.stpes=3": "unknown key",
             "seed": "write KEY=VALUE", "data.sources.4=x.jsonl": "the list there has 1 entries",
             "model.name=x": "has a value there, not a mapping"}
    for assignment, message in cases.items():
        with pytest.raises(InputError, match=message):
            _cli("tcl", "--config", path, "--output", tmp_path / "run", "--set", assignment)
    clip = _write(tmp_path / "clip.yaml", _recipes(tmp_path)["clip"])
    for key in ("token_loss", "mil_loss", "scene_loss"):
        with pytest.raises(InputError, match=f"{key}: the token terms need a ViT; tiny-rn is a ResNet"):
            _cli("clip", "--config", clip, "--output", tmp_path / "run", "--set", "model=tiny-rn", "--set", f"{key}=1")
    with pytest.raises(InputError, match="token_readout: unknown value 'value'"):
        _cli("clip", "--config", clip, "--output", tmp_path / "run", "--set", "token_readout=value")
    assert not (tmp_path / "world").exists() and not (tmp_path / "run").exists()


def test_unreadable_recipe_files(tmp_path, no_work):
    cases = {"missing.yaml": None, "folder.yaml": "DIR",
             "syntax.yaml": "model: tiny-vit\ntrain:\n  steps: 2\n   batch_size: 4\n",
             "list.yaml": "- model\n- train\n", "empty.yaml": "# nothing\n",
             "twice.yaml": "model: tiny-vit\ntrain: {steps: 2}\ntrain: {steps: 3}\n"}
    expected = {"missing.yaml": "does not exist", "folder.yaml": "is a folder, not a YAML recipe",
                "syntax.yaml": "not valid YAML at line 4", "list.yaml": "top level of a recipe must be a mapping",
                "empty.yaml": "the recipe is empty", "twice.yaml": "the key 'train' is given twice"}
    for name, content in cases.items():
        path = tmp_path / name
        if content == "DIR":
            path.mkdir()
        elif content is not None:
            path.write_text(content)
        with pytest.raises(InputError, match=expected[name]) as error:
            _cli("tcl", "--config", path, "--output", tmp_path / "run")
        assert str(path) in str(error.value)
    assert "line 3" in str(pytest.raises(InputError, load_recipe, TCLRecipe, tmp_path / "twice.yaml").value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "0"], "--max-steps: must be a positive number of steps, got 0"),
    (["--max-steps", "-3"], "--max-steps: must be a positive number of steps, got -3"),
    (["--device", "gpu0"], "'gpu0' is not a device"),
    (["--output", ""], "--output: must not be empty"),
    (["--export", " "], "--export: must not be empty"),
])
def test_nonsense_train_options_are_usage_errors(flags, message, tmp_path, no_work):
    with pytest.raises(UsageError) as error:  # found before the (missing) recipe is read
        _cli("tcl", "--config", tmp_path / "missing.yaml", *flags)
    assert message in str(error.value) and flags[0] in str(error.value)


def test_every_shipped_recipe_loads_and_none_exports_into_the_package():
    from ovdense.engine.glip_train import GLIPRecipe
    from ovdense.engine.regionclip_train import DetectorRecipe, PretrainRecipe, RPNRecipe
    kinds = {"tiny_clip": RECIPES["clip"], "tcl": RECIPES["tcl"], "rpn": RPNRecipe,
             "regionclip_pretrain": PretrainRecipe, "regionclip": DetectorRecipe, "glip": GLIPRecipe}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        prefix = max((p for p in kinds if path.name.startswith(p)), key=len, default=None)
        recipe = load_recipe(kinds.get(prefix, RECIPES["denseclip"]), path)
        assert recipe.export is None or not (Path(recipe.export).is_absolute() or "src/" in recipe.export), path


def test_each_method_has_its_own_default_output(tmp_path, monkeypatch):
    seen = {}

    def fake(name, result):
        def train(recipe, out_dir, **kwargs):
            seen[name] = Path(out_dir)
            return result
        return train
    scores = {"zs_base_acc": 0, "zs_novel_acc": 0, "chance_acc": 0, "zs_crops": 0, "zs_colour_acc": 0}
    monkeypatch.setattr(clip_pretrain, "pretrain_clip", fake("clip", (None, scores, Path("x"))))
    monkeypatch.setattr(tcl_train, "train_tcl", fake("tcl", (None, Path("x"))))
    monkeypatch.setattr(denseclip_train, "train_denseclip", fake("denseclip", (None, Path("x"))))
    monkeypatch.chdir(tmp_path)
    for what, values in _recipes(tmp_path).items():
        assert _cli(what, "--config", _write(tmp_path / f"{what}.yaml", values)) == 0
    assert seen == {"clip": Path("runs/clip"), "tcl": Path("runs/tcl"), "denseclip": Path("runs/denseclip")}


def test_train_clip_never_writes_into_the_package_and_exports_only_finished_runs(
        tmp_path, monkeypatch, capsys, tiny_model_configs):
    """The README command, on a shrunk copy of the shipped recipe that still names the old export path."""
    before = _sha(PACKAGED)
    values = yaml.safe_load((REPO / "configs" / "tiny_clip_vit_synthetic.yaml").read_text())
    values.update(model="tiny-vit", scenes=8, captions_per_scene=1, eval_scenes=1,
                  export="src/ovdense/weights/ovdense-tiny-vit-synthetic.safetensors")
    values["train"].update(steps=3, batch_size=4, warmup_steps=1, log_every=1, checkpoint_every=1, eval_every=0)
    recipe = _write(tmp_path / "tiny.yaml", values)
    monkeypatch.chdir(REPO)  # where the README's commands run: this export used to resolve into src/ovdense
    out = tmp_path / "run"
    assert _cli("clip", "--config", recipe, "--output", out, "--max-steps", 2) == 0
    printed = capsys.readouterr().out
    assert "nothing exported" in printed and str(out / "last.pt") in printed
    assert (out / "last.pt").is_file() and not list(tmp_path.rglob("*.safetensors"))
    assert _sha(PACKAGED) == before
    assert _cli("clip", "--config", recipe, "--output", out) == 0  # resumes at step 2, finishes, exports
    exported = out / "src" / "ovdense" / "weights" / "ovdense-tiny-vit-synthetic.safetensors"
    assert exported.is_file() and f"wrote {exported}" in capsys.readouterr().out
    assert _sha(PACKAGED) == before


def test_writing_into_the_package_is_refused_up_front(tmp_path, monkeypatch, tiny_model_configs, no_work):
    before = _sha(PACKAGED)
    values = _recipes(tmp_path)["clip"]
    absolute = _write(tmp_path / "absolute.yaml", {**values, "export": str(PACKAGED)})
    plain = _write(tmp_path / "plain.yaml", values)
    monkeypatch.chdir(REPO)
    attempts = [
        (["--config", absolute, "--output", tmp_path / "run"], "export: "),
        (["--config", plain, "--output", tmp_path / "run", "--export", "src/ovdense/weights/" + PACKAGED.name],
         "export: "),
        (["--config", plain, "--output", PACKAGE_DIR / "runs"], "output folder: "),
    ]
    for flags, message in attempts:
        with pytest.raises(InputError, match=f"{message}.*inside the installed ovdense package") as error:
            _cli("clip", *flags)
        assert "by hand" in str(error.value)
    monkeypatch.chdir(PACKAGE_DIR)  # the default output, runs/clip, would be inside the package
    with pytest.raises(InputError, match="output folder: runs/clip is inside the installed ovdense package"):
        _cli("clip", "--config", plain)
    assert not (PACKAGE_DIR / "runs").exists() and not (tmp_path / "run").exists()
    assert _sha(PACKAGED) == before


def test_resuming_another_methods_checkpoint_is_refused_before_any_work(tmp_path, tiny_model_configs, no_work):
    out = tmp_path / "run"
    trainer = Trainer(torch.nn.Linear(2, 1), None, [], TrainConfig(steps=1), out, progress=False,
                      run={"method": "clip", "recipe": "configs/tiny_clip_vit_synthetic.yaml", "model": {}})
    out.mkdir()
    trainer.save()
    tcl = _write(tmp_path / "tcl.yaml", _recipes(tmp_path)["tcl"])
    with pytest.raises(CheckpointError) as error:
        _cli("tcl", "--config", tcl, "--output", out)
    message = str(error.value)
    for part in (str(out / "last.pt"), "`ovdense train clip`", "`ovdense train tcl`", "--restart", "--output"):
        assert part in message, message
    (out / "last.pt").write_bytes(b"\x00" * 10)  # damaged
    with pytest.raises(CheckpointError, match="cannot be read as a training checkpoint"):
        _cli("tcl", "--config", tcl, "--output", out)
    assert not (tmp_path / "world").exists() and (out / "last.pt").read_bytes() == b"\x00" * 10  # left as it was


def test_tcl_partial_run_exports_nothing_then_finishes(tmp_path, tiny_model_configs):
    path = _write(tmp_path / "tcl.yaml", _recipes(tmp_path)["tcl"])
    out = tmp_path / "run"
    assert _cli("tcl", "--config", path, "--output", out, "--max-steps", 1) == 0
    assert (tmp_path / "world" / "world.json").is_file()
    assert (out / "last.pt").is_file() and not (out / "tcl.safetensors").exists()
    assert _cli("tcl", "--config", path, "--output", out) == 0
    assert (out / "tcl.safetensors").is_file()


def test_the_seed_draws_the_initial_weights(tmp_path, tiny_model_configs):
    def clip(seed):
        return build_clip(PretrainConfig(model="tiny-vit", train={"seed": seed})).state_dict()

    def tcl(seed):
        recipe = TCLRecipe(model="tiny-vit", weights="random", method={"decoder_layers": 1}, train={"seed": seed})
        return trained_state(build_tcl(recipe, load_clip("tiny-vit", "random")))

    def denseclip(seed):
        recipe = DenseCLIPRecipe(model="tiny-vit", weights="random", method=_recipes(tmp_path)["denseclip"]["method"],
                                 train={"seed": seed})
        return {k: v for k, v in build_denseclip(recipe, load_clip("tiny-vit", "random"), ["a", "b"]).state_dict().items()
                if not k.startswith("backbone.")}

    for build in (clip, tcl, denseclip):
        torch.manual_seed(1)  # the global RNG's state does not matter
        first = build(0)
        torch.manual_seed(2)
        second, other = build(0), build(1)
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first), build.__name__
        assert not all(torch.equal(first[k], other[k]) for k in first), build.__name__


def test_a_clip_recipe_continues_from_an_earlier_runs_export(tmp_path, tiny_model_configs):
    """weights: FILE starts training from that file (train.seed then only orders the data), in train mode."""
    values = _recipes(tmp_path)["clip"]
    _, _, first = pretrain_clip(PretrainConfig(**values), tmp_path / "first", progress=False)
    more = PretrainConfig(**values | {"weights": str(first), "train": dict(SMALL_TRAIN, seed=5)})
    start, saved = build_clip(more), load_file(first)
    assert start.training and start.state_dict().keys() == saved.keys()
    assert all(torch.equal(start.state_dict()[k].half(), saved[k]) for k in saved)
    _, _, second = pretrain_clip(more, tmp_path / "second", progress=False)
    trained = load_file(second)
    assert not all(torch.equal(trained[k], saved[k]) for k in saved)  # it trained on from there


def test_two_runs_of_a_recipe_give_the_same_final_weights(tmp_path, tiny_model_configs):
    config = PretrainConfig(**_recipes(tmp_path)["clip"])
    exports = []
    for run, global_seed in (("a", 1), ("b", 2)):
        torch.manual_seed(global_seed)
        _, _, export = pretrain_clip(config, tmp_path / run, progress=False)
        exports.append(export)
    assert exports[0] == tmp_path / "a" / "tiny-vit.safetensors"
    first, second = (load_file(path) for path in exports)  # (the files' JSON headers may order keys differently)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


DETECTION_BAD = [  # (shipped recipe, key changed, value, what the message must say)
    ("rpn_tiny_synthetic", "rpn.sizez", [32], "rpn.sizez: unknown key (did you mean `sizes`?)"),
    ("rpn_tiny_synthetic", "rpn.nms_thresh", "high", "rpn.nms_thresh: must be a number"),
    ("glip_a_tiny_synthetic", "data.grounding", [{"path": "x.jsonl", "allow_unboxd": True}],
     "data.grounding[0].allow_unboxd: unknown key (did you mean `allow_unboxed`?)"),
    ("glip_a_tiny_synthetic", "data.detection", [{"annotations": "x.json", "clases": ["star"]}],
     "data.detection[0].clases: unknown key (did you mean `classes`?)"),
    ("glip_a_tiny_synthetic", "data.detection", {"annotations": "x.json"}, "data.detection: must be a list"),
]


@pytest.mark.parametrize("recipe, key, value, message", DETECTION_BAD, ids=[f"{r}:{k}" for r, k, _, _ in DETECTION_BAD])
def test_detection_recipes_are_checked_at_every_depth_before_any_work(recipe, key, value, message, tmp_path, no_work):
    from ovdense.engine import glip_train, regionclip_train
    values = yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text())
    path = _write(tmp_path / "bad.yaml", _changed(values, key, value))
    kind = "glip" if recipe.startswith("glip") else "rpn"
    cls = glip_train.GLIPRecipe if kind == "glip" else regionclip_train.RPNRecipe
    with pytest.raises(InputError) as error:
        load_recipe(cls, path)
    assert str(error.value).startswith(f"{path}: ") and message in str(error.value), str(error.value)
    with pytest.raises(InputError):  # the command finds it before any data or model (no_work)
        _cli(kind, "--config", path, "--output", tmp_path / "run")
    assert not (tmp_path / "run").exists()
