"""`ovdense demo`: its check against the exact ground truth, and the shipped method it runs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovdense.cli import main
from ovdense.data.export import scene_index
from ovdense.data.synthetic import SyntheticWorld
from ovdense.demo import check_detections, check_grounding, check_scene, grounding_caption, world_labels
from ovdense.shipped import of_kind, shipped
from ovdense.detection.structures import DetectionResult, GroundingResult


def test_check_scene_counts_pixels_and_things_exactly():
    world = SyntheticWorld()
    scene = world.scene(scene_index("val", 3))
    perfect = check_scene(scene.semantic.copy(), scene, world)
    assert perfect["pixel_accuracy"] == 100 and all(t["correct"] and t["share"] == 1 for t in perfect["things"])
    assert [t["name"] for t in perfect["things"]] == [o.name for o in scene.objects]
    wrong = scene.semantic.copy()
    first = scene.objects[0]
    wrong[first.mask] = world.classes.index("sky")
    check = check_scene(wrong, scene, world)
    assert check["pixel_accuracy"] == 100 * (1 - first.mask.sum() / first.mask.size)
    assert check["things"][0]["predicted"] == "sky" and not check["things"][0]["correct"]
    assert all(t["correct"] for t in check["things"][1:])


def test_world_labels_map_a_vocabulary_by_name():
    world = SyntheticWorld()
    labels = np.array([[0, 1], [2, 0]])
    mapped = world_labels(labels, ["Heart", "sky", "a corgi"], world)
    assert mapped.tolist() == [[world.classes.index("heart"), 0], [-1, world.classes.index("heart")]]


def test_shipped_methods_exist_and_the_first_is_the_best():
    for method in of_kind("segmenter"):
        assert method.path is None or method.path.is_file()
    best = shipped("segmenter")
    assert best is of_kind("segmenter")[0]
    assert all(best.metrics["mIoU"] >= m.metrics["mIoU"] for m in of_kind("segmenter"))


def test_demo_reports_what_its_files_show(tmp_path, capsys):
    """The default demo (shipped model and method) on val scene 1: the printed pixel accuracy and thing verdicts
    are those of the written label map against the exact ground truth, and most of the scene is right."""
    assert main(["demo", "--scene", "1", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "demo_scene.json").read_text())
    world = SyntheticWorld()
    scene = world.scene(scene_index("val", 1))
    zoomed = np.asarray(Image.open(tmp_path / "demo_scene_labels.png"))
    labels = world_labels(zoomed[::4, ::4].astype(np.int64), report["classes"], world)
    check = check_scene(labels, scene, world)
    assert check["pixel_accuracy"] == report["check"]["pixel_accuracy"]
    assert check["things"] == report["check"]["things"]
    assert f"pixel accuracy {check['pixel_accuracy']:.1f}%" in out
    assert f"method: {shipped('segmenter').title}, the best that ships" in out
    assert out.split("\ndetection:")[0].count(scene.captions[0].text) == 1  # captions listed once
    assert check["pixel_accuracy"] > 70
    # the shipped detector on the same scene: the printed verdicts are those of the written boxes
    detection = json.loads((tmp_path / "demo_scene_detection.json").read_text())
    shown = detection["detections"]
    boxes = torch.tensor([[d["box"][k] / 4 for k in ("xmin", "ymin", "xmax", "ymax")] for d in shown]).reshape(-1, 4)
    names = detection["classes"]
    result = DetectionResult(boxes, torch.tensor([d["score"] for d in shown]),
                             torch.tensor([names.index(d["label"]) for d in shown]), names, (96, 96))
    rechecked = check_detections(result, scene)
    assert [t["detection"] and (t["detection"]["label"], t["detection"]["correct"]) for t in rechecked["things"]] == \
        [t["detection"] and (t["detection"]["label"], t["detection"]["correct"]) for t in detection["check"]["things"]]
    right = sum(bool(t["detection"] and t["detection"]["correct"]) for t in rechecked["things"])
    assert f"things found and named right {right} of {len(scene.objects)}" in out
    assert (tmp_path / "demo_scene_detection_boxes.png").is_file()
    # the shipped GLIP grounds the richest caption: the printed verdicts are those of the written boxes
    grounding = json.loads((tmp_path / "demo_scene_grounding.json").read_text())
    caption = grounding_caption(scene)
    assert grounding["caption"] == caption.text and [p["phrase"] for p in grounding["phrases"]] == \
        [p.text for p in caption.phrases]
    boxes, scores, labels = [], [], []
    for index, phrase in enumerate(grounding["phrases"]):
        for found in phrase["boxes"]:
            boxes.append([found["box"][k] / 4 for k in ("xmin", "ymin", "xmax", "ymax")])
            scores.append(found["score"])
            labels.append(index)
    result = GroundingResult(torch.tensor(boxes).reshape(-1, 4), torch.tensor(scores), torch.tensor(labels),
                             [p.text for p in caption.phrases], (96, 96))
    rechecked = check_grounding(result, caption)
    assert [p["found"] and p["found"]["correct"] for p in rechecked["phrases"]] == \
        [p["found"] and p["found"]["correct"] for p in grounding["check"]["phrases"]]
    right = sum(bool(p["found"] and p["found"]["correct"]) for p in rechecked["phrases"])
    assert f"phrases grounded right {right} of {len(caption.phrases)}" in out
    assert (tmp_path / "demo_scene_grounding_boxes.png").is_file()


def test_check_detections_matches_exact_boxes():
    """Each thing takes the best box scoring above 0.5 with IoU >= 0.5 against its exact box; low scores and boxes on
    nothing are not matches."""
    world = SyntheticWorld()
    scene = world.scene(scene_index("val", 3))
    names = list(world.things)
    truth = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)
    labels = torch.tensor([names.index(o.category) for o in scene.objects])
    wrong = (labels[0] + 1) % len(names)
    boxes = torch.cat([truth, truth[:1], truth[:1] + 0.5, torch.tensor([[0.0, 0.0, 3.0, 3.0]])])
    scores = torch.cat([torch.full((len(truth),), 0.8), torch.tensor([0.9, 0.2, 0.6])])
    result = DetectionResult(boxes, scores, torch.cat([labels, wrong[None], labels[:1], labels[:1]]), names, (96, 96))
    check = check_detections(result, scene)
    first = check["things"][0]["detection"]
    assert first["label"] == names[wrong] and not first["correct"] and first["score"] == pytest.approx(0.9) and first["iou"] == 1
    assert all(t["detection"]["correct"] and t["detection"]["iou"] == 1 for t in check["things"][1:])
    assert check["unmatched_detections"] == 1  # the 3x3 box; the 0.2 one is under 0.5
    assert check_detections(DetectionResult(boxes[:0], scores[:0], labels[:0], names, (96, 96)), scene)[
        "things"][0]["detection"] is None


def test_check_grounding_takes_each_phrases_best_box():
    """A phrase's verdict is its top-scoring box against its exact boxes (Recall@1)."""
    scene = SyntheticWorld().scene(scene_index("val", 3))
    caption = grounding_caption(scene)
    assert sum(bool(p.objects) for p in caption.phrases) == max(sum(bool(p.objects) for p in c.phrases)
                                                                for c in scene.captions)
    truth = [p.boxes[0] for p in caption.phrases]
    boxes = torch.tensor(truth + [[0.0, 0.0, 2.0, 2.0]], dtype=torch.float32)
    scores = torch.tensor([0.5] * len(truth) + [0.9])
    labels = torch.tensor(list(range(len(truth))) + [0])
    check = check_grounding(GroundingResult(boxes, scores, labels, [p.text for p in caption.phrases], (96, 96)),
                            caption)
    first, rest = check["phrases"][0], check["phrases"][1:]
    assert not first["found"]["correct"] and first["found"]["score"] == pytest.approx(0.9)  # its best box is wrong
    assert all(p["found"]["correct"] and p["found"]["iou"] == 1 for p in rest)
    empty = GroundingResult(boxes[:0], scores[:0], labels[:0], [p.text for p in caption.phrases], (96, 96))
    assert all(p["found"] is None for p in check_grounding(empty, caption)["phrases"])


