"""Detection evaluation: agreement with pycocotools, the OV-COCO split, LVIS's federated rules, the dataset reader."""
import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovdense.data.detection import OV_COCO_BASE, OV_COCO_NOVEL, DetectionDataset
from ovdense.detection.structures import DetectionResult
from ovdense.errors import InputError, UsageError
from ovdense.eval import default_protocol, evaluate_detection, score_detections
from ovdense.eval.detection import DEFAULT_EVALUATOR


def _write(tmp_path, images, annotations, categories, name="instances.json"):
    path = tmp_path / name
    annotations = [{"id": k + 1, "iscrowd": 0, "area": a["bbox"][2] * a["bbox"][3], **a}
                   for k, a in enumerate(annotations)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def _coco_gt(tmp_path, **category_fields):
    """4 images, 3 classes; image 2 has a crowd cat, image 3 no cat, image 4 no cat or dog."""
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in (1, 2, 3, 4)]
    annotations = [
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30]},
        {"image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 40]},
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50]},
        {"image_id": 2, "category_id": 1, "bbox": [55, 55, 40, 40], "iscrowd": 1},
        {"image_id": 2, "category_id": 3, "bbox": [5, 60, 20, 30]},
        {"image_id": 3, "category_id": 2, "bbox": [20, 20, 60, 60]},
        {"image_id": 4, "category_id": 3, "bbox": [10, 10, 20, 20]},
        {"image_id": 4, "category_id": 3, "bbox": [40, 40, 20, 20]},
    ]
    categories = [{"id": c, "name": n, **category_fields.get(n, {})}
                  for c, n in ((1, "cat"), (2, "dog"), (3, "person"))]
    return _write(tmp_path, images, annotations, categories), annotations


def _jittered_results(annotations, seed=0):
    """Two jittered copies of each non-crowd box, one on the crowd box, and random false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for a in annotations:
        for _ in range(1 if a.get("iscrowd") else 2):
            box = np.array(a["bbox"], float) + rng.normal(0, 3, 4)
            results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                            "bbox": box.round(2).tolist(), "score": float(rng.uniform(0.2, 1))})
    for _ in range(20):
        xy, wh = rng.uniform(0, 60, 2), rng.uniform(5, 40, 2)
        results.append({"image_id": int(rng.integers(1, 5)), "category_id": int(rng.integers(1, 4)),
                        "bbox": np.concatenate([xy, wh]).round(2).tolist(), "score": float(rng.uniform(0, 0.9))})
    return results


def _pycocotools(gt_path, results, category_ids=None) -> np.ndarray:
    """pycocotools' 12 bbox stats, in percent."""
    with redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        coco_eval = COCOeval(gt, gt.loadRes([dict(r) for r in results]), "bbox")
        if category_ids is not None:
            coco_eval.params.catIds = category_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return 100 * coco_eval.stats


@pytest.mark.skipif(DEFAULT_EVALUATOR == "pycocotools", reason="the default evaluator is pycocotools itself")
def test_default_evaluator_agrees_with_pycocotools(tmp_path):
    gt, annotations = _coco_gt(tmp_path)
    results = _jittered_results(annotations)
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    ours = score_detections(gt, results_file, "coco")
    reference = _pycocotools(gt, results)
    assert 0 < ours["AP"] < 100 and 0 < ours["AP50"] < 100 and 0 < ours["AR"] < 100
    for k, name in enumerate(("AP", "AP50", "AP75", "APs", "APm")):  # no large boxes: APl is NaN / -1
        assert ours[name] == pytest.approx(reference[k], abs=1e-6), name
    assert np.isnan(ours["APl"]) and reference[5] == -100
    assert ours["AR"] == pytest.approx(reference[8], abs=1e-6)  # AR@100, as detectron2's "AR"
    for category_id, name in ((1, "cat"), (2, "dog"), (3, "person")):  # detectron2's 'AP-<name>'
        assert ours[f"AP-{name}"] == pytest.approx(_pycocotools(gt, results, [category_id])[0], abs=1e-6)
    assert list(ours) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR", "AP-cat", "AP-dog", "AP-person"]
    assert score_detections(gt, results, "coco", evaluator="pycocotools") == pytest.approx(ours, abs=1e-6, nan_ok=True)


