"""The checks of `ovdense demo`, the offline main job: a val scene of the synthetic world segmented, detected and
grounded by the shipped models (ovdense.shipped), every label and box checked against the scene's exact ground
truth. The command and its printed verdicts are cli/demo.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_iou

from .data.export import scene_index
from .data.synthetic import Caption, Scene, SyntheticWorld
from .detection.structures import DetectionResult, GroundingResult
from .io import atomic_path
from .predictor import SegmentationResult
from .visualize import overlay


def world_indices(class_names: list[str], world: SyntheticWorld) -> list[int]:
    """Each name's index in world.classes (case-insensitive), -1 for a name that is not a world class."""
    lookup = {name.lower(): k for k, name in enumerate(world.classes)}
    return [lookup.get(name.lower(), -1) for name in class_names]


def world_labels(labels: np.ndarray, class_names: list[str], world: SyntheticWorld) -> np.ndarray:
    """(H, W) indices into `class_names` -> indices into world.classes; -1 where the name is not a world class."""
    table = np.array(world_indices(class_names, world) + [-1])
    return table[np.clip(labels, -1, len(class_names))]


def check_scene(predicted: np.ndarray, scene: Scene, world: SyntheticWorld) -> dict:
    """Pixel accuracy (%) of `predicted` ((H, W) world class indices) against the scene's exact labels, and for
    each thing: its name, whether it is novel, the label most of its visible pixels got, and that label's share."""
    things = []
    for obj in scene.objects:
        votes = np.bincount(predicted[obj.mask] + 1, minlength=len(world.classes) + 1)  # +1: -1 is "not a class"
        top = int(votes.argmax())
        label = world.classes[top - 1] if top else "(not a world class)"
        things.append({"name": obj.name, "category": obj.category, "novel": obj.category in world.novel,
                       "predicted": label, "share": float(votes[top] / votes.sum()), "correct": label == obj.category})
    return {"pixel_accuracy": 100 * float((predicted == scene.semantic).mean()), "things": things}


def run_demo(predictor, world: SyntheticWorld, index: int, vocabulary, out_dir: Path, zoom: int = 4,
             metadata: dict | None = None) -> dict:
    """Segment val scene `index`; write demo_scene.png (the scene, `zoom` x larger), demo_scene_overlay.png,
    demo_scene_truth.png, demo_scene_labels.png and demo_scene.json (with the check); returns the check, with
    the scene's captions (each once) and the vocabulary's names that are not world classes (counted wrong)."""
    scene = world.scene(scene_index("val", index))
    result = predictor(scene.image, vocabulary)
    check = check_scene(world_labels(result.labels, result.class_names, world), scene, world)
    check["captions"] = list(dict.fromkeys(c.text for c in scene.captions))  # the world may repeat one
    check["unknown_classes"] = [n for n, k in zip(result.class_names, world_indices(result.class_names, world)) if k < 0]
    picture = scene.image.repeat(zoom, axis=0).repeat(zoom, axis=1)  # the model saw the scene; people see this
    with atomic_path(out_dir / "demo_scene.png") as tmp:
        Image.fromarray(picture).save(tmp, format="PNG")
    truth = scene.semantic.repeat(zoom, axis=0).repeat(zoom, axis=1)
    with atomic_path(out_dir / "demo_scene_truth.png") as tmp:
        overlay(picture, truth, world.classes).save(tmp, format="PNG")
    shown = SegmentationResult(result.labels.repeat(zoom, axis=0).repeat(zoom, axis=1), result.scores,
                               result.class_names, picture)
    shown.save(out_dir, "demo_scene", metadata={**(metadata or {}), "scene": index, "check": check})
    return check


DEMO_MIN_SCORE = 0.5  # the boxes the demo draws and checks


