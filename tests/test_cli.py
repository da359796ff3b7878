"""The command line end to end on a tiny random model."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdense.cli import main

TINY = ["--model", "tiny-vit", "--weights", "random", "--templates", "single", "--short-side", "64"]


@pytest.fixture
def images(tmp_path, scene):
    good = tmp_path / "scene.png"
    Image.fromarray(scene).save(good)
    rgba = tmp_path / "odd.png"
    Image.fromarray(np.dstack([scene, np.full(scene.shape[:2], 128, np.uint8)])).save(rgba)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    return good, rgba, broken


def test_segment_writes_overlay_labels_and_json(images, tmp_path, capsys):
    good, rgba, broken = images
    out = tmp_path / "out"
    code = main(["segment", str(good), str(broken), str(rgba), "--classes", "red, blue; navy",
                 "--output", str(out), *TINY])
    assert code == 1  # one input was bad ...
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "broken.jpg" in line]  # one error line, naming the bad file
    for stem in ("scene", "odd"):  # ... and the others were still segmented
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["classes"] == ["red", "blue"] and summary["weights"] == "random:0"
        assert summary["protocol"]["templates"] == "single"
        assert abs(sum(s["area"] for s in summary["segments"]) - 1) < 1e-6
        labels = Image.open(out / f"{stem}_labels.png")
        assert labels.mode == "P" and labels.size == (128, 96)
        assert set(np.unique(np.asarray(labels))) <= {0, 1}
        assert Image.open(out / f"{stem}_overlay.png").size[1] >= 96
    assert not list(out.glob("broken*")) and not list(out.glob(".*"))  # nothing half-written


def test_segment_errors_are_clear(images, tmp_path, capsys):
    good, _, _ = images
    assert main(["segment", str(good), "--classes", "cat, cat", *TINY]) == 2
    assert "more than once" in capsys.readouterr().err
    assert main(["segment", str(good), "--classes", "cat", "--model", "tiny-vit",
                 "--weights", str(tmp_path / "missing.pt")]) == 1  # a data error, not a usage error
    assert "does not exist" in capsys.readouterr().err


def test_eval_on_a_folder_dataset(tmp_path, scene, capsys):
    root = tmp_path / "data"
    _folder_dataset(root, scene, 2)
    report = tmp_path / "metrics.json"
    assert main(["eval", "--dataset", "folder", "--root", str(root), "--output", str(report), *TINY]) == 0
    metrics = json.loads(report.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert metrics["images"] == 2 and metrics["classes"] == ["red", "blue"]
    assert 0 <= metrics["metrics"]["mIoU"] <= 100
    assert "mIoU" in capsys.readouterr().out


def test_demo_runs_offline(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "RANDOM initialisation" in out and "--weights" in out and "pixel accuracy" in out
    summary = json.loads((tmp_path / "demo_scene.json").read_text())
    assert summary["classes"][:3] == ["sky", "grass", "water"] and len(summary["classes"]) == 20
    for name in ("demo_scene_overlay.png", "demo_scene_truth.png", "demo_scene_labels.png"):
        assert (tmp_path / name).is_file()


def _folder_dataset(root, scene, count):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    labels = np.zeros(scene.shape[:2], np.uint8)
    labels[:, 64:] = 1
    for index in range(count):
        Image.fromarray(np.roll(scene, 8 * index, axis=1)).save(root / "images" / f"{index}.png")
        Image.fromarray(np.roll(labels, 8 * index, axis=1)).save(root / "labels" / f"{index}.png")
    (root / "classes.txt").write_text("red\nblue\n")


def test_eval_under_torchrun_matches_one_process(tmp_path, scene, tiny_model_configs):
    import subprocess
    import sys
    _folder_dataset(tmp_path / "data", scene, 3)
    args = ["eval", "--dataset", "folder", "--root", str(tmp_path / "data"), *TINY]
    assert main([*args, "--output", str(tmp_path / "one.json")]) == 0
    script = tmp_path / "run.py"
    script.write_text(f"import sys, open_clip\nopen_clip.add_model_config({str(tiny_model_configs)!r})\n"
                      "from ovdense.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                           *args, "--output", str(tmp_path / "two.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text())["metrics"] for n in ("one", "two"))
    assert two["mIoU"] == pytest.approx(one["mIoU"]) and two["IoU"] == pytest.approx(one["IoU"])


def test_segment_takes_folders_and_globs_and_keeps_same_named_outputs_apart(tmp_path, scene, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(scene).save(tmp_path / folder / "photo.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["segment", str(tmp_path / "a"), str(tmp_path / "b" / "*.png"), "--classes", "red, blue",
                 "--output", str(out), *TINY]) == 0
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["a__photo.json", "b__photo.json"]
    assert json.loads((out / "b__photo.json").read_text())["image"].endswith("b/photo.png")
    assert main(["segment", str(tmp_path / "nothing-*.png"), "--classes", "red", "--output", str(out), *TINY]) == 1
    assert "nothing-*.png: no image found" in capsys.readouterr().err
    Image.fromarray(scene).save(tmp_path / "a__photo.png")  # a third image whose outputs would collide
    again = tmp_path / "again"
    assert main(["segment", str(tmp_path / "a"), str(tmp_path / "b" / "photo.png"), str(tmp_path / "a__photo.png"),
                 str((tmp_path / "a__photo.png").resolve()), "--classes", "red, blue", "--output", str(again),
                 *TINY]) == 0
    assert sorted(p.name for p in again.glob("*.json")) == ["a__photo-2.json", "a__photo.json", "b__photo.json"]
    assert json.loads((again / "a__photo-2.json").read_text())["image"].endswith("a__photo.png")


@pytest.mark.parametrize("argv,code,message", [
    (["--batch-size", "0"], 2, "--batch-size"),
    (["--short-side", "0"], 2, "--short-side"),
    (["--crop", "-4"], 2, "--crop"),
    (["--background-threshold", "1.5"], 2, "--background-threshold"),
    (["--device", "cuda:7"], 2, "--device"),
    (["--device", "toaster"], 2, "--device"),
    (["--method", "tcl"], 2, "--checkpoint"),
    (["--classes", ""], 2, "--classes"),
    (["--classes-file", "/no/such/classes.txt"], 1, "classes.txt"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_bad_options_are_one_error_line(images, tmp_path, capsys, argv, code, message):
    good, _, _ = images
    base = ["segment", str(good), "--output", str(tmp_path / "out"), *TINY]
    if "--classes" not in argv and "--classes-file" not in argv:
        base += ["--classes", "red, blue"]
    assert main([*base, *argv]) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_output_paths_are_checked_before_any_work(images, tmp_path, scene, capsys, monkeypatch):
    import ovdense.methods
    monkeypatch.setattr(ovdense.methods, "load_method", lambda *a, **k: pytest.fail("the model was loaded"))
    good, _, _ = images
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    assert main(["segment", str(good), "--classes", "red", "--output", str(a_file), *TINY]) == 1
    assert "is an existing file" in capsys.readouterr().err and a_file.read_text() == "keep me"
    _folder_dataset(tmp_path / "data", scene, 1)
    assert main(["eval", "--dataset", "folder", "--root", str(tmp_path / "data"), "--output", str(tmp_path),
                 *TINY]) == 1
    assert "is a folder" in capsys.readouterr().err
    import ovdense
    inside = Path(ovdense.__file__).parent / "outputs"
    assert main(["segment", str(good), "--classes", "red", "--output", str(inside), *TINY]) == 1
    assert "inside the installed ovdense package" in capsys.readouterr().err and not inside.exists()


def test_shipped_weights_bring_their_preset_and_half_precision_runs(images, tmp_path):
    good, _, _ = images
    out = tmp_path / "out"
    args = ["segment", str(good), "--classes", "sky, grass", "--model", "ovdense-tiny-vit", "--weights", "synthetic",
            "--output", str(out)]
    assert main(args) == 0
    full = json.loads((out / "scene.json").read_text())
    assert full["protocol"]["name"] == "synthetic"  # recommended by the shipped weights, not the 448 px default
    labels = np.asarray(Image.open(out / "scene_labels.png"))
    assert main([*args, "--half"]) == 0  # bf16 where this CPU runs it faster, else fp32
    assert (np.asarray(Image.open(out / "scene_labels.png")) == labels).mean() > 0.9


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "x.png", "--preset", "nope"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error:") and "--preset" in err


def test_a_checkpoint_brings_its_method(tmp_path, images, capsys):
    from ovdense.backbones import load_clip
    from ovdense.methods import TCL
    good, _, _ = images
    path = TCL(load_clip("tiny-vit", "random")).save(tmp_path / "tcl.safetensors", preset="default")
    out = tmp_path / "out"
    assert main(["segment", str(good), "--classes", "red, blue", "--checkpoint", str(path), "--output", str(out),
                 "--templates", "single", "--short-side", "64"]) == 0
    summary = json.loads((out / "scene.json").read_text())
    assert summary["method"] == "tcl" and summary["protocol"]["name"] == "default"
    assert main(["segment", str(good), "--classes", "red", "--checkpoint", str(path), "--mode", "sclip"]) == 2
    assert "--mode" in capsys.readouterr().err


def test_version_models_and_help(capsys):
    from ovdense import __version__
    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "ovdense-tiny-vit --weights synthetic" in lines[1]  # the offline model first
    rn50 = next(line for line in lines if line.split()[:1] == ["RN50"])
    vit = next(line for line in lines if line.split()[:1] == ["ViT-B-16"])
    assert "plain, maskclip" in rn50 and "sclip" not in rn50 and "naclip" in vit and "openai" in vit


def test_catalog_names_match_the_registries():
    from ovdense import catalog
    from ovdense.backbones.clip import DENSE_MODES, RESNET_DENSE_MODES
    from ovdense.data import DATASETS
    from ovdense.methods import METHODS, TRAINED_METHODS
    from ovdense.text import TEMPLATE_SETS
    assert catalog.DENSE_MODES == DENSE_MODES and catalog.RESNET_DENSE_MODES == RESNET_DENSE_MODES
    assert catalog.METHODS == tuple(METHODS) and catalog.TRAINED_METHODS == TRAINED_METHODS
    assert catalog.DATASETS == tuple(DATASETS) and catalog.TEMPLATE_SETS == tuple(TEMPLATE_SETS)


def test_help_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys\nfrom ovdense.cli import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_half_precision_is_picked_per_device_by_measurement(monkeypatch, caplog):
    import torch

    from ovdense import device as devices
    assert devices._cpu_bfloat16_time_ratio() > 0  # the real measurement runs
    assert devices.half_precision(torch.device("cuda")) is torch.float16
    monkeypatch.setattr(devices, "_cpu_bfloat16_time_ratio", lambda: 0.2)  # a CPU with bf16 matrix units
    assert devices.half_precision(torch.device("cpu")) is torch.bfloat16
    monkeypatch.setattr(devices, "_cpu_bfloat16_time_ratio", lambda: 5.0)  # one without: fp32, and a warning
    with caplog.at_level("WARNING"):
        assert devices.half_precision(torch.device("cpu")) is None
    assert "5.0x the time of float32" in caplog.text and "staying in float32" in caplog.text