def test_ov_coco_split_is_the_mean_of_per_class_ap50(tmp_path):
    gt, annotations = _coco_gt(tmp_path, cat={"split": "base"}, dog={"split": "novel"}, person={"split": "novel"})
    assert default_protocol(DetectionDataset(gt)) == "ov-coco"
    results = _jittered_results(annotations, seed=1)
    per_class = {c: _pycocotools(gt, results, [c])[1] for c in (1, 2, 3)}
    ours = score_detections(gt, results, "ov-coco")
    assert ours["AP50_base"] == pytest.approx(per_class[1], abs=1e-6)
    assert ours["AP50_novel"] == pytest.approx((per_class[2] + per_class[3]) / 2, abs=1e-6)
    assert ours["AP50"] == pytest.approx(sum(per_class.values()) / 3, abs=1e-6)
    assert [ours[f"AP50-{n}"] for n in ("cat", "dog", "person")] == pytest.approx(list(per_class.values()), abs=1e-6)
    # perfect cats and dogs, no person detected: base 100, novel (100 + 0) / 2
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in annotations if a["category_id"] != 3 and not a.get("iscrowd")]
    assert score_detections(gt, perfect, "ov-coco") == pytest.approx(
        {"AP50": 200 / 3, "AP50_base": 100.0, "AP50_novel": 50.0, "AP50-cat": 100.0, "AP50-dog": 100.0,
         "AP50-person": 0.0})
    assert score_detections(gt, [], "ov-coco") == {"AP50": 0.0, "AP50_base": 0.0, "AP50_novel": 0.0,
                                                   "AP50-cat": 0.0, "AP50-dog": 0.0, "AP50-person": 0.0}


def _lvis_gt(tmp_path):
    """Image 1: class 1 (rare) at A and class 3 (frequent, not exhaustive) at C, class 2 negative; image 2: class 2
    (common) at B and class 4 (frequent) at D, class 1 negative."""
    images = [{"id": 1, "coco_url": "http://images.cocodataset.org/val2017/000000000001.jpg", "width": 100,
               "height": 100, "neg_category_ids": [2], "not_exhaustive_category_ids": [3]},
              {"id": 2, "coco_url": "http://images.cocodataset.org/val2017/000000000002.jpg", "width": 100,
               "height": 100, "neg_category_ids": [1], "not_exhaustive_category_ids": []}]
    annotations = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]},
                   {"image_id": 1, "category_id": 3, "bbox": [50, 50, 20, 20]},
                   {"image_id": 2, "category_id": 2, "bbox": [10, 10, 30, 30]},
                   {"image_id": 2, "category_id": 4, "bbox": [50, 50, 30, 30]}]
    categories = [{"id": c, "name": n, "frequency": f, "synonyms": [n]}
                  for c, n, f in ((1, "baseball_bat", "r"), (2, "bow_(weapon)", "c"), (3, "cat", "f"), (4, "dog", "f"))]
    return _write(tmp_path, images, annotations, categories, "lvis_v1_val.json"), annotations