def check_detections(result: DetectionResult, scene: Scene, min_score: float = DEMO_MIN_SCORE) -> dict:
    """Each thing's best detection against its exact box: the highest-scoring box scoring above `min_score` whose
    IoU with the thing's tight box is at least 0.5 (its label, score, IoU, whether the label is the thing's
    category; None when there is none), and the count of boxes scoring above `min_score` that match no thing."""
    kept = result.above(min_score)
    boxes, scores, labels = kept.boxes, kept.scores, kept.labels
    truth = torch.tensor([obj.box for obj in scene.objects], dtype=torch.float32).reshape(-1, 4)
    iou = box_iou(truth, boxes)  # (things, detections)
    things = []
    for obj, overlaps in zip(scene.objects, iou):
        hits = (overlaps >= 0.5).nonzero()[:, 0]  # detections are sorted best first
        best = None
        if len(hits):
            k = int(hits[0])
            label = result.class_names[int(labels[k])]
            best = {"label": label, "score": float(scores[k]), "iou": float(overlaps[k]), "correct": label == obj.category}
        things.append({"name": obj.name, "category": obj.category, "box": obj.box, "detection": best})
    unmatched = int((iou < 0.5).all(dim=0).sum()) if len(truth) else len(boxes)
    return {"min_score": min_score, "things": things, "unmatched_detections": unmatched}


def run_detection_demo(predictor, world: SyntheticWorld, index: int, vocabulary, out_dir: Path, zoom: int = 4,
                       metadata: dict | None = None) -> dict:
    """Detect `vocabulary` in val scene `index`; write demo_scene_detection_boxes.png (`zoom` x larger) and
    demo_scene_detection.json (the boxes scoring above DEMO_MIN_SCORE, and the check of `check_detections`);
    returns the check."""
    scene = world.scene(scene_index("val", index))
    shown = predictor(scene.image, vocabulary).above(DEMO_MIN_SCORE)
    check = check_detections(shown, scene)
    picture = scene.image.repeat(zoom, axis=0).repeat(zoom, axis=1)
    zoomed = DetectionResult(shown.boxes * zoom, shown.scores, shown.labels, shown.class_names, picture.shape[:2],
                             picture)
    zoomed.save(out_dir, "demo_scene_detection", metadata={**(metadata or {}), "scene": index, "check": check})
    return check


def grounding_caption(scene: Scene) -> Caption:
    """The scene caption naming the most things (the first of those)."""
    return max(scene.captions, key=lambda c: sum(bool(p.objects) for p in c.phrases))


def check_grounding(result: GroundingResult, caption: Caption) -> dict:
    """Each phrase's best box (its top-1, as Recall@1) against its exact boxes: score, IoU with the closest exact box,
    right when IoU >= 0.5 (None when the phrase got no box)."""
    phrases = []
    for index, phrase in enumerate(caption.phrases):
        mine = result.labels == index
        best = None
        if mine.any():
            k = int(mine.nonzero()[0, 0])  # results are sorted best first
            iou = float(box_iou(result.boxes[k:k + 1], torch.tensor(phrase.boxes, dtype=torch.float32)).max())
            best = {"box": [round(v, 1) for v in result.boxes[k].tolist()], "score": float(result.scores[k]),
                    "iou": iou, "correct": iou >= 0.5}
        phrases.append({"phrase": phrase.text, "category": phrase.category, "box": phrase.boxes[0], "found": best})
    return {"caption": caption.text, "phrases": phrases}


def run_grounding_demo(predictor, world: SyntheticWorld, index: int, out_dir: Path, zoom: int = 4,
                       metadata: dict | None = None) -> dict:
    """Ground the phrases of val scene `index`'s richest caption (their exact spans); write
    demo_scene_grounding_boxes.png (each phrase's best box, `zoom` x larger) and demo_scene_grounding.json (all boxes
    and the check of `check_grounding`); returns the check."""
    from .detection.grounding import GroundingPrompt
    scene = world.scene(scene_index("val", index))
    caption = grounding_caption(scene)
    predictor.set_image(scene.image)
    prompt = GroundingPrompt(caption.text, [p.text for p in caption.phrases], [[p.span] for p in caption.phrases])
    result = predictor.ground_prompt(prompt)
    check = check_grounding(result, caption)
    best = torch.tensor([int((result.labels == p).nonzero()[0, 0]) for p in range(len(caption.phrases))
                         if (result.labels == p).any()], dtype=torch.long)
    picture = scene.image.repeat(zoom, axis=0).repeat(zoom, axis=1)
    zoomed = GroundingResult(result.boxes[best] * zoom, result.scores[best], result.labels[best], result.class_names,
                             picture.shape[:2], picture, result.caption, result.spans)
    zoomed.save(out_dir, "demo_scene_grounding", metadata={**(metadata or {}), "scene": index, "check": check})
    return check
