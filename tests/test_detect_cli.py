"""`ovdense detect` and detection `ovdense eval` end to end on a tiny random detector saved by the test."""
import json

import pytest
import torch
from PIL import Image

from ovdense.cli import main
from ovdense.detection.predictor import DetectionPredictor
from ovdense.eval import score_detections
from ovdense.methods.regionclip import RegionCLIPDetector
from ovdense.presets import get_detection_protocol

RPN = {"sizes": [16, 32], "aspect_ratios": [1.0], "pre_nms_top_n": [200, 200], "post_nms_top_n": [50, 50]}


@pytest.fixture(scope="module")
def checkpoint(tiny_vit, tmp_path_factory):
    torch.manual_seed(0)
    detector = RegionCLIPDetector(tiny_vit, ["red", "blue"], rpn=RPN, templates="single")
    return detector.save(tmp_path_factory.mktemp("detector") / "regionclip.safetensors", preset="synthetic-detection")


@pytest.fixture
def images(tmp_path, scene):
    good = tmp_path / "scene.png"
    Image.fromarray(scene).save(good)
    grey = tmp_path / "grey.png"
    Image.fromarray(scene[..., 0]).save(grey)  # mode L
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    return good, grey, broken


def test_detect_writes_drawings_and_json_equal_to_the_api(checkpoint, images, tmp_path, capsys):
    good, grey, broken = images
    out = tmp_path / "out"
    code = main(["--quiet", "detect", str(good), str(broken), str(grey), "--classes", "red, blue", "--method", "regionclip",
                 "--checkpoint", str(checkpoint), "--threshold", "0", "--top-k", "7", "--output", str(out)])
    assert code == 1  # the broken file fails, the others are detected
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        line for line in err.splitlines() if "broken.jpg" in line]
    detector = RegionCLIPDetector.from_checkpoint(checkpoint)
    protocol = get_detection_protocol("synthetic-detection").updated(score_threshold=0.0, max_detections=7)
    for path in (good, grey):
        summary = json.loads((out / f"{path.stem}.json").read_text())
        assert summary["classes"] == ["red", "blue"] and (summary["height"], summary["width"]) == (96, 128)
        assert summary["checkpoint"] == str(checkpoint) and summary["protocol"]["max_detections"] == 7
        expected = DetectionPredictor(detector, protocol)(path, ["red", "blue"]).to_list()
        assert summary["detections"] == expected and len(expected) == 7
        for d in expected:
            box = d["box"]
            assert 0 <= box["xmin"] <= box["xmax"] <= 128 and 0 <= box["ymin"] <= box["ymax"] <= 96
        assert Image.open(out / f"{path.stem}_boxes.png").size == (512, 384)  # a small image is drawn 4x
    assert not (out / "broken.json").exists()


def test_detect_without_weights_fails_fast_and_says_how(tmp_path, images, capsys):
    good, _, _ = images
    code = main(["detect", str(good), "--classes", "red", "--method", "regionclip",
                 "--checkpoint", str(tmp_path / "missing.safetensors"), "--output", str(tmp_path / "out")])
    assert code != 0
    assert "missing.safetensors" in capsys.readouterr().err


def test_detection_eval_writes_metrics_equal_to_scoring_its_results(checkpoint, tmp_path, scene):
    Image.fromarray(scene).save(tmp_path / "a.png")
    Image.fromarray(scene[:, ::-1].copy()).save(tmp_path / "b.png")
    categories = [{"id": 5, "name": "red", "split": "base"}, {"id": 9, "name": "blue", "split": "novel"}]
    images = [{"id": i + 1, "file_name": f"{n}.png", "width": 128, "height": 96} for i, n in enumerate("ab")]
    annotations = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 64, 96]},
                   {"id": 2, "image_id": 1, "category_id": 9, "bbox": [64, 0, 64, 96]},
                   {"id": 3, "image_id": 2, "category_id": 9, "bbox": [0, 0, 64, 96]},
                   {"id": 4, "image_id": 2, "category_id": 5, "bbox": [64, 0, 64, 96]}]
    for a in annotations:
        a.update(area=a["bbox"][2] * a["bbox"][3], iscrowd=0)
    gt = tmp_path / "instances.json"
    gt.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    metrics, results = tmp_path / "m" / "metrics.json", tmp_path / "m" / "results.json"
    code = main(["--quiet", "eval", "--annotations", str(gt), "--method", "regionclip", "--checkpoint", str(checkpoint),
                 "--output", str(metrics), "--results", str(results)])
    assert code == 0
    report = json.loads(metrics.read_text())
    assert report["metrics_protocol"] == "ov-coco" and report["images"] == 2
    assert report["protocol"]["score_threshold"] == 0.001  # the inference settings: the saved preset, then ov-coco
    detections = json.loads(results.read_text())
    assert {d["image_id"] for d in detections} == {1, 2} and {d["category_id"] for d in detections} <= {5, 9}
    assert all(len(d["bbox"]) == 4 and 0 <= d["score"] <= 1 for d in detections)
    rescored = score_detections(gt, results, "ov-coco")
    assert report["metrics"] == pytest.approx(rescored, abs=1e-9)
    assert set(rescored) >= {"AP50", "AP50_base", "AP50_novel"}


def test_an_unshipped_packaged_detector_says_how_to_make_it(images, tmp_path, capsys, monkeypatch):
    from ovdense import shipped
    good, _, _ = images
    monkeypatch.setattr(shipped, "WEIGHTS_DIR", tmp_path)  # no shipped file there
    code = main(["detect", str(good), "--classes", "red", "--method", "regionclip", "--weights", "synthetic",
                 "--output", str(tmp_path / "out")])
    assert code == 1 and "configs/regionclip_tiny_synthetic.yaml" in capsys.readouterr().err


def test_the_shipped_detector_finds_the_things_of_a_val_scene(tmp_path):
    """`ovdense detect --weights synthetic`, offline with nothing but the package: on val scene 0 its best boxes
    overlap the exact boxes, and the JSON is what the Python API returns."""
    from ovdense.data.export import scene_index
    from ovdense.data.synthetic import SyntheticWorld
    from ovdense.methods import load_detector
    from torchvision.ops import box_iou
    scene = SyntheticWorld().scene(scene_index("val", 0))
    Image.fromarray(scene.image).save(tmp_path / "scene.png")
    classes = ", ".join(dict.fromkeys(o.category for o in scene.objects))
    assert main(["detect", str(tmp_path / "scene.png"), "--classes", classes, "--method", "regionclip",
                 "--weights", "synthetic", "--output", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "scene.json").read_text())["detections"]
    detector, preset = load_detector("regionclip", weights="synthetic")
    assert preset == "synthetic-detection"
    assert written == DetectionPredictor(detector, preset)(scene.image, classes, score_threshold=0.3).above(0.3).to_list()
    assert written and min(d["score"] for d in written) > 0.3  # --threshold holds after soft-NMS
    boxes = torch.tensor([[d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] for d in written[:10]])
    truth = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)
    assert (box_iou(truth, boxes).max(dim=1).values >= 0.5).float().mean() >= 0.5  # most things have a box
