"""Detection metrics on COCO-format annotations (COCO, OV-COCO, LVIS v1), and the evaluation loop over a dataset.

Protocols (metrics in percent; NaN for a group of categories with no ground truth):
  coco     AP, AP50, AP75, APs, APm, APl over every category, 100 detections per image and category (COCOeval), and
           AR (COCO's AR@100: recall over IoUs 0.5:0.95 and categories).
  ov-coco  AP50 over the categories of the base / novel split (OVR-CNN's 65 on COCO), AP50_base, AP50_novel: the mean
           of the per-class AP50 (IoU 0.5, all areas, 100 detections) over the split's categories that have ground
           truth, as OVR-CNN and RegionCLIP compute them. Detections of other categories are not scored.
  lvis     AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR (lvis-api's AR@300) with LVIS v1's federated rules: a
           detection of category c in an image counts only if c is one of the image's annotated categories or in its
           `neg_category_ids`; an unmatched detection of a category in its `not_exhaustive_category_ids` is ignored;
           each image keeps its 300 best detections.
           fixed_ap=True (Dave et al. 2021, "Evaluating large-vocabulary detectors: the devil is in the details"):
           no per-image cap, each category keeps its 10,000 best detections over the whole dataset.
Each protocol adds one metric per scored category, as detectron2 does: 'AP-<name>' (coco, lvis) or 'AP50-<name>'
(ov-coco), in category-id order. `format_detection_metrics` prints them as detectron2's COCOEvaluator logs them.
Evaluators: 'faster-coco-eval' (the default, 'auto': a C++ COCOeval with LVIS's rules, about 5x faster than
pycocotools with the same numbers in benchmarks/bench_detection_eval.py, and equal to lvis-api on LVIS) and
'pycocotools' (the reference; it has no LVIS rules).
"""
from __future__ import annotations

import io
import json
from collections import defaultdict
from contextlib import nullcontext, redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.detection import DetectionDataset, box_problem, is_finite_number, is_int, shown
from ..distributed import init_distributed
from ..errors import InputError, UsageError
from ..io import check_output_file, write_text_atomic
from ..text import Vocabulary

PROTOCOLS = {  # the summary metrics
    "coco": ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR"),
    "ov-coco": ("AP50", "AP50_base", "AP50_novel"),
    "lvis": ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR"),
}
PER_CLASS = {"coco": "AP", "ov-coco": "AP50", "lvis": "AP"}  # the metric of each category: key '<metric>-<name>'
EVALUATORS = ("faster-coco-eval", "pycocotools")
DEFAULT_EVALUATOR = "faster-coco-eval"  # the faster of the two in benchmarks/bench_detection_eval.py
LVIS_DETS_PER_IMAGE = 300
FIXED_AP_DETS_PER_CLASS = 10_000
RESULT_KEYS = ("image_id", "category_id", "bbox", "score")


def default_protocol(dataset: DetectionDataset) -> str:
    """'lvis' for LVIS annotations, 'ov-coco' when the categories have a base / novel split, else 'coco'."""
    return "lvis" if dataset.is_lvis else "ov-coco" if dataset.category_split else "coco"


def scored_categories(dataset: DetectionDataset, protocol: str) -> tuple[list[int], Vocabulary]:
    """The category ids a protocol scores and the vocabulary of their names, in category-id order: those of the
    base / novel split for 'ov-coco', every category otherwise."""
    if protocol != "ov-coco":
        return dataset.category_ids, dataset.vocabulary
    kept = [k for k, c in enumerate(dataset.category_ids) if c in dataset.category_split]
    return [dataset.category_ids[k] for k in kept], Vocabulary(tuple(dataset.vocabulary.classes[k] for k in kept))


