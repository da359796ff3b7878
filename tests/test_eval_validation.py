"""Evaluation data that cannot lie (issue 23): a corpus of broken COCO / LVIS instances JSON, detection results and
grounding JSONL. Each is refused with an InputError that names the file, the entry and the problem, before anything
is scored or a model is loaded. The clean files score exactly as before. The metric tables print as detectron2 logs
them.

New names are looked up when a test runs, not at import, so that each test fails on its own against code that lacks
them.
"""
import copy
import json
import re

import numpy as np
import pytest
from test_detection_eval import _coco_gt, _jittered_results, _lvis_gt, _pycocotools

from ovdense.data import detection as data_detection
from ovdense.data import grounding as data_grounding
from ovdense.errors import InputError
from ovdense.eval import detection as eval_detection
from ovdense.eval import grounding as eval_grounding


def _mutated(tmp_path, mutate, lvis=False):
    """The clean COCO (or LVIS) file of test_detection_eval, changed by `mutate(data)` and written as bad.json."""
    clean, _ = (_lvis_gt if lvis else _coco_gt)(tmp_path)
    data = json.loads(clean.read_text())
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))  # NaN and Infinity are written as JSON's NaN / Infinity, which it reads back
    return path


def _set(key, k, field, value):
    """A mutation: data[key][k][field] = value."""
    return lambda data: data[key][k].__setitem__(field, value)


def _set_bbox(k, side, value):
    return lambda data: data["annotations"][k]["bbox"].__setitem__(side, value)


def _drop(key, k, field):
    return lambda data: data[key][k].pop(field)


