"""`ovdense eval`: mIoU of a segmenter on a standard dataset, AP of a detector on COCO / LVIS JSON, or phrase
grounding Recall@k; under torchrun every rank evaluates its share and rank 0 reports."""
from __future__ import annotations

import math

from ..catalog import DATASETS, DETECTION_METHODS, DETECTION_PRESETS, DETECTION_PROTOCOLS, METHODS
from ..errors import UsageError
from ..presets import PRESETS
from .build import build_detection_predictor, build_predictor, check_model_options, describe
from .options import add_model_options, command_parser


def add_parser(sub):
    parser = command_parser(sub, "eval", "mIoU of a segmenter on a standard dataset, or AP of a detector on COCO / "
                                         "LVIS JSON")
    parser.add_argument("--dataset", choices=DATASETS, help="segmentation: the dataset")
    parser.add_argument("--root", help="segmentation: dataset folder (see ovdense.data.datasets for layouts)")
    parser.add_argument("--annotations", help="detection: a COCO-format or LVIS v1 instances JSON")
    parser.add_argument("--images", help="detection: the image folder (default: the JSON's folder)")
    parser.add_argument("--grounding", help="grounding: a JSONL of captions with phrase spans and boxes (Recall@1/5/10, "
                                            "Flickr30k Entities' protocol)")
    parser.add_argument("--protocol", choices=DETECTION_PROTOCOLS, help="detection metrics (default: lvis for LVIS, "
                                                                        "ov-coco when the classes have a base/novel "
                                                                        "split)")
    parser.add_argument("--fixed-ap", action="store_true", help="LVIS: Fixed AP (10,000 per class, no per-image cap)")
    parser.add_argument("--results", help="detection: also write the COCO results JSON here")
    parser.add_argument("--split", default="val", help="the dataset's split (its list file, e.g. val.txt)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N images")
    parser.add_argument("--output", help="write the metrics as JSON to this file")
    add_model_options(parser, methods=METHODS + DETECTION_METHODS, presets=sorted(PRESETS) + list(DETECTION_PRESETS))
    return parser


def run(args) -> int:
    from ..io import check_output_file
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.annotations:
        return _detection(args)
    if args.grounding:
        return _grounding(args)
    if args.dataset is None or args.root is None:
        raise UsageError("give --dataset and --root (segmentation), --annotations (a COCO / LVIS JSON, detection) or "
                         "--grounding (a grounding JSONL)")
    if args.method in DETECTION_METHODS or args.preset in DETECTION_PRESETS:
        raise UsageError(f"{args.method if args.method in DETECTION_METHODS else args.preset} is for detection: "
                         "evaluate it with --annotations FILE")
    check_model_options(args, args.dataset)
    if args.output:
        check_output_file(args.output)
    from ..data import SegmentationDataset
    from ..eval import evaluate_segmentation, format_table
    dataset = SegmentationDataset(args.dataset, args.root, args.split)
    predictor = build_predictor(args, dataset=args.dataset)
    metrics = evaluate_segmentation(predictor, dataset, limit=args.limit, progress=not args.quiet)
    if not _reporting_rank():
        return 0
    print(format_table(metrics, dataset.vocabulary.names))
    _write_report(args.output, {"dataset": args.dataset, "split": args.split,
                                "images": min(len(dataset), args.limit or len(dataset)), **describe(predictor),
                                "metrics": metrics, "classes": dataset.vocabulary.names})
    return 0


def _detection(args) -> int:
    from ..io import check_output_file
    if args.method not in DETECTION_METHODS:
        raise UsageError(f"--annotations evaluates a detector: --method {' or '.join(DETECTION_METHODS)}, not "
                         f"{args.method}")
    if args.preset is not None and args.preset not in DETECTION_PRESETS:
        raise UsageError(f"--preset {args.preset} is a segmentation preset; detection has {', '.join(DETECTION_PRESETS)}")
    for option in ("output", "results"):
        if getattr(args, option):
            check_output_file(getattr(args, option), f"--{option}")
    from ..data.detection import DetectionDataset
    from ..eval.detection import check_protocol, default_protocol, evaluate_detection, format_detection_metrics
    dataset = DetectionDataset(args.annotations, args.images)
    protocol = args.protocol or default_protocol(dataset)
    check_protocol(dataset, protocol, args.fixed_ap)
    predictor, described = build_detection_predictor(args)
    if protocol == "lvis" and args.preset is None:
        predictor.protocol = predictor.protocol.updated(max_detections=300)
    metrics = evaluate_detection(predictor, dataset, protocol, limit=args.limit, progress=not args.quiet,
                                 fixed_ap=args.fixed_ap, results_path=args.results)
    if not _reporting_rank():
        return 0
    print(format_detection_metrics(metrics, protocol))
    _write_report(args.output, {"annotations": str(args.annotations),
                                "images": min(len(dataset), args.limit or len(dataset)), **described,
                                "metrics_protocol": protocol, "fixed_ap": args.fixed_ap, "metrics": metrics})
    return 0


def _grounding(args) -> int:
    from ..io import check_output_file
    if args.method != "glip":
        raise UsageError(f"--grounding evaluates phrase grounding: --method glip, not {args.method}")
    if args.output:
        check_output_file(args.output)
    from ..eval.grounding import evaluate_grounding, format_grounding_metrics, read_grounding
    read_grounding(args.grounding, check_images=True)  # a broken file or a missing image: an error before the model
    predictor, described = build_detection_predictor(args)
    metrics = evaluate_grounding(predictor, args.grounding, limit=args.limit, progress=not args.quiet)
    if not _reporting_rank():
        return 0
    print(format_grounding_metrics(metrics))
    _write_report(args.output, {"grounding": str(args.grounding), **described, "metrics": metrics})
    return 0


def _reporting_rank() -> bool:
    """After an evaluation under torchrun (every rank holds the gathered metrics): the process group is closed, and
    True on rank 0, which reports; True without torchrun."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return True
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rank == 0


def _finite(value):
    """JSON has no NaN (a class absent from the data has no IoU): null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return [_finite(v) for v in value] if isinstance(value, (list, tuple)) else value


def _write_report(path, report: dict) -> None:
    """The metrics as JSON at `path` (atomically; nothing without a path)."""
    import json

    from ..io import write_text_atomic
    if path:
        write_text_atomic(path, json.dumps(_finite(report), indent=2, allow_nan=False))
        print(f"wrote {path}")
