"""`ovdense detect`: boxes for free-text classes (RegionCLIP, or GLIP with the classes as one prompt)."""
from __future__ import annotations

from pathlib import Path

from .build import build_detection_predictor
from .inputs import check_threshold, each_image, images, vocabulary
from .options import add_classes, add_detector_options, add_images, add_output_folder, command_parser


def add_parser(sub):
    parser = command_parser(sub, "detect", "detect free-text classes in images (boxes)")
    add_images(parser)
    add_classes(parser, "heart, red star; star")
    parser.add_argument("--threshold", type=float, default=0.3, help="keep boxes scoring above this")
    add_output_folder(parser, "detect", "<stem>_boxes.png and <stem>.json")
    add_detector_options(parser)
    return parser


def run(args) -> int:
    from ..visualize import score_text
    check_threshold(args.threshold)
    words = vocabulary(args)
    out_dir, paths, failed = images(args)
    if not paths:
        return 1
    # RegionCLIP's score threshold is the --threshold itself; GLIP keeps its pre-NMS one (on a phrase's score before
    # centerness) and --threshold filters the final scores
    predictor, described = build_detection_predictor(
        args, score_threshold=args.threshold if args.method == "regionclip" else None)

    def detect(path: Path, stem: str) -> str:
        result = predictor(path, words).above(args.threshold)  # soft-NMS may decay scores under it
        result.save(out_dir, stem, metadata={"image": str(path), **described, "threshold": args.threshold})
        found = ", ".join(f"{d['label']} {score_text(d['score'])}" for d in result.to_list()[:8])
        more = f" (+{len(result) - 8} more)" if len(result) > 8 else ""
        return f"{path}: {len(result)} boxes{': ' + found if found else ''}{more} -> {out_dir / stem}_boxes.png"
    return each_image(paths, failed, out_dir, "detect", args.quiet, detect)