def score_detections(dataset_or_gt_json: DetectionDataset | str | Path, results: list[dict] | str | Path,
                     protocol: str, fixed_ap: bool = False, evaluator: str = "auto",
                     image_ids: list[int] | None = None) -> dict:
    """The protocol's metrics ({name: percent}: PROTOCOLS[protocol], then PER_CLASS[protocol] of each scored
    category) of COCO results [{'image_id', 'category_id', 'bbox': [x, y, w, h], 'score'}] (a list, or the path of a
    results JSON) against a DetectionDataset or an instances JSON.

    image_ids: score on these images only (default: all). No results give 0 for every metric. InputError naming the
    entry for results that are malformed (see `check_results`) or name images or categories the annotations lack.
    """
    dataset = (dataset_or_gt_json if isinstance(dataset_or_gt_json, DetectionDataset)
               else DetectionDataset(dataset_or_gt_json))
    check_protocol(dataset, protocol, fixed_ap)
    evaluator = DEFAULT_EVALUATOR if evaluator == "auto" else evaluator
    if evaluator not in EVALUATORS:
        raise UsageError(f"unknown evaluator {evaluator!r}; choose auto, {', '.join(EVALUATORS)}")
    if evaluator == "pycocotools" and protocol == "lvis":
        raise UsageError("pycocotools has no LVIS (federated) evaluation; use evaluator='faster-coco-eval'")
    source = f"detection results {results}" if isinstance(results, (str, Path)) else "detection results"
    results = _load_results(results) if isinstance(results, (str, Path)) else results
    check_results(results, dataset, source)
    if protocol == "lvis":
        results = (_top_k(results, "category_id", FIXED_AP_DETS_PER_CLASS) if fixed_ap
                   else _top_k(results, "image_id", LVIS_DETS_PER_IMAGE))
    category_ids, vocabulary = scored_categories(dataset, protocol)
    class_keys = tuple(f"{PER_CLASS[protocol]}-{name}" for name in vocabulary.names)
    if not results:
        return dict.fromkeys(PROTOCOLS[protocol] + class_keys, 0.0)
    max_dets = (FIXED_AP_DETS_PER_CLASS if fixed_ap else LVIS_DETS_PER_IMAGE) if protocol == "lvis" else None
    precision, recall = _evaluate(dataset, results, evaluator, category_ids, image_ids, max_dets, protocol == "lvis")
    iou = 0 if protocol == "ov-coco" else None  # AP50 or AP
    per_class = {key: _ap(precision, [k], iou=iou) for k, key in enumerate(class_keys)}
    everything = list(range(len(category_ids)))
    if protocol == "ov-coco":
        split = [dataset.category_split[c] for c in category_ids]
        return {"AP50": _ap(precision, everything, iou=0),
                "AP50_base": _ap(precision, [k for k, s in enumerate(split) if s == "base"], iou=0),
                "AP50_novel": _ap(precision, [k for k, s in enumerate(split) if s == "novel"], iou=0)} | per_class
    metrics = {"AP": _ap(precision, everything), "AP50": _ap(precision, everything, iou=0),
               "AP75": _ap(precision, everything, iou=5)}
    metrics |= {name: _ap(precision, everything, area=a) for a, name in enumerate(("APs", "APm", "APl"), 1)}
    if protocol == "lvis":
        frequency = [dataset.coco.cats[c]["frequency"] for c in category_ids]
        metrics |= {f"AP{f}": _ap(precision, [k for k, g in enumerate(frequency) if g == f]) for f in "rcf"}
    return metrics | {"AR": _mean_percent(recall[:, :, 0, -1])} | per_class


