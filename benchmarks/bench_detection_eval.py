"""Speed of the detection evaluators behind `score_detections` on a COCO-sized synthetic problem.

Ground truth: 5000 images of 640x480 with 1-13 boxes each (about 7), 80 categories, a few crowd boxes. Results: each
ground-truth box found twice with jittered coordinates, plus random false positives, 100 detections per image.
Prints, for each evaluator, the time of `score_detections(..., 'coco', evaluator=...)` (best of --repeats) and its
AP / AP50, which must agree.

    python benchmarks/bench_detection_eval.py [--images 5000] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ovdense.eval.detection import EVALUATORS, score_detections


def make_problem(images: int, classes: int = 80, per_image: int = 100, seed: int = 0) -> tuple[dict, list[dict]]:
    """(instances JSON dict, COCO results list)."""
    rng = np.random.default_rng(seed)
    width, height = 640, 480
    coco = {"images": [], "annotations": [],
            "categories": [{"id": c + 1, "name": f"class {c}"} for c in range(classes)]}
    results = []
    for image_id in range(1, images + 1):
        coco["images"].append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": width, "height": height})
        count = int(rng.integers(1, 14))
        wh = rng.uniform(8, 300, (count, 2))
        xy = rng.uniform(0, 1, (count, 2)) * ([width, height] - wh)
        labels = rng.integers(1, classes + 1, count)
        for (x, y), (w, h), label in zip(xy, wh, labels):
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": int(label), "bbox": [x, y, w, h], "area": w * h,
                                        "iscrowd": int(rng.random() < 0.01)})
        jitter = rng.normal(0, 0.08, (2 * count, 4)) * np.tile(wh, 2).repeat(2, 0)  # 8% of the box size
        boxes = np.concatenate([xy, wh], 1).repeat(2, 0) + jitter
        labels = labels.repeat(2)
        extra = per_image - len(boxes)
        fp_wh = rng.uniform(8, 300, (extra, 2))
        fp = np.concatenate([rng.uniform(0, 1, (extra, 2)) * ([width, height] - fp_wh), fp_wh], 1)
        boxes, labels = np.concatenate([boxes, fp]), np.concatenate([labels, rng.integers(1, classes + 1, extra)])
        scores = np.concatenate([rng.uniform(0.3, 1, 2 * count), rng.uniform(0, 0.7, extra)])
        boxes[:, 2:] = boxes[:, 2:].clip(1)
        results += [{"image_id": image_id, "category_id": int(c), "bbox": [round(float(v), 2) for v in b],
                     "score": round(float(s), 5)} for b, c, s in zip(boxes, labels, scores)]
    return coco, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    coco, results = make_problem(args.images)
    print(f"{args.images} images, {len(coco['annotations'])} boxes, {len(coco['categories'])} classes, "
          f"{len(results)} detections")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "instances.json"
        path.write_text(json.dumps(coco))
        print(f"{'evaluator':<18} {'seconds':>8} {'AP':>8} {'AP50':>8}")
        for evaluator in EVALUATORS:
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                metrics = score_detections(path, results, "coco", evaluator=evaluator)
                times.append(time.perf_counter() - start)
            print(f"{evaluator:<18} {min(times):8.2f} {metrics['AP']:8.4f} {metrics['AP50']:8.4f}")


if __name__ == "__main__":
    main()