ANN0 = r"annotations\[0\] \(id 1\): "
INSTANCES = [  # (case, mutation, the message after "PATH: ")
    # the cases
    ("box of width -20", _set_bbox(0, 2, -20), ANN0 + r"bbox \[10, 10, -20, 30\] has width -20; .* needs width > 0"),
    ("box of width 0", _set_bbox(0, 2, 0), ANN0 + r"bbox \[10, 10, 0, 30\] has width 0; .* needs width > 0"),
    ("box of height 0", _set_bbox(0, 3, 0), ANN0 + r"bbox \[10, 10, 30, 0\] has height 0"),
    ("unknown image_id", _set("annotations", 0, "image_id", 99),
     ANN0 + "'image_id' must be the id of one of the images, not 99"),
    ("unknown category_id", _set("annotations", 0, "category_id", 99),
     ANN0 + "'category_id' must be the id of one of the categories, not 99"),
    ("two images sharing an id", _set("images", 1, "id", 1),
     r"images\[1\] \(id 1\): images\[0\] has id 1 too; ids must be unique in 'images'"),
    ("category named ''", _set("categories", 2, "name", ""),
     r"categories\[2\] \(id 3\): 'name' must be a non-empty string, not ''"),
    ("bbox given as a string", _set("annotations", 0, "bbox", "10 10 30 30"),
     ANN0 + r"bbox must be \[x, y, width, height\], 4 finite numbers, not '10 10 30 30'"),
    ("duplicated category ids", _set("categories", 2, "id", 2),
     r"categories\[2\] \(id 2\): categories\[1\] has id 2 too; ids must be unique in 'categories'"),
    # structure
    ("images not a list", lambda data: data.__setitem__("images", {}), r"not COCO .*no 'images' list"),
    ("no categories", lambda data: data.__setitem__("categories", []), "the 'categories' list is empty"),
    ("no images", lambda data: data.__setitem__("images", []), "the 'images' list is empty"),
    ("an image that is a string", lambda data: data["images"].__setitem__(2, "3.jpg"),
     r"images\[2\]: must be an object, not '3.jpg'"),
    # ids
    ("image id a string", _set("images", 0, "id", "1"), r"images\[0\]: 'id' must be an integer, not '1'"),
    ("image id a bool", _set("images", 0, "id", True), r"images\[0\]: 'id' must be an integer, not True"),
    ("category id a float", _set("categories", 0, "id", 1.0), r"categories\[0\]: 'id' must be an integer, not 1.0"),
    ("annotation without id", _drop("annotations", 0, "id"), r"annotations\[0\]: 'id' must be an integer, not missing"),
    ("repeated annotation id", _set("annotations", 3, "id", 1),
     r"annotations\[3\] \(id 1\): annotations\[0\] has id 1 too"),
    ("image_id a string", _set("annotations", 0, "image_id", "1"), ANN0 + "'image_id' must be .* not '1'"),
    ("category_id missing", _drop("annotations", 0, "category_id"), ANN0 + "'category_id' must be .*, not missing"),
    # categories
    ("category name null", _set("categories", 0, "name", None),
     r"categories\[0\] \(id 1\): 'name' must be a non-empty string, not null"),
    ("category name blank", _set("categories", 0, "name", "  "), r"categories\[0\] \(id 1\): 'name' must be"),
    ("category name twice", _set("categories", 2, "name", "Cat"),
     r"categories\[2\] \(id 3\): categories\[0\] \(id 1\) has the name 'cat' too; category names must be unique"),
    # boxes, areas, crowds
    ("bbox of 3 numbers", _set("annotations", 0, "bbox", [1, 2, 3]), ANN0 + r"bbox must be .* not \[1, 2, 3\]"),
    ("bbox with NaN", _set_bbox(0, 0, float("nan")), ANN0 + r"bbox must be .*4 finite numbers, not \[nan, 10"),
    ("bbox with infinity", _set_bbox(0, 3, float("inf")), ANN0 + "bbox must be .*4 finite numbers"),
    ("bbox with a bool", _set_bbox(0, 0, True), ANN0 + r"bbox must be .*not \[True, 10"),
    ("bbox missing", _drop("annotations", 0, "bbox"), ANN0 + "bbox must be .*, not missing"),
    ("area missing", _drop("annotations", 0, "area"), ANN0 + "'area' must be a finite number >= 0, not missing"),
    ("area negative", _set("annotations", 0, "area", -4), ANN0 + "'area' must be a finite number >= 0, not -4"),
    ("area a string", _set("annotations", 0, "area", "900"), ANN0 + "'area' must be .* not '900'"),
    ("iscrowd 2", _set("annotations", 0, "iscrowd", 2), ANN0 + "'iscrowd' must be 0 or 1, not 2"),
    ("iscrowd missing (COCO)", _drop("annotations", 0, "iscrowd"), ANN0 + "'iscrowd' must be 0 or 1, not missing"),
    # images
    ("file_name empty", _set("images", 0, "file_name", ""),
     r"images\[0\] \(id 1\): 'file_name' must be a non-empty string, not ''"),
    ("file_name a number", _set("images", 0, "file_name", 7), r"images\[0\] \(id 1\): 'file_name' must be .* not 7"),
    ("no file_name or coco_url", _drop("images", 0, "file_name"),
     r"images\[0\] \(id 1\): needs a 'file_name' \(or LVIS's 'coco_url'\)"),
    ("width 0", _set("images", 3, "width", 0), r"images\[3\] \(id 4\): 'width' must be a positive integer, not 0"),
    ("height a string", _set("images", 3, "height", "100"), r"images\[3\] \(id 4\): 'height' must be .* not '100'"),
    ("width a float", _set("images", 3, "width", 100.5), r"images\[3\] \(id 4\): 'width' must be .* not 100.5"),
]
LVIS = [
    ("neg_category_ids unknown", _set("images", 0, "neg_category_ids", [2, 99]),
     r"images\[0\] \(id 1\): 'neg_category_ids' holds 99, which is not a category id"),
    ("not_exhaustive_category_ids a string id", _set("images", 1, "not_exhaustive_category_ids", ["3"]),
     r"images\[1\] \(id 2\): 'not_exhaustive_category_ids' holds '3', which is not a category id"),
    ("neg_category_ids not a list", _set("images", 0, "neg_category_ids", 2),
     r"images\[0\] \(id 1\): 'neg_category_ids' must be a list of category ids, not 2"),
    ("frequency x", _set("categories", 0, "frequency", "x"),
     r"categories\[0\] \(id 1\): 'frequency' must be 'r', 'c' or 'f' \(LVIS\), not 'x'"),
    ("names equal once '_' is a space", _set("categories", 1, "name", "baseball bat"),
     r"categories\[1\] \(id 2\): categories\[0\] \(id 1\) has the name 'baseball_bat' too"),
]


