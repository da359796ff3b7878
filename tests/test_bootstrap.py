"""Bootstrap intervals: each statistic on all items equals the library metric it stands for, and the intervals
behave as percentile-bootstrap intervals should."""
import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovdense.eval import SegmentationMetric
from ovdense.eval.bootstrap import (ap50_statistic, bootstrap, difference, iou_statistic, mean_over, rate_statistic,
                                    resamples)


def _segmentation_items(rng, items=30, classes=5):
    targets = [rng.integers(0, classes, (8, 8)) for _ in range(items)]
    predictions = [np.where(rng.random((8, 8)) < 0.6, t, rng.integers(0, classes, (8, 8))) for t in targets]
    return targets, predictions


def _counts(targets, predictions, classes=5):
    inter = np.array([[((t == c) & (p == c)).sum() for c in range(classes)] for t, p in zip(targets, predictions)])
    union = np.array([[((t == c) | (p == c)).sum() for c in range(classes)] for t, p in zip(targets, predictions)])
    return inter, union


def test_iou_statistic_on_all_items_is_the_metrics_miou():
    rng = np.random.default_rng(0)
    targets, predictions = _segmentation_items(rng)
    metric = SegmentationMetric(5)
    for t, p in zip(targets, predictions):
        metric.update(p, t)
    iou = metric.compute()["IoU"]
    statistic = iou_statistic(*_counts(targets, predictions), classes=[1, 3])
    assert statistic(np.arange(30)) == pytest.approx((iou[1] + iou[3]) / 2, abs=1e-9)
    twice = np.concatenate([np.arange(30), np.arange(30)])  # a draw repeating every item counts it twice
    assert statistic(twice) == pytest.approx(statistic(np.arange(30)), abs=1e-9)


def test_intervals_cover_the_value_shrink_with_items_and_pair_comparisons():
    rng = np.random.default_rng(1)
    hits_few = [[bool(x)] for x in rng.random(40) < 0.7]
    hits_many = [[bool(x)] for x in rng.random(1000) < 0.7]
    few, many = bootstrap(rate_statistic(hits_few), 40), bootstrap(rate_statistic(hits_many), 1000)
    for estimate in (few, many):
        assert estimate.low < estimate.value < estimate.high
    assert many.high - many.low < 0.5 * (few.high - few.low)
    assert 64 < many.low < 70 < many.high < 76  # the binomial standard error is 1.45 points

    first = _segmentation_items(rng, items=40)
    a = iou_statistic(*_counts(*first), classes=range(5))
    same = bootstrap(difference(a, a), 40)
    assert (same.value, same.low, same.high) == (0, 0, 0)
    better = [[True] * 3 + [False] for _ in range(40)]
    worse = [[True] * 2 + [False] * 2 for _ in range(40)]
    gap = bootstrap(difference(rate_statistic(better), rate_statistic(worse)), 40)
    assert gap.value == 25 and gap.above_zero
    both = mean_over([rate_statistic(better), rate_statistic(worse)])
    assert both(np.arange(40)) == 62.5
    assert np.array_equal(resamples(40, 5, seed=3), resamples(40, 5, seed=3))


def test_ap50_statistic_on_all_images_is_cocoevals_ap50():
    rng = np.random.default_rng(2)
    coco = {"images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(1, 13)],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}], "annotations": []}
    results = []
    for image in range(1, 13):
        for category in (1, 2, 3):
            x, y = (float(v) for v in rng.integers(0, 60, 2))
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image, "category_id": category,
                                        "bbox": [x, y, 30.0, 30.0], "area": 900.0, "iscrowd": 0})
            shift = float(rng.integers(-20, 20))  # some boxes miss at IoU 0.5
            results.append({"image_id": image, "category_id": category, "bbox": [x + shift, y, 30.0, 30.0],
                            "score": float(rng.random())})
            results.append({"image_id": image, "category_id": category, "bbox": [x - shift, y + 5, 30.0, 30.0],
                            "score": float(rng.random())})
    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO()
        truth.dataset = coco
        truth.createIndex()
        reference = COCOeval(truth, truth.loadRes(results), "bbox")
        reference.params.catIds = [1, 3]
        reference.evaluate()
        reference.accumulate()
    expected = 100 * reference.eval["precision"][0, :, :, 0, -1].mean()
    statistic = ap50_statistic(coco, results, [1, 3])
    assert 20 < expected < 95
    assert statistic(np.arange(12)) == pytest.approx(expected, abs=1e-6)
    estimate = bootstrap(statistic, 12, draws=50)
    assert estimate.low <= estimate.value <= estimate.high