def check_protocol(dataset: DetectionDataset, protocol: str, fixed_ap: bool = False) -> None:
    """UsageError for an unknown protocol or fixed_ap outside LVIS; InputError when the dataset cannot be scored
    by it (LVIS without frequencies, OV-COCO without a base / novel split)."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"unknown detection protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if fixed_ap and protocol != "lvis":
        raise UsageError(f"Fixed AP is an LVIS protocol option; protocol {protocol!r} does not have it")
    if protocol == "lvis" and not all("frequency" in c for c in dataset.coco.dataset["categories"]):
        raise InputError(f"{dataset.path}: the lvis protocol needs LVIS v1 annotations, whose categories all have "
                         "a 'frequency' (r, c or f)")
    if protocol == "ov-coco" and set(dataset.category_split.values()) != {"base", "novel"}:
        raise InputError(f"{dataset.path}: the ov-coco protocol needs base and novel categories (a 'split' field "
                         "on each category, or COCO's category names); use protocol 'coco'")


def _load_results(path: str | Path) -> list[dict]:
    try:
        results = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise InputError(f"detection results {path}: not a readable JSON file ({reason})") from error
    if not isinstance(results, list):
        raise InputError(f"detection results {path}: a COCO results file is a JSON list of detections")
    return results


def check_results(results: list, dataset: DetectionDataset, source: str = "detection results") -> None:
    """InputError "SOURCE, entry [12]: ..." for the first entry of `results` that is not a COCO box result: an object
    with 'image_id' and 'category_id' (ids in the annotations), 'bbox' [x, y, w, h] (4 finite numbers, w and h >= 0)
    and 'score' (a finite number; not a string, not a bool).

    An empty box (w or h 0, e.g. one clipped to the image border) is allowed: pycocotools and faster-coco-eval score
    it as an unmatched detection. A negative w or h is not: its area is negative, so both evaluators leave it out of
    every area range without a word (neither a hit nor a false positive), while it still takes one of the image's
    max-detection slots.
    """
    for k, result in enumerate(results):
        problem = _result_problem(result, dataset)
        if problem:
            raise InputError(f"{source}, entry [{k}]: {problem}")


def _result_problem(result: object, dataset: DetectionDataset) -> str | None:
    """What is wrong with one detection result (see `check_results`), or None."""
    if not isinstance(result, dict):
        return f"must be an object with {', '.join(RESULT_KEYS)}, not {shown(result)}"
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        return f"has no {' / '.join(map(repr, missing))} (a COCO box result has {', '.join(RESULT_KEYS)})"
    for key, known, what in (("image_id", dataset.coco.imgs, "images"), ("category_id", dataset.coco.cats,
                                                                          "categories")):
        if not is_int(result[key]) or result[key] not in known:
            return f"{key} {shown(result[key])} is not the id of one of the {what} in {dataset.path}"
    problem = box_problem(result["bbox"], "xywh", empty_ok=True)
    if problem:
        return f"bbox {problem}"
    if not is_finite_number(result["score"]):
        return f"score must be a finite number, not {shown(result['score'])}"
    return None


def _top_k(results: list[dict], key: str, k: int) -> list[dict]:
    """The k best-scored results of each group sharing `key` (ties kept in list order, as lvis-api does)."""
    groups = defaultdict(list)
    for result in results:
        groups[result[key]].append(result)
    return [r for group in groups.values() for r in sorted(group, key=lambda r: -r["score"])[:k]]


def _evaluate(dataset: DetectionDataset, results: list[dict], evaluator: str, category_ids: list[int],
              image_ids: list[int] | None, max_dets: int | None, lvis: bool) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval's bbox precision (T=10 IoUs 0.5:0.95, R=101 recalls, K categories in `category_ids` order, A=4 areas
    all/small/medium/large, M max-detection settings; the last is used) and recall (T, K, A, M) arrays, -1 where a
    category has no ground truth. max_dets: the detections per image and category (default: COCO's 1, 10, 100)."""
    results = [dict(r) for r in results]  # the evaluators add keys to the entries
    with redirect_stdout(io.StringIO()):  # both print progress
        if evaluator == "pycocotools":
            from pycocotools.cocoeval import COCOeval
            coco_eval = COCOeval(dataset.coco, dataset.coco.loadRes(results), "bbox")
        else:
            import faster_coco_eval
            gt = faster_coco_eval.COCO(dataset.coco.dataset)
            coco_eval = faster_coco_eval.COCOeval_faster(gt, gt.loadRes(results), "bbox", lvis_style=lvis,
                                                         print_function=lambda *args: None)
        coco_eval.params.catIds = category_ids
        if image_ids is not None:
            coco_eval.params.imgIds = sorted(image_ids)
        if max_dets is not None:
            coco_eval.params.maxDets = [max_dets]
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval.eval["precision"], coco_eval.eval["recall"]


def _ap(precision: np.ndarray, classes: list[int], iou: int | None = None, area: int = 0) -> float:
    """Mean precision in percent over the recall thresholds and `classes` (indices into K) at IoU index `iou` (None:
    all ten), area index `area`, the last max-detection setting; -1 entries (no ground truth) skipped, NaN if none."""
    values = precision[:, :, classes, area, -1]  # (T, R, len(classes))
    return _mean_percent(values if iou is None else values[iou])


def _mean_percent(values: np.ndarray) -> float:
    """100 x the mean of the entries that are not -1 (COCOeval's "no ground truth"), NaN if none."""
    values = values[values > -1]
    return 100 * float(values.mean()) if values.size else float("nan")


