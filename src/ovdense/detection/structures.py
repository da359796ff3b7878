"""What every detector returns: boxes in original pixels with scores and labels, in the formats users know."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..visualize import round_score


@dataclass
class DetectionResult:
    """One image's detections, best first.

    boxes: (N, 4) float32 [x0, y0, x1, y1] in the input image's pixels (continuous coordinates: a box covering
        pixel columns 0..9 is x0=0, x1=10). scores: (N,) in [0, 1]. labels: (N,) int64 indices into `class_names`.
    image: the (H, W, 3) uint8 input image, for `plot` and `save` (optional).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    image_size: tuple[int, int]  # (H, W)
    image: np.ndarray | None = None

    def __post_init__(self):
        order = torch.argsort(self.scores, descending=True, stable=True)
        self.boxes = self.boxes.detach().float().cpu().reshape(-1, 4)[order]
        self.scores = self.scores.detach().float().cpu()[order]
        self.labels = self.labels.detach().long().cpu()[order]

    def __len__(self) -> int:
        return len(self.scores)

    def __repr__(self) -> str:
        height, width = self.image_size
        return f"DetectionResult({width}x{height}, {len(self)} boxes, {len(self.class_names)} classes)"

    def above(self, threshold: float):
        """The detections scoring above `threshold` (soft-NMS decays scores below the threshold it was given)."""
        keep = self.scores > threshold
        return replace(self, boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep])

    def to_list(self, decimals: int = 2) -> list[dict]:
        """Hugging Face zero-shot-object-detection style: [{'score', 'label', 'box': {'xmin', 'ymin', 'xmax',
        'ymax'}}], best first; coordinates rounded to `decimals`."""
        return [{"score": round_score(score), "label": self.class_names[int(label)],
                 "box": dict(zip(("xmin", "ymin", "xmax", "ymax"), (round(float(v), decimals) for v in box)))}
                for box, score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist())]

    def coco_results(self, image_id: int, category_ids: list[int]) -> list[dict]:
        """COCO results JSON entries: {'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}; label k is
        `category_ids[k]`."""
        out = []
        for (x0, y0, x1, y1), score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            out.append({"image_id": int(image_id), "category_id": int(category_ids[label]),
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(float(score), 5)})
        return out

    def summary(self) -> dict:
        """A JSON-serialisable dict: height, width, classes, detections (see `to_list`)."""
        height, width = self.image_size
        return {"height": int(height), "width": int(width), "classes": list(self.class_names),
                "detections": self.to_list()}

    def plot(self, image=None, **kwargs):
        """The box drawing (a PIL image; see `ovdense.visualize.draw_boxes`) on `image`, else the stored image."""
        from ..visualize import draw_boxes
        image = self.image if image is None else image
        if image is None:
            image = np.full((*self.image_size, 3), 255, dtype=np.uint8)
        return draw_boxes(image, self.boxes.numpy(), self.labels.numpy(), self.scores.numpy(), self.class_names,
                          **kwargs)

    def save(self, directory, stem: str = "result", metadata: dict | None = None, **plot_kwargs) -> dict[str, Path]:
        """Write <stem>_boxes.png and <stem>.json (`metadata`, then the summary) into `directory`, each atomically;
        return their paths by kind ('boxes', 'json')."""
        from ..io import atomic_path
        directory = Path(directory)
        paths = {"boxes": directory / f"{stem}_boxes.png", "json": directory / f"{stem}.json"}
        with atomic_path(paths["boxes"]) as boxes, atomic_path(paths["json"]) as js:
            self.plot(**plot_kwargs).save(boxes, format="PNG")
            js.write_text(json.dumps({**(metadata or {}), **self.summary()}, indent=2), encoding="utf-8")
        return paths


@dataclass
class GroundingResult(DetectionResult):
    """The boxes of a caption's phrases: a DetectionResult whose classes are the phrases (`class_names`), with the
    caption and each phrase's character spans in it."""

    caption: str = ""
    spans: list[list[tuple[int, int]]] | None = None

    def __repr__(self) -> str:
        height, width = self.image_size
        return f"GroundingResult({width}x{height}, {len(self)} boxes, {len(self.class_names)} phrases)"

    def summary(self) -> dict:
        """height, width, caption, and per phrase its text, character spans and boxes ({'score', 'box'}), best first."""
        height, width = self.image_size
        detections = self.to_list()
        phrases = [{"phrase": name, "spans": [list(s) for s in spans], "boxes": []}
                   for name, spans in zip(self.class_names, self.spans or [[]] * len(self.class_names))]
        for label, detection in zip(self.labels.tolist(), detections):
            phrases[label]["boxes"].append({"score": detection["score"], "box": detection["box"]})
        return {"height": int(height), "width": int(width), "caption": self.caption, "phrases": phrases}