def test_lvis_federated_rules(tmp_path):
    gt, annotations = _lvis_gt(tmp_path)
    dataset = DetectionDataset(gt, tmp_path)
    assert dataset.is_lvis and default_protocol(dataset) == "lvis"
    assert dataset.vocabulary.names == ["baseball bat", "bow (weapon)", "cat", "dog"]
    assert dataset[0][0] == tmp_path / "val2017" / "000000000001.jpg"
    assert dataset.category_split == {1: "novel", 2: "base", 3: "base", 4: "base"}
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.8}
               for a in annotations]

    def with_false_positive(category_id):
        return perfect + [{"image_id": 1, "category_id": category_id, "bbox": [0, 0, 5, 5], "score": 0.99}]

    def summary(metrics):  # every box is small (< 32 x 32): APm, APl have no ground truth
        assert np.isnan(metrics.pop("APm")) and np.isnan(metrics.pop("APl"))
        return metrics

    all_100 = dict.fromkeys(("AP", "AP50", "AP75", "APs", "APr", "APc", "APf", "AR", "AP-baseball bat",
                             "AP-bow (weapon)", "AP-cat", "AP-dog"), 100.0)
    assert summary(score_detections(dataset, perfect, "lvis")) == all_100
    assert summary(score_detections(dataset, with_false_positive(4), "lvis")) == all_100  # neither pos. nor neg.
    assert summary(score_detections(dataset, with_false_positive(3), "lvis")) == all_100  # not exhaustive: ignored
    negative = score_detections(dataset, with_false_positive(2), "lvis")  # in neg_category_ids: counts
    assert negative["APc"] == pytest.approx(50.0) and negative["AP"] == pytest.approx(87.5)
    assert score_detections(dataset, with_false_positive(1), "lvis")["APr"] == pytest.approx(50.0)


def test_lvis_summary_equals_faster_coco_evals_own(tmp_path):
    """APs / APm / APl and AR (AR@300) on LVIS: the numbers faster-coco-eval's own LVIS summary prints."""
    import faster_coco_eval
    images = [{"id": i, "coco_url": f"http://x/val2017/{i:012d}.jpg", "width": 200, "height": 200,
               "neg_category_ids": [3], "not_exhaustive_category_ids": []} for i in (1, 2, 3)]
    sizes = (20, 50, 120)  # small, medium, large
    annotations = [{"image_id": i, "category_id": 1 + (i + k) % 2, "bbox": [5 + 30 * k, 10, size, size]}
                   for i in (1, 2, 3) for k, size in enumerate(sizes)]
    categories = [{"id": c, "name": f"thing_{c}", "frequency": f} for c, f in ((1, "r"), (2, "c"), (3, "f"))]
    gt = _write(tmp_path, images, annotations, categories, "lvis_v1_val.json")
    results = [r for r in _jittered_results(json.loads(gt.read_text())["annotations"], seed=2) if r["image_id"] <= 3]
    ours = score_detections(gt, results, "lvis")
    with redirect_stdout(io.StringIO()):
        reference = faster_coco_eval.COCO(str(gt))
        coco_eval = faster_coco_eval.COCOeval_faster(reference, reference.loadRes([dict(r) for r in results]), "bbox",
                                                     lvis_style=True, print_function=lambda *args: None)
        coco_eval.params.maxDets = [300]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = coco_eval.stats_as_dict
    names = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium",
             "APl": "AP_large", "APr": "APr", "APc": "APc", "AR": "AR_all"}
    assert 0 < ours["AR"] < 100 and 0 < ours["APl"] < 100
    assert {k: ours[k] for k in names} == pytest.approx({k: 100 * stats[v] for k, v in names.items()}, abs=1e-6)


def test_lvis_300_per_image_and_fixed_ap(tmp_path):
    gt, annotations = _lvis_gt(tmp_path)
    # image 1: 300 better-scored (ignored) detections of class 3, then the only true positive, of class 1
    results = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5 + k / 1000} for k in range(300)]
    results.append({"image_id": 1, "category_id": 1, "bbox": annotations[0]["bbox"], "score": 0.1})
    capped = score_detections(gt, results, "lvis")
    fixed = score_detections(gt, results, "lvis", fixed_ap=True)
    assert capped["APr"] == 0.0 and fixed["APr"] == 100.0
    with pytest.raises(UsageError, match="LVIS"):
        score_detections(gt, results, "coco", fixed_ap=True)
    with pytest.raises(UsageError, match="faster-coco-eval"):
        score_detections(gt, results, "lvis", evaluator="pycocotools")


