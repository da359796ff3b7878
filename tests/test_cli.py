"""The command line end to end on a tiny random model."""
import json

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
    assert "skipped" in capsys.readouterr().err
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
                 "--weights", str(tmp_path / "missing.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_on_a_folder_dataset(tmp_path, scene, capsys):
    root = tmp_path / "data"
    _folder_dataset(root, scene, 2)
    report = tmp_path / "metrics.json"
    assert main(["eval", "--dataset", "folder", "--root", str(root), "--output", str(report), *TINY]) == 0
    metrics = json.loads(report.read_text())
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