@pytest.mark.parametrize("mutate, message, lvis", [(m, e, False) for _, m, e in INSTANCES]
                         + [(m, e, True) for _, m, e in LVIS], ids=[case for case, _, _ in INSTANCES + LVIS])
def test_broken_instances_are_named_before_any_scoring(tmp_path, mutate, message, lvis):
    path = _mutated(tmp_path, mutate, lvis)
    with pytest.raises(InputError) as error:
        data_detection.DetectionDataset(path)
    assert re.match(re.escape(str(path)) + ": " + message, str(error.value)), str(error.value)
    with pytest.raises(InputError, match=re.escape(str(error.value))):  # scoring reads the file the same way
        eval_detection.score_detections(path, [], "coco")


def test_lvis_annotations_need_no_iscrowd(tmp_path):
    path = _mutated(tmp_path, lambda data: [a.pop("iscrowd") for a in data["annotations"]], lvis=True)
    assert data_detection.DetectionDataset(path).is_lvis
    with pytest.raises(InputError, match=r"annotations\[1\] \(id 2\): 'iscrowd' must be 0 or 1, not 3"):
        data_detection.DetectionDataset(_mutated(tmp_path, _set("annotations", 1, "iscrowd", 3), lvis=True))


def test_a_broken_annotations_file_stops_the_cli_before_the_model_is_loaded(tmp_path, capsys):
    from ovdense.cli import main
    path = _mutated(tmp_path, _set_bbox(0, 2, -20))
    code = main(["eval", "--annotations", str(path), "--method", "regionclip",
                 "--checkpoint", str(tmp_path / "no-such-detector.safetensors")])
    err = capsys.readouterr().err
    assert code == 1 and "bad.json: annotations[0] (id 1): bbox [10, 10, -20, 30] has width -20" in err
    assert "no-such-detector" not in err  # the checkpoint was not even looked at


def test_the_clean_file_scores_exactly_as_before(tmp_path):
    """The numbers of the code before the checks (and pycocotools' own), on test_detection_eval's problem."""
    gt, annotations = _coco_gt(tmp_path)
    results = _jittered_results(annotations)
    metrics = eval_detection.score_detections(gt, results, "coco")
    before = {"AP": 30.52644192990728, "AP50": 50.09900990099009, "AP75": 26.580491382471582,
              "APs": 38.88330975954738, "APm": 46.254125412541256}
    assert {k: metrics[k] for k in before} == pytest.approx(before, abs=1e-9) and np.isnan(metrics["APl"])
    assert [metrics[k] for k in before] == pytest.approx(list(_pycocotools(gt, results)[:5]), abs=1e-9)
    split, _ = _coco_gt(tmp_path, cat={"split": "base"}, dog={"split": "novel"}, person={"split": "novel"})
    ov = eval_detection.score_detections(split, results, "ov-coco")
    assert [ov[k] for k in ("AP50", "AP50_base", "AP50_novel")] == pytest.approx(
        [50.09900990099009, 70.29702970297033, 39.99999999999999], abs=1e-9)


# ---------------------------------------------------------------- detection results
def _result_set(k, field, value):
    return lambda results: results[k].__setitem__(field, value)


