"""Overlays (palette, outlines, names, legend) and SegmentationResult's plot / save / segments."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from ovdense.predictor import SegmentationResult
from ovdense.visualize import (BACKGROUND_COLOUR, boundaries, class_colours, label_image, overlay, palette,
                               srgb_to_lab, text_position)


def _min_delta_e(colours: np.ndarray) -> float:
    lab = srgb_to_lab(colours)
    distance = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    distance[np.diag_indices(len(colours))] = np.inf
    return float(distance.min())


def test_lab_conversion_matches_reference_values():
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0], [0, 0, 255]]))
    np.testing.assert_allclose(lab, [[100, 0, 0], [0, 0, 0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]],
                               atol=0.05)


def test_palette_colours_are_far_apart():
    """CIELAB Delta E 1976: ~2.3 is a just-noticeable difference, ~10 reads as another colour side by side.

    150 classes (ADE20K) keep >= 12 (the old VOC bit palette: 1.5, two identical-looking pairs); the first
    20, what most vocabularies use, keep >= 30, i.e. they differ in hue or clearly in lightness (VOC: 8.8).
    """
    colours = palette(150)
    assert colours.shape == (150, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 150
    assert _min_delta_e(colours) >= 12
    assert _min_delta_e(colours[:20]) >= 30
    assert np.array_equal(palette(20), colours[:20])  # a class keeps its colour when the vocabulary grows
    lightness = srgb_to_lab(colours)[:, 0]
    assert lightness.min() >= 29 and lightness.max() <= 86  # no near-black or near-white class colour


def test_background_is_dark_grey_and_label_png_agrees_with_overlay():
    names = ["background", "cat", "dog"]
    colours = class_colours(names)
    assert tuple(colours[0]) == BACKGROUND_COLOUR and np.array_equal(colours[1:], palette(3)[1:])
    labels = np.array([[0, 1], [2, 2]])
    png = label_image(labels, names)
    assert png.mode == "P" and np.array_equal(np.asarray(png), labels)
    assert np.array_equal(np.asarray(png.convert("RGB")), colours[labels])
    tint = overlay(None, labels, names, outline=0, names=False, legend=False)  # colours alone
    assert np.array_equal(np.asarray(tint), colours[labels])
    assert np.array_equal(np.asarray(label_image(labels, 3).convert("RGB")), palette(3)[labels])


def test_outline_pixels_lie_exactly_on_label_boundaries():
    labels = np.zeros((40, 60), np.int64)
    labels[:, 30:] = 1
    labels[25:, 10:20] = 2  # a box touching the bottom edge
    image = np.zeros((40, 60, 3), np.uint8)  # blended pixels stay below 255: only outline pixels are white
    one = np.zeros((40, 60), bool)  # 1 px: the pixel before each boundary (left of / above it)
    one[:, 29] = True
    one[24, 10:20] = True
    one[25:, 9] = one[25:, 19] = True
    two = np.zeros((40, 60), bool)  # 2 px: both pixels next to each boundary
    two[:, 29:31] = True
    two[24:26, 10:20] = True
    two[25:, 9:11] = two[25:, 19:21] = True
    for width, wanted in ((1, one), (2, two)):
        assert np.array_equal(boundaries(labels, width), wanted)
        picture = np.asarray(overlay(image, labels, ["a", "b", "c"], outline=width, names=False, legend=False))
        assert np.array_equal((picture == 255).all(axis=-1), wanted), width
    plain = np.asarray(overlay(image, labels, ["a", "b", "c"], outline=0, names=False, legend=False))
    assert not (plain == 255).all(axis=-1).any()


def _spy_text(monkeypatch):
    """Record every (text, xy) drawn with ImageDraw.text."""
    drawn = []
    original = ImageDraw.ImageDraw.text

    def spy(self, xy, text, *args, **kwargs):
        drawn.append((text, xy))
        return original(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    return drawn


def test_legend_lists_only_present_classes_by_area(monkeypatch):
    labels = np.zeros((120, 160), np.int64)
    labels[:, 100:] = 2
    labels[:3, :1] = 3  # 3 pixels: '<0.1%', never '0.0%'
    drawn = _spy_text(monkeypatch)
    picture = overlay(np.zeros((120, 160, 3), np.uint8), labels, ["sky", "unused", "grass", "dot"], names=False)
    assert [text for text, _ in drawn] == ["sky 62.5%", "grass 37.5%", "dot <0.1%"]
    assert picture.size[0] > 160 and picture.size[1] >= 120
    legend = {tuple(c) for c in np.asarray(picture)[:, 160:].reshape(-1, 3)}
    assert all(tuple(palette(4)[index]) in legend for index in (0, 2, 3))  # swatches of the classes present ...
    assert tuple(palette(4)[1]) not in legend  # ... and none of the absent one


def test_names_are_written_inside_their_region_and_skipped_where_they_do_not_fit(monkeypatch):
    labels = np.zeros((200, 300), np.int64)
    labels[:, 200:] = 1
    labels[5:9, 5:9] = 2  # far too small for a name
    drawn = _spy_text(monkeypatch)
    overlay(np.zeros((200, 300, 3), np.uint8), labels, ["left", "right", "speck"], legend=False)
    where = dict(drawn)
    assert set(where) == {"left", "right"}
    assert where["left"][0] < 200 - 20 and where["right"][0] > 200


def test_text_position_picks_the_deep_part_and_refuses_what_does_not_fit():
    mask = np.zeros((50, 80), bool)
    mask[5:45, 10:70] = True  # a thick block ...
    mask[0:3, :] = True  # ... and a thin strip where a box would also fit, only at the very edge
    y, x = text_position(mask, 10, 20)
    assert mask[y:y + 10, x:x + 20].all()
    assert abs((y + 5) - 25) <= 1 and abs((x + 10) - 40) <= 1  # centred in the block
    assert text_position(mask, 45, 20) is None and text_position(mask, 10, 90) is None


def _result(scores_size=None, image=True):
    labels = np.zeros((24, 32), np.int64)
    labels[:, 16:] = 2
    labels[4:10, 4:8] = 1
    height, width = scores_size or labels.shape
    scores = torch.zeros(3, height, width)
    scores[0] = 0.25
    scores[1] = torch.linspace(0, 1, width)  # varies along x
    scores[2] = 0.75
    picture = np.full((24, 32, 3), 90, np.uint8) if image else None
    return SegmentationResult(labels, scores, ["road", "car", "sky"], picture)


def test_segments_carry_rle_that_decodes_to_the_exact_mask():
    result = _result()
    segments = result.segments()
    assert [s["label"] for s in segments] == ["sky", "road", "car"]
    json.dumps(segments)  # JSON-serialisable as is
    for segment in segments:
        rle = segment["rle"]
        assert rle["size"] == [24, 32] and isinstance(rle["counts"], str)
        decoded = coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        assert np.array_equal(decoded.astype(bool), result.labels == segment["index"])
    car = segments[2]
    assert car["box"] == [4, 4, 8, 10] and car["area"] == round(24 / (24 * 32), 6)
    assert car["score"] == pytest.approx(float(result.scores[1, 0, 4:8].mean()), abs=1e-6)
    assert "rle" not in result.segments(rle=False)[0]


def test_segment_scores_from_a_smaller_score_map():
    full, small = _result(), _result(scores_size=(6, 8))
    for a, b in zip(full.segments(rle=False), small.segments(rle=False)):
        assert a["label"] == b["label"] and a["area"] == b["area"] and a["box"] == b["box"]
        assert b["score"] == pytest.approx(a["score"], abs=0.08)
    assert small.score_map(1).shape == (24, 32)
    constant = [s for s in small.segments(rle=False) if s["label"] == "sky"][0]
    assert constant["score"] == pytest.approx(0.75)
    no_scores = SegmentationResult(full.labels, None, full.class_names)
    assert [s["score"] for s in no_scores.segments()] == [None, None, None]


def test_save_writes_overlay_labels_and_json(tmp_path):
    result = _result()
    paths = result.save(tmp_path / "out", stem="street")
    assert paths == {"overlay": tmp_path / "out" / "street_overlay.png",
                     "labels": tmp_path / "out" / "street_labels.png", "json": tmp_path / "out" / "street.json"}
    summary = json.loads(paths["json"].read_text())
    assert summary == json.loads(json.dumps(result.summary()))
    assert summary["classes"] == ["road", "car", "sky"] and (summary["height"], summary["width"]) == (24, 32)
    png = Image.open(paths["labels"])
    assert png.mode == "P" and np.array_equal(np.asarray(png), result.labels)
    assert Image.open(paths["overlay"]).size[1] >= 24 and Image.open(paths["overlay"]).size[0] > 32
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["street.json", "street_labels.png",
                                                                     "street_overlay.png"]  # no temporary left


def test_plot_uses_the_stored_or_given_image():
    result = _result()
    stored = result.plot(legend=False, names=False, outline=0)
    assert isinstance(stored, Image.Image) and stored.size == (32, 24)
    assert np.asarray(stored)[0, 0].tolist() == np.round(90 * 0.45 + palette(1)[0] * 0.55).astype(int).tolist()
    given = result.plot(np.full((48, 64, 3), 200, np.uint8), legend=False, names=False, outline=0)  # resized
    assert given.size == (32, 24) and not np.array_equal(np.asarray(given), np.asarray(stored))
    bare = _result(image=False).plot()
    assert bare.size[1] >= 24 and bare.size[0] > 32  # the legend may be taller
    assert "24" in repr(result) and "tensor" not in repr(result)