def evaluate_detection(predictor, dataset: DetectionDataset, protocol: str | None = None, limit: int | None = None,
                       progress: bool = True, fixed_ap: bool = False, results_path: str | Path | None = None) -> dict:
    """The metrics of `protocol` (default: `default_protocol(dataset)`) of `predictor` on the first `limit` images
    (default: all) of `dataset`, scored on those images only.

    The predictor is called as `predictor(image_path, vocabulary) -> DetectionResult` with the protocol's categories
    (`scored_categories`). Under torchrun each rank takes every WORLD_SIZE-th image; the results are gathered to every
    rank, and each returns the same metrics. results_path: where rank 0 writes the COCO results JSON (atomically).
    """
    protocol = protocol or default_protocol(dataset)
    check_protocol(dataset, protocol, fixed_ap)
    if results_path is not None:
        check_output_file(results_path, "results_path")
    category_ids, vocabulary = scored_categories(dataset, protocol)
    rank, world = init_distributed()
    items = dataset.items[:limit]
    results = []
    for image, image_id in tqdm(items[rank::world], desc=f"eval {dataset.name}", disable=not progress or rank != 0,
                                unit="img"):
        results += predictor(image, vocabulary).coco_results(image_id, category_ids)
    if world > 1:
        gathered = [None] * world
        with torch.cuda.device(predictor.device) if predictor.device.type == "cuda" else nullcontext():
            dist.all_gather_object(gathered, results)
        results = sorted((r for part in gathered for r in part), key=lambda r: r["image_id"])  # one process's order
    if results_path is not None and rank == 0:
        write_text_atomic(results_path, json.dumps(results))
    return score_detections(dataset, results, protocol, fixed_ap, image_ids=[i for _, i in items])


def format_detection_metrics(metrics: dict, protocol: str) -> str:
    """The metrics of `score_detections` as detectron2's COCOEvaluator logs them: the summary table (coco, lvis; for
    ov-coco the AP50 of the base / novel / all categories), then, except for LVIS (whose 1203 categories stay in the
    metrics), the per-category AP (ov-coco: AP50) table in 3 column pairs, categories in category-id order."""
    if protocol == "ov-coco":
        parts = ["Open-vocabulary AP50 (base / novel / all categories):\n" + pipe_table(
            ["AP50 base", "AP50 novel", "AP50 all"], [[metrics[k] for k in ("AP50_base", "AP50_novel", "AP50")]],
            "center")]
    else:
        parts = ["Evaluation results for bbox:\n" + pipe_table(list(PROTOCOLS[protocol]),
                                                               [[metrics[k] for k in PROTOCOLS[protocol]]], "center")]
    if any(np.isnan(metrics[k]) for k in PROTOCOLS[protocol]):
        parts.append("Some metrics cannot be computed and are shown as nan (no ground truth of that kind).")
    prefix = f"{PER_CLASS[protocol]}-"
    per_class = [(k[len(prefix):], v) for k, v in metrics.items() if k.startswith(prefix)]
    if protocol != "lvis" and len(per_class) > 1:
        columns = min(3, len(per_class))
        rows = [sum(per_class[start:start + columns], ()) for start in range(0, len(per_class), columns)]
        parts.append(f"Per-category bbox {PER_CLASS[protocol]}:\n"
                     + pipe_table(["category", PER_CLASS[protocol]] * columns, rows, "left"))
    return "\n".join(parts)


def pipe_table(headers: list[str], rows: list[tuple | list], align: str) -> str:
    """A Markdown table as detectron2 logs one (tabulate's "pipe" format): floats with 3 decimals, a short row padded
    with empty cells, every column `align`ed ('left' or 'center') and at least 2 wider than its header."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row] + [""] * (len(headers) - len(row))
             for row in rows]
    widths = [max(len(h) + 2, *(len(row[c]) for row in cells)) for c, h in enumerate(headers)]
    spec = "^" if align == "center" else "<"
    rule = [(":" + "-" * w + ":") if align == "center" else (":" + "-" * (w + 1)) for w in widths]
    lines = ["| " + " | ".join(f"{h:{spec}{w}}" for h, w in zip(headers, widths)) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(f"{v:{spec}{w}}" for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)