RESULT3 = r"detection results, entry \[3\]: "
RESULTS = [  # (case, mutation of the result list, the message)
    ("score 'high'", _result_set(3, "score", "high"), RESULT3 + "score must be a finite number, not 'high'"),
    ("score a bool", _result_set(3, "score", True), RESULT3 + "score must be a finite number, not True"),
    ("score NaN", _result_set(3, "score", float("nan")), RESULT3 + "score must be a finite number, not nan"),
    ("score missing", lambda results: results[3].pop("score"),
     RESULT3 + r"has no 'score' \(a COCO box result has image_id, category_id, bbox, score\)"),
    ("bbox a string", _result_set(3, "bbox", "1 2 3 4"), RESULT3 + "bbox must be .* not '1 2 3 4'"),
    ("bbox of 3 numbers", _result_set(3, "bbox", [1, 2, 3]), RESULT3 + r"bbox must be .* not \[1, 2, 3\]"),
    ("bbox of negative width", _result_set(3, "bbox", [10, 10, -5, 20]),
     RESULT3 + r"bbox \[10, 10, -5, 20\] has width -5; \[x, y, width, height\] needs width >= 0"),
    ("bbox with infinity", _result_set(3, "bbox", [10, 10, 5, float("inf")]), RESULT3 + "bbox must be .*finite"),
    ("unknown image_id", _result_set(3, "image_id", 7),
     RESULT3 + "image_id 7 is not the id of one of the images in .*instances.json"),
    ("image_id a string", _result_set(3, "image_id", "1"), RESULT3 + "image_id '1' is not the id of one of"),
    ("unknown category_id", _result_set(3, "category_id", 99),
     RESULT3 + "category_id 99 is not the id of one of the categories in .*instances.json"),
    ("category_id a float", _result_set(3, "category_id", 1.0), RESULT3 + "category_id 1.0 is not the id"),
    ("an entry that is a list", lambda results: results.__setitem__(3, [1, 1, [0, 0, 1, 1], 0.5]),
     RESULT3 + r"must be an object with image_id, category_id, bbox, score, not \[1, 1, \[0, 0, 1, 1\], 0.5\]"),
]


@pytest.mark.parametrize("case, mutate, message", RESULTS, ids=[case for case, _, _ in RESULTS])
def test_broken_results_are_named_with_their_entry(tmp_path, case, mutate, message):
    gt, annotations = _coco_gt(tmp_path)
    results = _jittered_results(annotations)
    mutate(results)
    with pytest.raises(InputError) as error:
        eval_detection.score_detections(gt, results, "coco")
    assert re.match(message, str(error.value)), str(error.value)
    path = tmp_path / "results.json"  # from a file: its path instead of "detection results"
    path.write_text(json.dumps(results))
    with pytest.raises(InputError) as error:
        eval_detection.score_detections(gt, path, "coco")
    assert re.match(message.replace("detection results", "detection results " + re.escape(str(path))),
                    str(error.value)), str(error.value)


def test_a_results_file_that_is_not_a_list_is_named(tmp_path):
    gt, _ = _coco_gt(tmp_path)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"image_id": 1}))
    with pytest.raises(InputError, match=f"detection results {re.escape(str(path))}: a COCO results file is a JSON"):
        eval_detection.score_detections(gt, path, "coco")


def test_empty_result_boxes_are_scored_as_pycocotools_scores_them(tmp_path):
    """w = 0 or h = 0 is allowed: both evaluators count such a box as a false positive. A negative w is refused:
    its area is negative, so it falls in no area range and is neither a hit nor a false positive, yet it still takes
    one of the image's detection slots (here AR@1 drops)."""
    gt, annotations = _coco_gt(tmp_path)
    results = _jittered_results(annotations)
    high = {"image_id": 1, "category_id": 1, "score": 0.99}
    empty = results + [{**high, "bbox": [10, 10, 0, 30]}, {**high, "bbox": [60, 60, 5, 0]}]
    reference = _pycocotools(gt, empty)
    ours = eval_detection.score_detections(gt, empty, "coco")
    assert [ours[k] for k in ("AP", "AP50", "AP75", "APs", "APm")] == pytest.approx(list(reference[:5]), abs=1e-9)
    assert ours["AP"] < eval_detection.score_detections(gt, results, "coco")["AP"]  # they count, as misses
    negative = results + [{**high, "bbox": [10, 10, -5, 30]}]
    with_negative, without = _pycocotools(gt, negative), _pycocotools(gt, results)
    assert list(with_negative[:6]) == pytest.approx(list(without[:6])) and with_negative[6] < without[6]