def test_dataset_reads_the_synthetic_export(tmp_path):
    from ovdense.data.export import export_world
    from ovdense.data.synthetic import SyntheticWorld
    world = SyntheticWorld()
    export_world(world, tmp_path, {"train": 3, "val": 3}, progress=False)
    dataset = DetectionDataset(tmp_path / "instances_val.json")
    assert len(dataset) == 3 and all(path.is_file() for path, _ in dataset.items)
    assert [image_id for _, image_id in dataset.items] == [1, 2, 3]
    assert dataset.vocabulary.names == list(world.things) and len(dataset.category_ids) == len(world.things)
    assert {dataset.vocabulary.names[k] for k, c in enumerate(dataset.category_ids)
            if dataset.category_split[c] == "novel"} == set(world.novel)
    assert not dataset.is_lvis and default_protocol(dataset) == "ov-coco"


def test_coco_names_get_the_ovr_cnn_split(tmp_path):
    names = list(OV_COCO_BASE + OV_COCO_NOVEL) + ["traffic light"]
    gt = _write(tmp_path, [{"id": 1, "file_name": "1.jpg", "width": 10, "height": 10}], [],
                [{"id": k + 1, "name": n} for k, n in enumerate(names)])
    split = DetectionDataset(gt).category_split
    assert len(split) == 65 and sorted(split.values()).count("novel") == 17 and len(names) not in split


class _GroundTruthPredictor:
    """Returns an image's ground-truth boxes as detections: a stand-in detector."""

    device = torch.device("cpu")

    def __init__(self, dataset):
        self.dataset = dataset
        self.calls = []

    def __call__(self, image, vocabulary):
        image_id = dict(self.dataset.items)[image]
        self.calls.append(image_id)
        anns = self.dataset.coco.imgToAnns[image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]).reshape(-1, 4)
        labels = torch.tensor([self.dataset.category_ids.index(a["category_id"]) for a in anns], dtype=torch.long)
        return DetectionResult(boxes, torch.ones(len(anns)), labels, vocabulary.names, (96, 96))


def test_evaluate_detection_loop(tmp_path):
    from ovdense.data.export import export_world
    from ovdense.data.synthetic import SyntheticWorld
    export_world(SyntheticWorld(), tmp_path, {"val": 3}, progress=False)
    dataset = DetectionDataset(tmp_path / "instances_val.json")
    predictor = _GroundTruthPredictor(dataset)
    metrics = evaluate_detection(predictor, dataset, limit=2, progress=False, results_path=tmp_path / "out/res.json")
    assert predictor.calls == [1, 2] and metrics["AP50"] == pytest.approx(100.0)  # scored on those 2 images only
    written = json.loads((tmp_path / "out/res.json").read_text())
    assert {r["image_id"] for r in written} == {1, 2}
    assert score_detections(dataset, written, "coco", image_ids=[1, 2])["AP"] == pytest.approx(100.0)


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(InputError, match="nothing.json") as error:
        DetectionDataset(tmp_path / "nothing.json")
    assert isinstance(error.value, FileNotFoundError)
    (tmp_path / "text.json").write_text("not json")
    with pytest.raises(InputError, match="text.json.*JSON"):
        DetectionDataset(tmp_path / "text.json")
    (tmp_path / "no_images.json").write_text(json.dumps({"annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(InputError, match="no_images.json.*'images'"):
        DetectionDataset(tmp_path / "no_images.json")
    gt, annotations = _coco_gt(tmp_path)
    with pytest.raises(InputError, match="nowhere"):
        DetectionDataset(gt, tmp_path / "nowhere")
    good = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}
    with pytest.raises(InputError, match="category_id 99"):
        score_detections(gt, [good, {**good, "category_id": 99}], "coco")
    with pytest.raises(InputError, match="image_id 7"):
        score_detections(gt, [{**good, "image_id": 7}], "coco")
    with pytest.raises(InputError, match="bbox"):
        score_detections(gt, [{**good, "bbox": [1, 2]}], "coco")
    with pytest.raises(InputError, match="ov-coco"):
        score_detections(gt, [good], "ov-coco")  # no base / novel split
    with pytest.raises(UsageError, match="protocol"):
        score_detections(gt, [good], "voc")