def test_demo_on_other_weights_names_them(tmp_path, capsys):
    """CLIP weights from a file are named as such (the first line), not described as the shipped model; the
    architecture the file records (as `ovdense train clip` writes it) is taken without --model."""
    weights = tmp_path / "my-tiny-vit.safetensors"
    weights.write_bytes(shipped("clip").path.read_bytes())
    assert main(["demo", "--weights", str(weights), "--method", "maskclip", "--preset", "synthetic",
                 "--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ovdense demo: model ovdense-tiny-vit, weights {weights},") and "ships with ovdense" not in out
    assert main(["demo", "--model", "ovdense-tiny-rn", "--weights", str(weights), "--method", "maskclip",
                 "--output", str(tmp_path / "out")]) == 1
    assert "holds the weights of ovdense-tiny-vit, not of ovdense-tiny-rn; pass --model ovdense-tiny-vit" in \
        capsys.readouterr().err


def test_demo_on_the_shipped_resnet_clip_names_its_recipe(tmp_path, capsys):
    assert main(["demo", "--model", "ovdense-tiny-rn", "--weights", "synthetic", "--method", "maskclip",
                 "--output", str(tmp_path / "out")]) == 0
    note = capsys.readouterr().out.splitlines()[1]
    assert note.startswith("weights: the tiny CLIP ovdense-tiny-rn that ships with ovdense")
    assert shipped("clip", "ovdense-tiny-rn").recipe in note and "vit" not in note