# ---------------------------------------------------------------- grounding JSONL
GOOD = {"image": "a.png", "caption": "a red star above a blue circle",
        "phrases": [{"text": "red star", "span": [2, 10], "boxes": [[0, 0, 10, 10]]},
                    {"text": "blue circle", "span": [19, 30], "boxes": []}]}


def _phrase(**fields):
    """GOOD with its first phrase changed by `fields` (a value of None removes the field)."""
    record = copy.deepcopy(GOOD)
    record["phrases"][0].update(fields)
    record["phrases"][0] = {k: v for k, v in record["phrases"][0].items() if v is not None}
    return record


P0 = r"phrases\[0\]: "
GROUNDING = [  # (case, the bad record or line, the message after "PATH:2: not a grounding record (")
    ("phrases a string", {**GOOD, "phrases": "red star"},
     "'phrases' must be a list of phrase objects, not 'red star'"),
    ("a phrase that is a string", {**GOOD, "phrases": ["red star"]}, P0 + "must be an object .*not 'red star'"),
    ("a phrase without text", _phrase(text=None), P0 + "'text' must be a non-empty string, not missing"),
    ("a phrase without a span", _phrase(span=None), P0 + r"'span' of 'red star': missing is not \[start, end\]"),
    ("a span outside the caption", _phrase(span=[2, 40]),
     P0 + r"'span' of 'red star': 2:40 is outside the caption \(0:30\) or empty"),
    ("a reversed span", _phrase(span=[10, 2]), P0 + "'span' of 'red star': 10:2 is outside the caption"),
    ("a span of floats", _phrase(span=[2.0, 10.0]),
     P0 + r"'span' of 'red star': \[2.0, 10.0\] is not \[start, end\], two integers"),
    ("a span of 3 numbers", _phrase(span=[2, 5, 10]), P0 + r"'span' of 'red star': \[2, 5, 10\] is not \[start"),
    ("spans not a list", _phrase(spans="2:10"),
     P0 + "'spans' must be a list of \\[start, end\\] character offsets, not '2:10'"),
    ("a piece of spans not a pair", _phrase(spans=[[2, 5], [6]]), P0 + r"'spans' of 'red star': \[6\] is not"),
    ("a span of other words", _phrase(span=[1, 9]), P0 + "span 1:9 is not 'red star' but ' red sta'"),
    ("a box of 3 numbers", _phrase(boxes=[[0, 0, 10]]),
     P0 + r"boxes\[0\] of 'red star' must be \[x0, y0, x1, y1\], 4 finite numbers, not \[0, 0, 10\]"),
    ("a box with x1 < x0", _phrase(boxes=[[0, 0, 10, 10], [10, 0, 5, 10]]),
     P0 + r"boxes\[1\] of 'red star' \[10, 0, 5, 10\] has width -5; \[x0, y0, x1, y1\] needs x1 - x0 > 0"),
    ("a box of no height", _phrase(boxes=[[0, 5, 10, 5]]), P0 + r"boxes\[0\] of 'red star' .* has height 0"),
    ("a box with NaN", _phrase(boxes=[[0, 0, float("nan"), 10]]), P0 + r"boxes\[0\] of 'red star' must be"),
    ("a box given as a string", _phrase(boxes=["0 0 10 10"]), P0 + r"boxes\[0\] of 'red star' must be .*'0 0 10"),
    ("boxes not a list", _phrase(boxes={"x0": 0}), P0 + "'boxes' of 'red star' must be a list of"),
    ("a phrase type that is a list", _phrase(type=["people"]), P0 + r"'type' of 'red star' must be a string"),
    ("no image", {k: v for k, v in GOOD.items() if k != "image"}, "'image' must be a non-empty string, not missing"),
    ("an empty image", {**GOOD, "image": ""}, "'image' must be a non-empty string, not ''"),
    ("no caption", {k: v for k, v in GOOD.items() if k != "caption"}, "'caption' must be a non-empty string"),
    ("a line that is a list", [GOOD], r"a line must be a JSON object, not \[\{"),
    ("a line that is not JSON", "{'image': 'a.png'}", "Expecting property name"),
]


