"""Metrics against hand-computed cases, and the dataset readers on tiny fake datasets."""
import math

import numpy as np
import pytest
from PIL import Image

from ovdense.data import SegmentationDataset
from ovdense.eval import SegmentationMetric, format_table


def test_metric_hand_computed():
    target = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    metric = SegmentationMetric(num_classes=4)
    metric.update(prediction, target)
    # class 0: tp 1, gt 2, pred 3 -> IoU 1/4, Acc 1/2; class 1: tp 2, gt 3, pred 3 -> 2/4, 2/3;
    # class 2: tp 1, gt 2, pred 1 -> 1/2, 1/2; class 3: absent everywhere -> NaN; pixel 255 ignored
    out = metric.compute()
    assert out["IoU"][:3] == pytest.approx([25.0, 50.0, 50.0])
    assert math.isnan(out["IoU"][3]) and math.isnan(out["Acc"][3])
    assert out["mIoU"] == pytest.approx(125 / 3)
    assert out["mAcc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert out["aAcc"] == pytest.approx(100 * 4 / 7)
    assert "mIoU 41.67" in format_table(out, ["a", "b", "c", "d"])


def test_metric_streams_and_checks_inputs():
    whole, parts = SegmentationMetric(3), SegmentationMetric(3)
    rng = np.random.default_rng(0)
    target, prediction = rng.integers(0, 3, (2, 10, 10)), rng.integers(0, 3, (2, 10, 10))
    whole.update(prediction.reshape(20, 10), target.reshape(20, 10))
    for p, t in zip(prediction, target):
        parts.update(p, t)
    assert (whole.confusion == parts.confusion).all()
    with pytest.raises(ValueError, match="pixels"):
        whole.update(np.zeros((2, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="0..2"):
        whole.update(np.full((2, 2), 3), np.zeros((2, 2)))


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_voc_layouts_and_reduce_zero_label(tmp_path):
    root = tmp_path / "VOC2012"
    label = np.array([[0, 15], [255, 20]])
    _png(root / "JPEGImages" / "a.jpg", np.zeros((2, 2, 3)))
    _png(root / "SegmentationClass" / "a.png", label)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    voc21 = SegmentationDataset("voc21", root)
    image, decoded = voc21[0]
    assert image.name == "a.jpg" and decoded.tolist() == [[0, 15], [255, 20]]
    assert len(voc21.vocabulary) == 21
    _, reduced = SegmentationDataset("voc20", root)[0]
    assert reduced.tolist() == [[255, 14], [255, 19]]


def test_ade_cityscapes_and_folder_layouts(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    _png(ade / "images/validation/x.jpg", np.zeros((2, 2, 3)))
    _png(ade / "annotations/validation/x.png", np.array([[0, 1], [150, 2]]))
    assert SegmentationDataset("ade150", ade)[0][1].tolist() == [[255, 0], [149, 1]]

    city = tmp_path / "cityscapes"
    _png(city / "leftImg8bit/val/bonn/b_000_leftImg8bit.png", np.zeros((2, 2, 3)))
    _png(city / "gtFine/val/bonn/b_000_gtFine_labelTrainIds.png", np.array([[0, 18], [255, 3]]))
    assert SegmentationDataset("cityscapes", city)[0][1].tolist() == [[0, 18], [255, 3]]

    own = tmp_path / "mine"
    _png(own / "images/p.png", np.zeros((2, 2, 3)))
    _png(own / "labels/p.png", np.array([[0, 1], [1, 255]]))
    (own / "classes.txt").write_text("road\ncar; automobile\n")
    data = SegmentationDataset("folder", own)
    assert data.vocabulary.names == ["road", "car"] and data[0][1].tolist() == [[0, 1], [1, 255]]


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        SegmentationDataset("voc21", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="layout"):
        SegmentationDataset("voc21", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        SegmentationDataset("pascal", tmp_path)
