"""`ovdense pseudo-label`: a teacher GLIP grounds captions' phrases; its confident boxes become grounding data for
a student (GLIP's self-training)."""
from __future__ import annotations

from ..catalog import CHUNKERS
from .build import build_detection_predictor
from .inputs import check_threshold
from .options import add_detector_options, command_parser


def add_parser(sub):
    parser = command_parser(sub, "pseudo-label", "ground captions with a teacher GLIP and write its boxes as "
                                                 "grounding data (self-training)")
    parser.add_argument("captions", help="a grounding JSONL (its phrase spans are used) or a captions JSONL ({image, "
                                         "caption}: phrases by --chunker)")
    parser.add_argument("--output", required=True, help="the grounding JSONL to write (images relative to it)")
    parser.add_argument("--threshold", type=float, default=0.5, help="keep boxes scoring above this; a caption with "
                                                                     "none is dropped")
    parser.add_argument("--skip-boxed", action="store_true", help="leave out captions whose phrases all have boxes")
    parser.add_argument("--chunker", choices=CHUNKERS, default="auto", help="noun phrases of plain captions")
    add_detector_options(parser, methods=("glip",))
    return parser


def run(args) -> int:
    from ..engine.glip_train import pseudo_label
    from ..io import check_output_file
    check_threshold(args.threshold)
    check_output_file(args.output)
    predictor, _ = build_detection_predictor(args)
    counts = pseudo_label(predictor, args.captions, args.output, args.threshold, args.skip_boxed, args.chunker,
                          progress=not args.quiet)
    print(f"{counts['kept']} of {counts['captions']} captions kept with {counts['boxes']} boxes above "
          f"{args.threshold} -> {args.output}")
    return 0