def _grounding_readers():
    """Every reader of grounding JSONL: evaluation, training and pseudo-labelling read through `read_records`."""
    from ovdense.engine.glip_train import grounding_items
    return [data_grounding.read_records, eval_grounding.read_grounding, grounding_items]


@pytest.mark.parametrize("case, bad, message", GROUNDING, ids=[case for case, _, _ in GROUNDING])
def test_broken_grounding_records_are_named_with_their_line(tmp_path, case, bad, message):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    for read in _grounding_readers():
        with pytest.raises(InputError) as error:
            read(path)
        assert re.fullmatch(re.escape(f"{path}:2: not a grounding record (") + message + r".*\)",
                            str(error.value)), str(error.value)


def test_grounding_images_are_checked_when_asked(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "image": "b.png"}) + "\n")
    (tmp_path / "a.png").write_bytes(b"")
    assert len(data_grounding.read_records(path)) == 2  # training reads lazily: no check by default
    for read in (data_grounding.read_records, eval_grounding.read_grounding):
        with pytest.raises(InputError, match=re.escape(f"{path}:2: the image {tmp_path / 'b.png'} does not exist")):
            read(path, check_images=True)
    (tmp_path / "b.png").write_bytes(b"")
    records, groups = eval_grounding.read_grounding(path, check_images=True)
    assert [r["image"] for r in records] == [tmp_path / "a.png", tmp_path / "b.png"] and groups == {}


def test_clean_grounding_records_read_as_before(tmp_path):
    path = tmp_path / "g.jsonl"
    caption_only = {"image": "c.png", "caption": "a heart"}  # a captions file: phrases come from a chunker later
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(caption_only) + "\n")
    first, second = data_grounding.read_records(path)
    assert first["image"] == tmp_path / "a.png" and first["caption"] == GOOD["caption"]
    assert [(p["text"], p["spans"], p["boxes"]) for p in first["phrases"]] == [
        ("red star", [(2, 10)], [[0, 0, 10, 10]]), ("blue circle", [(19, 30)], [])]
    assert second == {"image": tmp_path / "c.png", "caption": "a heart"}


def test_mdetr_conversion_leaves_out_empty_boxes_as_mdetr_does(tmp_path):
    caption = "A man holds a kite."
    mdetr = {"images": [{"id": 7, "file_name": "1.jpg", "caption": caption, "height": 50, "width": 80}],
             "annotations": [{"image_id": 7, "bbox": [1, 2, 10, 20], "tokens_positive": [[0, 5]]},
                             {"image_id": 7, "bbox": [30, 5, 0, 5], "tokens_positive": [[0, 5]]},
                             {"image_id": 7, "bbox": [40, 5, 5, 0], "tokens_positive": [[12, 18]]}]}
    (tmp_path / "mdetr.json").write_text(json.dumps(mdetr))
    assert data_grounding.mdetr_to_jsonl(tmp_path / "mdetr.json", tmp_path, tmp_path / "out.jsonl") == 1
    (record,) = data_grounding.read_records(tmp_path / "out.jsonl")
    assert [(p["text"], p["boxes"]) for p in record["phrases"]] == [("A man", [[1, 2, 11, 22]])]


def test_a_broken_world_description_is_named(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    (tmp_path / "world.json").write_text(json.dumps({"base": ["star"]}))
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "world.json")) + ": not the synthetic world"):
        eval_grounding.read_grounding(path)


# ---------------------------------------------------------------- tables
COCO_METRICS = {"AP": 40.2171, "AP50": 61.0934, "AP75": 43.886, "APs": 24.1714, "APm": 43.474, "APl": float("nan"),
                "AR": 55.5, "AP-person": 54.997, "AP-bicycle": 30.93, "AP-traffic light": 100.0, "AP-cat": 0.0}
