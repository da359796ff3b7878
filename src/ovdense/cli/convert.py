"""`ovdense convert METHOD FILES`: an official checkpoint (with its companions, e.g. RegionCLIP's offline RPN) -> one
ovdense file recording the method, the model it needs and the preset of the paper's test protocol."""
from __future__ import annotations

import importlib
from pathlib import Path

from ..catalog import DETECTION_METHODS, DETECTION_PRESETS
from ..errors import InputError, UsageError
from .options import command_parser

CONVERTED = ("tcl", "denseclip", "regionclip", "glip")  # the official repositories `ovdense convert` reads
CONVERT_OPTIONS = {"glip": ("ema", "text_source", "preset"), "regionclip": ("class_names", "text_weights", "model", "preset")}


def add_parser(sub):
    parser = command_parser(sub, "convert", "convert the authors' released checkpoints into ovdense files "
                                            "(`ovdense models` lists them)")
    parser.add_argument("method", choices=CONVERTED, help="the official repository the files come from")
    parser.add_argument("files", nargs="+", help="the released file(s), as `ovdense models` lists them (RegionCLIP: "
                                                 "the detector, then its offline RPN)")
    parser.add_argument("--output", required=True, help="the .safetensors file to write")
    parser.add_argument("--ema", action="store_true", help="glip: take the EMA weights ('model_ema')")
    parser.add_argument("--text-source", help="glip: a folder with BERT's tokenizer and config (default: "
                                              "bert-base-uncased from the Hugging Face cache)")
    parser.add_argument("--classes", help="regionclip: the test classes in the order of the class embeddings: "
                                          "'a, b', a file with one per line, ov_coco65 or lvis1203 (default: the "
                                          "list of the RPN's protocol)")
    parser.add_argument("--text-weights", help="regionclip: CLIP weights (tag or file) whose text tower embeds names "
                                               "the file has no embedding for, loaded only then (default: openai)")
    parser.add_argument("--model", help="regionclip: the open_clip architecture (default: RN50 or RN50x4, read from "
                                        "the file)")
    parser.add_argument("--preset", choices=DETECTION_PRESETS, help="regionclip, glip: the preset the file records "
                                                                    "(default: ov-coco for a C4 RPN, lvis for FPN; "
                                                                    "glip, glip-lvis for an LVIS file)")
    return parser


def run(args) -> int:
    from ..errors import CheckpointError
    from ..io import check_output_file
    from ..methods import read_trained
    output = check_output_file(args.output)
    if output.suffix != ".safetensors":
        raise UsageError(f"--output {output}: ovdense writes .safetensors files; name it e.g. {output.stem}.safetensors")
    given = {"ema": args.ema or None, "text_source": args.text_source, "class_names": args.classes,
             "text_weights": args.text_weights, "model": args.model, "preset": args.preset}
    wrong = [key for key, value in given.items() if value is not None and key not in CONVERT_OPTIONS.get(args.method, ())]
    if wrong:
        flag = "--classes" if wrong[0] == "class_names" else "--" + wrong[0].replace("_", "-")
        raise UsageError(f"{flag} does not apply to `convert {args.method}` (see `ovdense convert --help`)")
    missing = [path for path in args.files if not Path(path).is_file()]
    if missing:
        raise InputError(f"{missing[0]} does not exist; `ovdense models` says where each official file is published")
    converter = importlib.import_module(f"..convert.{args.method}", __package__)
    written = converter.convert(args.files, output, **{k: v for k, v in given.items() if v is not None})
    try:
        method = read_trained(written, tensors=False)[0]["method"]
    except CheckpointError:  # RegionCLIP's pretrained backbones become CLIP weights, not a method
        print(f"wrote {written}: CLIP weights; use them as --weights {written} with --model RN50 or RN50x4 (the "
              "architecture of the file), or as a RegionCLIP recipe's init")
        return 0
    command = "detect" if method in DETECTION_METHODS else "segment"
    print(f"wrote {written}; run it with: ovdense {command} IMAGE --checkpoint {written} --classes '...'")
    return 0
