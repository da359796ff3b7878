"""`ovdense ground`: boxes for the phrases of a caption in each image (GLIP phrase grounding)."""
from __future__ import annotations

from pathlib import Path

from ..catalog import CHUNKERS
from ..errors import UsageError
from .build import build_detection_predictor
from .inputs import check_threshold, each_image, images
from .options import add_detector_options, add_images, add_output_folder, command_parser


def add_parser(sub):
    parser = command_parser(sub, "ground", "find the things a caption's phrases name (GLIP phrase grounding)")
    add_images(parser, glob_example="")
    parser.add_argument("--caption", required=True, help="a sentence, e.g. 'a red star left of a small blue circle'")
    parser.add_argument("--phrases", help="the caption's phrases to ground, separated by ';' (default: its noun "
                                          "phrases, by --chunker)")
    parser.add_argument("--chunker", choices=CHUNKERS, default="auto",
                        help="noun phrases by NLTK's tagger and GLIP's grammar (nltk, needs its data), ovdense's rules "
                             "(rules), or nltk when usable else rules (auto)")
    parser.add_argument("--threshold", type=float, default=0.3, help="keep boxes scoring above this")
    add_output_folder(parser, "ground", "<stem>_boxes.png and <stem>.json")
    add_detector_options(parser, methods=("glip",))
    return parser


def run(args) -> int:
    """<stem>_boxes.png and <stem>.json (per phrase its character spans and its boxes) for each image."""
    from ..detection.grounding import split_phrases
    from ..visualize import score_text
    check_threshold(args.threshold)
    if not args.caption.strip():
        raise UsageError("--caption is empty: give the sentence whose phrases to ground")
    phrases = None
    if args.phrases is not None:
        phrases = split_phrases(args.phrases)
        if not phrases:
            raise UsageError("--phrases is empty: give phrases of the caption separated by ';', or leave it out")
    out_dir, paths, failed = images(args)
    if not paths:
        return 1
    predictor, described = build_detection_predictor(args)  # GLIP's own pre-NMS threshold; --threshold after

    def ground(path: Path, stem: str) -> str:
        predictor.set_image(path)
        result = predictor.ground(args.caption, phrases, args.chunker).above(args.threshold)
        result.save(out_dir, stem, metadata={"image": str(path), **described, "threshold": args.threshold})
        found = "; ".join(f"{p['phrase']}: {len(p['boxes'])} box{'es' if len(p['boxes']) != 1 else ''}"
                          + (f" (best {score_text(p['boxes'][0]['score'])})" if p["boxes"] else "")
                          for p in result.summary()["phrases"])
        return f"{path}: {found} -> {out_dir / stem}_boxes.png"
    return each_image(paths, failed, out_dir, "ground", args.quiet, ground)