COCO_TABLE = """\
Evaluation results for bbox:
|   AP   |  AP50  |  AP75  |  APs   |  APm   |  APl  |   AR   |
|:------:|:------:|:------:|:------:|:------:|:-----:|:------:|
| 40.217 | 61.093 | 43.886 | 24.171 | 43.474 |  nan  | 55.500 |
Some metrics cannot be computed and are shown as nan (no ground truth of that kind).
Per-category bbox AP:
| category   | AP     | category   | AP     | category      | AP      |
|:-----------|:-------|:-----------|:-------|:--------------|:--------|
| person     | 54.997 | bicycle    | 30.930 | traffic light | 100.000 |
| cat        | 0.000  |            |        |               |         |"""
OV_METRICS = {"AP50": 50.099, "AP50_base": 70.297, "AP50_novel": 40.0, "AP50-cat": 70.297, "AP50-dog": 80.0,
              "AP50-person": 0.0}
OV_TABLE = """\
Open-vocabulary AP50 (base / novel / all categories):
|  AP50 base  |  AP50 novel  |  AP50 all  |
|:-----------:|:------------:|:----------:|
|   70.297    |    40.000    |   50.099   |
Per-category bbox AP50:
| category   | AP50   | category   | AP50   | category   | AP50   |
|:-----------|:-------|:-----------|:-------|:-----------|:-------|
| cat        | 70.297 | dog        | 80.000 | person     | 0.000  |"""
LVIS_METRICS = {"AP": 30.0, "AP50": 50.0, "AP75": 31.25, "APs": 20.0, "APm": 35.0, "APl": 45.0, "APr": 10.0,
                "APc": 25.0, "APf": 40.0, "AR": 48.125, "AP-cat": 1.0, "AP-dog": 2.0}
LVIS_TABLE = """\
Evaluation results for bbox:
|   AP   |  AP50  |  AP75  |  APs   |  APm   |  APl   |  APr   |  APc   |  APf   |   AR   |
|:------:|:------:|:------:|:------:|:------:|:------:|:------:|:------:|:------:|:------:|
| 30.000 | 50.000 | 31.250 | 20.000 | 35.000 | 45.000 | 10.000 | 25.000 | 40.000 | 48.125 |"""


@pytest.mark.parametrize("metrics, protocol, table", [(COCO_METRICS, "coco", COCO_TABLE),
                                                      (OV_METRICS, "ov-coco", OV_TABLE),
                                                      (LVIS_METRICS, "lvis", LVIS_TABLE)])
def test_detection_tables_are_detectron2s(metrics, protocol, table):
    """Tables as detectron2's create_small_table and per-category tabulate calls print them (checked once against
    tabulate 0.10: byte-equal); LVIS: the summary only, as detectron2's LVISEvaluator."""
    assert eval_detection.format_detection_metrics(metrics, protocol) == table


def test_the_table_of_real_metrics_lists_every_category(tmp_path):
    gt, annotations = _coco_gt(tmp_path)
    metrics = eval_detection.score_detections(gt, _jittered_results(annotations), "coco")
    lines = eval_detection.format_detection_metrics(metrics, "coco").splitlines()
    assert [cell.strip() for cell in lines[3].split("|")[1:-1]] == [
        "nan" if k == "APl" else f"{metrics[k]:.3f}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR")]
    assert lines[-1] == (f"| cat        | {metrics['AP-cat']:.3f} | dog        | {metrics['AP-dog']:.3f} "
                         f"| person     | {metrics['AP-person']:.3f} |")


def test_grounding_table():
    metrics = {"R@1": 100 / 3, "R@5": 100 / 3, "R@10": 200 / 3, "R@any": 200 / 3, "phrases": 3,
               "R@1_base": 50.0, "R@5_base": 50.0, "R@10_base": 100.0, "R@any_base": 100.0, "phrases_base": 2,
               "R@1_novel": 0.0, "R@5_novel": 0.0, "R@10_novel": 0.0, "R@any_novel": 0.0, "phrases_novel": 1}
    assert eval_grounding.format_grounding_metrics(metrics) == """\
Phrase grounding recall (%):
| group   | phrases   | R@1    | R@5    | R@10    | R@any   |
|:--------|:----------|:-------|:-------|:--------|:--------|
| all     | 3         | 33.333 | 33.333 | 66.667  | 66.667  |
| base    | 2         | 50.000 | 50.000 | 100.000 | 100.000 |
| novel   | 1         | 0.000  | 0.000  | 0.000   | 0.000   |"""
