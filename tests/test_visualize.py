"""Overlays (palette, outlines, names, legend), box drawings (upscaling, caption placement, scores, NMS) and
SegmentationResult's plot / save / segments."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from ovdense import visualize
from ovdense.detection.postprocess import soft_nms
from ovdense.detection.structures import DetectionResult
from ovdense.errors import UsageError
from ovdense.predictor import SegmentationResult
from ovdense.visualize import (BACKGROUND_COLOUR, boundaries, class_colours, display_scale, draw_boxes, label_image,
                               overlay, palette, place_labels, score_text, srgb_to_lab, text_position)


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
    tint = overlay(None, labels, names, outline=0, names=False, legend=False, scale=1)  # colours alone
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
        picture = np.asarray(overlay(image, labels, ["a", "b", "c"], outline=width, names=False, legend=False,
                                          scale=1))
        assert np.array_equal((picture == 255).all(axis=-1), wanted), width
    plain = np.asarray(overlay(image, labels, ["a", "b", "c"], outline=0, names=False, legend=False, scale=1))
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
    assert [text for text, _ in drawn] == ["sky 62.5%", "grass 37.5%", "dot <0.1%"]  # shares of the labels as given
    assert picture.size[0] > 640 and picture.size[1] >= 480  # drawn 4x: 120 px is under DISPLAY_SHORT_SIDE
    legend = {tuple(c) for c in np.asarray(picture)[:, 640:].reshape(-1, 3)}
    assert all(tuple(palette(4)[index]) in legend for index in (0, 2, 3))  # swatches of the classes present ...
    assert tuple(palette(4)[1]) not in legend  # ... and none of the absent one


def test_names_are_written_inside_their_region_and_skipped_where_they_do_not_fit(monkeypatch):
    labels = np.zeros((200, 300), np.int64)
    labels[:, 200:] = 1
    labels[5:9, 5:9] = 2  # far too small for a name
    drawn = _spy_text(monkeypatch)
    overlay(np.zeros((200, 300, 3), np.uint8), labels, ["left", "right", "speck"], legend=False, scale=1)
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
    stored = result.plot(legend=False, names=False, outline=0, scale=1)
    assert isinstance(stored, Image.Image) and stored.size == (32, 24)
    assert np.asarray(stored)[0, 0].tolist() == np.round(90 * 0.45 + palette(1)[0] * 0.55).astype(int).tolist()
    given = result.plot(np.full((48, 64, 3), 200, np.uint8), legend=False, names=False, outline=0, scale=1)
    assert given.size == (32, 24) and not np.array_equal(np.asarray(given), np.asarray(stored))  # resized
    assert result.plot(legend=False, names=False, outline=0).size == (32 * 16, 24 * 16)  # small: drawn upscaled
    bare = _result(image=False).plot()
    assert bare.size[1] >= 24 and bare.size[0] > 32  # the legend may be taller
    assert "24" in repr(result) and "tensor" not in repr(result)


# ------------------------------------------------------------------------------------------------- small pictures
def _blocks_of(picture: np.ndarray, factor: int) -> bool:
    """Whether (H, W, 3) `picture` is made of factor x factor blocks of one colour (a bitmap scaled up)."""
    height, width = (picture.shape[0] // factor) * factor, (picture.shape[1] // factor) * factor
    cropped = picture[:height, :width]
    return np.array_equal(cropped, cropped[::factor, ::factor].repeat(factor, 0).repeat(factor, 1))


def test_display_scale_brings_small_pictures_to_a_readable_size():
    assert display_scale(96, 128) == 4 and display_scale(96, 96) == 4  # 384 px
    assert display_scale(384, 500) == 1 and display_scale(1080, 1920) == 1
    assert display_scale(383, 383) == 2 and display_scale(200, 300) == 2
    assert display_scale(10, 1000) == 2  # the long side stays within 2048 px
    assert display_scale(5, 4000) == 1


def test_small_box_drawing_is_upscaled_by_pixel_repetition():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    empty = np.asarray(draw_boxes(image, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0), ["a"]))
    assert empty.shape == (384, 512, 3)
    assert np.array_equal(empty, image.repeat(4, 0).repeat(4, 1))  # nearest neighbour, an integer factor
    drawn = draw_boxes(image, np.array([[10.0, 20.0, 60.0, 70.0]]), np.array([0]), np.array([0.9]), ["a"])
    assert drawn.size == (512, 384)
    assert np.asarray(draw_boxes(image, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0), ["a"], scale=1)
                      ).shape == (96, 128, 3)
    with pytest.raises(UsageError, match="scale"):
        draw_boxes(image, np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0), ["a"], scale=0)


def test_small_overlay_is_upscaled_and_its_legend_is_drawn_at_that_size():
    labels = np.zeros((96, 128), np.int64)
    labels[:, 64:] = 1
    image = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    plain = overlay(image, labels, ["sky", "grass"], outline=0, names=False, legend=False, scale=1)
    upscaled = overlay(image, labels, ["sky", "grass"], outline=0, names=False, legend=False)
    assert np.array_equal(np.asarray(upscaled), np.asarray(plain).repeat(4, 0).repeat(4, 1))
    full = np.asarray(overlay(image, labels, ["sky", "grass"]))
    assert full.shape[0] >= 384 and full.shape[1] > 512
    assert _blocks_of(full[:384, :512], 4) is False  # outlines and names drawn at 4x: 1 px lines, smooth text
    legend = full[:, 512:]
    assert (legend != 255).any() and not _blocks_of(legend, 4)  # crisp text, not a small legend scaled up
    assert np.array_equal(full[:384, 200:220], np.asarray(upscaled)[:, 200:220])  # away from outline and names


# ------------------------------------------------------------------------------------------------ caption placement
def _overlap(a, b) -> bool:
    """Whether rectangles (x, y, w, h) share a pixel."""
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def test_captions_go_above_else_below_else_inside():
    sizes = np.array([[40, 10]] * 3)
    places = place_labels(np.array([[50, 50, 150, 120], [0, 0, 100, 60], [0, 0, 200, 200]]), sizes, (200, 200))
    assert places[0] == (50, 40)  # above its box, touching it
    assert places[1] == (0, 60)  # the box touches the top edge: below it
    assert places[2] == (0, 0)  # the box fills the picture: inside its top
    # the same place taken by a better box's caption: the right-aligned place above, then below
    crowd = place_labels(np.array([[50, 50, 150, 120]] * 3), sizes, (200, 200))
    assert crowd == [(50, 40), (110, 40), (50, 120)]


def test_crowded_captions_never_cover_each_other():
    rng = np.random.default_rng(0)
    corners = rng.uniform(0, 300, (60, 2))
    boxes = np.concatenate([corners, corners + rng.uniform(10, 80, (60, 2))], axis=1).clip(0, 384).round()
    sizes = np.stack([rng.integers(30, 120, 60), np.full(60, 15)], axis=1)
    places = place_labels(boxes, sizes, (384, 384))
    rects = [(x, y, int(w), int(h)) for (w, h), place in zip(sizes, places) if place is not None for x, y in [place]]
    assert len(rects) >= 50  # most find a place
    for i, a in enumerate(rects):
        assert 0 <= a[0] and a[0] + a[2] <= 384 and 0 <= a[1] and a[1] + a[3] <= 384
        assert not any(_overlap(a, b) for b in rects[i + 1:])


def test_box_drawing_places_every_caption_it_draws(monkeypatch):
    """draw_boxes hands the placement its boxes at the drawn scale, best first, and draws each caption there."""
    seen = []
    original = place_labels

    def spy(boxes, sizes, canvas):
        seen.append((boxes.copy(), sizes.copy(), canvas))
        return original(boxes, sizes, canvas)

    monkeypatch.setattr(visualize, "place_labels", spy)
    drawn = _spy_text(monkeypatch)
    boxes = np.array([[10, 10, 40, 40], [50, 20, 90, 80]], np.float32)
    draw_boxes(np.zeros((96, 128, 3), np.uint8), boxes, np.array([1, 0]), np.array([0.4, 0.8]), ["cat", "dog"])
    (given, sizes, canvas), = seen
    assert canvas == (512, 384) and np.array_equal(given, boxes[[1, 0]] * 4)  # best first, in drawn pixels
    places = original(given, sizes, canvas)
    assert [text for text, _ in drawn] == ["dog 0.40", "cat 0.80"]  # the best caption drawn last, on top
    for (text, (x, y)), (px, py), (w, h) in zip(drawn, places[::-1], sizes[::-1]):
        assert px <= x < px + w and py - h <= y < py + h  # written inside its caption box


# --------------------------------------------------------------------------------------------------------- scores
def test_score_text_rounds_the_json_value_half_up():
    for k in range(10001):  # every value the JSON can hold in [0, 1]
        whole, cents = divmod((k + 50) // 100, 100)
        assert score_text(k / 10000) == f"{whole}.{cents:02d}", k
    assert score_text(np.float32(0.53496)) == "0.54"  # the JSON writes 0.535
    assert score_text(0.9999) == "1.00" and score_text(0.00004) == "0.00"


def test_drawn_scores_equal_the_json_scores(tmp_path, monkeypatch):
    scores = torch.tensor([0.53496, 0.56496, 0.125])  # float32; the JSON writes 0.535, 0.565, 0.125
    boxes = torch.tensor([[2.0, 30, 30, 60], [40, 30, 70, 60], [80, 30, 110, 60]])
    result = DetectionResult(boxes, scores, torch.tensor([0, 1, 2]), ["bar", "star", "ring"], (96, 128),
                             np.zeros((96, 128, 3), np.uint8))
    drawn = _spy_text(monkeypatch)
    paths = result.save(tmp_path, stem="scene")
    written = json.loads(paths["json"].read_text())["detections"]
    assert [d["score"] for d in written] == [0.565, 0.535, 0.125]
    assert sorted(text for text, _ in drawn) == ["bar 0.54", "ring 0.13", "star 0.57"]  # half-up of the JSON values


# ------------------------------------------------------------------------------------------------------------ NMS
def _hard_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> list[int]:
    """Greedy class-wise NMS: best first, a box is dropped when its IoU with a kept box of its class exceeds `iou`."""
    def overlap(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    kept = []
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        if all(labels[j] != labels[i] or overlap(boxes[i], boxes[j]) <= iou for j in kept):
            kept.append(i)
    return kept


def test_soft_nms_duplicates_are_not_drawn_but_stay_in_the_json(tmp_path, monkeypatch):
    seen = []
    original = place_labels
    monkeypatch.setattr(visualize, "place_labels", lambda boxes, sizes, canvas: seen.append(boxes.copy()) or
                        original(boxes, sizes, canvas))
    # two things, each found three times (shifted copies: IoU 0.6-0.8), and a box of another class on the first
    boxes = torch.tensor([[10, 10, 50, 50], [12, 11, 52, 51], [14, 14, 54, 54], [60, 40, 90, 90], [62, 42, 92, 92],
                          [58, 38, 90, 86], [10, 10, 50, 50]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.85, 0.8, 0.7, 0.65, 0.6, 0.5])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2])
    keep, decayed = soft_nms(boxes, scores, sigma=0.5, labels=labels)  # RegionCLIP's test setting
    result = DetectionResult(boxes[keep], decayed, labels[keep], ["bar", "ring", "star"], (96, 128),
                             np.zeros((96, 128, 3), np.uint8)).above(0.05)
    assert len(result) == 7  # soft-NMS decayed the duplicates, it did not drop them
    result.save(tmp_path, stem="scene")
    assert len(json.loads((tmp_path / "scene.json").read_text())["detections"]) == 7  # the JSON keeps all
    expected = _hard_nms(result.boxes.numpy(), result.scores.numpy(), result.labels.numpy(), 0.5)
    assert len(expected) == 3  # one box per thing and class
    assert np.array_equal(seen[-1], np.round(result.boxes.numpy()[expected] * 4))
    seen.clear()
    result.plot(nms_iou=None)
    assert len(seen[-1]) == 7
