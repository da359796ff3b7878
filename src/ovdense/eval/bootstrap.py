"""Percentile-bootstrap intervals over evaluation items (images, scenes), for a metric and for the difference of two
systems scored on the same items (a paired bootstrap: both are recomputed on each resample)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A metric on all items and its percentile-bootstrap interval at `level`."""

    value: float
    low: float
    high: float
    level: float = 0.95

    def __str__(self) -> str:
        return f"{self.value:.1f} [{self.low:.1f}, {self.high:.1f}]"

    @property
    def above_zero(self) -> bool:
        """The whole interval lies above 0 (for a difference: the first system is better)."""
        return self.low > 0


def resamples(items: int, draws: int = 1000, seed: int = 0) -> np.ndarray:
    """(draws, items) indices drawn with replacement: row r is the r-th bootstrap resample of the items."""
    if items < 1:
        raise ValueError("a bootstrap needs at least one item")
    return np.random.default_rng(seed).integers(0, items, size=(draws, items))


def bootstrap(statistic: Callable[[np.ndarray], float], items: int, draws: int = 1000, seed: int = 0,
              level: float = 0.95) -> Estimate:
    """statistic(indices) -> float, with indices an (n,) array into the items (repeats allowed): its value on
    all items (indices 0..items-1) and the percentile interval of its values over `draws` resamples; resamples where
    the statistic is NaN (a class absent from the drawn items) are left out of the interval."""
    value = statistic(np.arange(items))
    values = np.array([statistic(indices) for indices in resamples(items, draws, seed)], dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return Estimate(value, float("nan"), float("nan"), level)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return Estimate(value, float(low), float(high), level)


def mean_over(statistics: Sequence[Callable[[np.ndarray], float]]) -> Callable[[np.ndarray], float]:
    """The mean of several statistics on the same indices: e.g. one metric averaged over training seeds, each seed's
    model scored on the same resampled items."""
    return lambda indices: float(np.mean([s(indices) for s in statistics]))


def difference(first: Callable[[np.ndarray], float], second: Callable[[np.ndarray], float]
               ) -> Callable[[np.ndarray], float]:
    """first - second on the same indices (the paired bootstrap of a comparison)."""
    return lambda indices: first(indices) - second(indices)


def iou_statistic(intersections: np.ndarray, unions: np.ndarray, classes: Sequence[int]) -> Callable[[np.ndarray], float]:
    """Per-item pixel counts (items, K) -> statistic(indices): the mean IoU (%) over `classes` of the summed counts of
    the drawn items, as SegmentationMetric computes it (a class with no union in the draw is skipped)."""
    intersections, unions = np.asarray(intersections, float), np.asarray(unions, float)

    def statistic(indices: np.ndarray) -> float:
        inter, union = intersections[indices][:, classes].sum(0), unions[indices][:, classes].sum(0)
        present = union > 0
        return 100 * float((inter[present] / union[present]).mean()) if present.any() else float("nan")
    return statistic


def rate_statistic(hits: Sequence[Sequence[bool]]) -> Callable[[np.ndarray], float]:
    """Per-item lists of hits (e.g. the phrases of a scene, right or not) -> statistic(indices): the percentage of
    hits among all entries of the drawn items."""
    counts = np.array([[sum(map(bool, h)), len(h)] for h in hits], dtype=float).reshape(-1, 2)

    def statistic(indices: np.ndarray) -> float:
        right, total = counts[indices].sum(0)
        return 100 * right / total if total else float("nan")
    return statistic


def ap50_statistic(coco: dict, results: list[dict], category_ids: Sequence[int]) -> Callable[[np.ndarray], float]:
    """COCO ground truth (a dict with 'images', 'annotations', 'categories') and results -> statistic(indices) over
    its images in increasing-id order: COCO AP50 (%) over `category_ids` (those with ground truth in the draw) on
    the drawn images, each drawn copy of an image a separate image (faster-coco-eval)."""
    import faster_coco_eval

    image_ids = sorted(image["id"] for image in coco["images"])
    truth_of = {i: [] for i in image_ids}
    for annotation in coco["annotations"]:
        truth_of[annotation["image_id"]].append(annotation)
    results_of = {i: [] for i in image_ids}
    for result in results:
        results_of[result["image_id"]].append(result)
    images = {image["id"]: image for image in coco["images"]}

    def statistic(indices: np.ndarray) -> float:
        drawn = {"images": [], "annotations": [], "categories": coco["categories"]}
        detections = []
        for copy, index in enumerate(indices):
            source = image_ids[index]
            drawn["images"].append({**images[source], "id": copy + 1})
            drawn["annotations"] += [{**a, "id": len(drawn["annotations"]) + k + 1, "image_id": copy + 1}
                                     for k, a in enumerate(truth_of[source])]
            detections += [{**r, "image_id": copy + 1} for r in results_of[source]]
        truth = faster_coco_eval.COCO(drawn)
        if not detections:
            return 0.0
        evaluator = faster_coco_eval.COCOeval_faster(truth, truth.loadRes(detections), "bbox",
                                                     print_function=lambda *args: None)
        evaluator.params.catIds = list(category_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        precision = evaluator.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, (R, K), area all, last maxDets
        precision = precision[:, (precision > -1).all(axis=0)]
        return 100 * float(precision.mean()) if precision.size else float("nan")
    return statistic
