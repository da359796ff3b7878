"""`ovdense segment`: label every pixel of images with free-text classes."""
from __future__ import annotations

from pathlib import Path

from .build import RANDOM_NOTE, build_predictor, check_model_options, describe
from .inputs import each_image, images, vocabulary
from .options import add_classes, add_images, add_model_options, add_output_folder, command_parser


def add_parser(sub):
    parser = command_parser(sub, "segment", "segment images with free-text classes")
    add_images(parser)
    add_classes(parser, "cat, dog; puppy, grass")
    add_output_folder(parser, "segment", "<stem>_overlay.png, _labels.png, .json")
    add_model_options(parser)
    return parser


def run(args) -> int:
    check_model_options(args)
    words = vocabulary(args)
    out_dir, paths, failed = images(args)
    if not paths:
        return 1
    predictor = build_predictor(args)
    note = RANDOM_NOTE.split(".")[0] if predictor.backbone.weights.startswith("random") else None

    def segment(path: Path, stem: str) -> str:
        """Segment one image and write <stem>_overlay.png, <stem>_labels.png and <stem>.json."""
        result = predictor(path, words)
        result.save(out_dir, stem, metadata={"image": str(path), **describe(predictor)}, note=note)
        found = ", ".join(f"{s['label']} {100 * s['area']:.1f}%" for s in result.summary(rle=False)["segments"])
        return f"{path}: {found} -> {out_dir / stem}_overlay.png"
    return each_image(paths, failed, out_dir, "segment", args.quiet, segment)
