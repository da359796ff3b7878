"""`ovdense train WHAT --config RECIPE`: one YAML recipe -> a run folder (last.pt, metrics.csv) and the exported
weights; a run resumes from its last checkpoint, and --max-steps splits a long one into parts."""
from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import UsageError
from .console import print_error
from .options import command_parser

TRAINED = {  # what -> (engine module, recipe class, training function)
    "clip": ("clip_pretrain", "PretrainConfig", "pretrain_clip"),
    "tcl": ("tcl_train", "TCLRecipe", "train_tcl"),
    "denseclip": ("denseclip_train", "DenseCLIPRecipe", "train_denseclip"),
    "rpn": ("regionclip_train", "RPNRecipe", "train_rpn"),
    "regionclip-pretrain": ("regionclip_train", "PretrainRecipe", "train_pretrain"),
    "regionclip": ("regionclip_train", "DetectorRecipe", "train_detector"),
    "glip": ("glip_train", "GLIPRecipe", "train_glip"),
}


def add_parser(sub):
    parser = command_parser(sub, "train", "train a model from a YAML recipe")
    parser.add_argument("what", metavar="{" + ",".join(TRAINED) + "}", choices=list(TRAINED),
                        help="clip: a tiny CLIP from scratch on synthetic captions; tcl: TCL from image-caption pairs; "
                             "denseclip: DenseCLIP (or its baseline) fine-tuned on a segmentation dataset; rpn: a "
                             "class-agnostic RPN on base boxes; regionclip-pretrain: RegionCLIP region-text "
                             "pretraining; regionclip: the RegionCLIP open-vocabulary detector")
    parser.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    parser.add_argument("--output", help="the run folder: checkpoint (last.pt), metrics.csv and, by default, the "
                                         "exported weights (default: runs/clip, runs/tcl or runs/denseclip)")
    parser.add_argument("--export", help="write the final weights to this file (default: the recipe's export, "
                                         "relative to --output, else a file in --output); never inside the "
                                         "installed ovdense package")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--restart", action="store_true",
                        help="start from step 0 instead of resuming; the old last.pt is replaced at the first "
                             "checkpoint")
    parser.add_argument("--max-steps", type=int, help="stop after this many more steps (resume later); a run "
                                                      "stopped before the recipe's steps exports nothing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one recipe value (repeatable), e.g. --set train.seed=1 --set weights=FILE; "
                             "dotted keys reach nested values, list entries by number (data.sources.0.path)")
    return parser


def _check_flags(args) -> None:
    """The train options that cannot work are UsageErrors, found before the recipe is read."""
    from ..device import resolve_device
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps: must be a positive number of steps, got {args.max_steps}")
    for option in ("output", "export", "config"):
        if getattr(args, option) is not None and not str(getattr(args, option)).strip():
            raise UsageError(f"--{option}: must not be empty")
    args.device = str(resolve_device(args.device))


def run(args) -> int:
    from ..engine.recipe import load_recipe
    _check_flags(args)
    output = Path(args.output or f"runs/{args.what}")
    module, recipe_class, train = TRAINED[args.what]
    engine = importlib.import_module(f"..engine.{module}", __package__)
    recipe = load_recipe(getattr(engine, recipe_class), args.config, args.set)
    if args.export:  # a path on the command line is relative to the current directory
        recipe.export = os.path.abspath(os.path.expanduser(args.export))
    try:
        result = getattr(engine, train)(recipe, output, device=args.device, resume=not args.restart,
                                        max_steps=args.max_steps)
    except KeyboardInterrupt:
        every = recipe.train_config().checkpoint_every
        print_error(f"interrupted; the run resumes from its last checkpoint {output / 'last.pt'} (written every "
                    f"{every} steps) when the same command is run again")
        return 130
    _report(args, recipe, output, result)
    return 0


def _report(args, recipe, output: Path, result: tuple) -> None:
    export = result[-1]
    if args.what == "clip":
        scores = result[1]
        print("zero-shot shape accuracy on val object crops: "
              f"base {scores['zs_base_acc']:.1f}%, novel {scores['zs_novel_acc']:.1f}% "
              f"(chance {scores['chance_acc']:.1f}%, {scores['zs_crops']} crops); colour {scores['zs_colour_acc']:.1f}%")
    if export is None:
        steps = recipe.train_config().steps
        print(f"stopped by --max-steps before the recipe's {steps} steps: nothing exported. The run resumes from "
              f"{output / 'last.pt'}: run the same command again (without --restart) to continue.")
    elif args.what in ("clip", "rpn", "regionclip-pretrain"):
        print(f"wrote {export}")
    else:
        command = "detect" if args.what in ("regionclip", "glip") else "segment"
        print(f"wrote {export}; {command} with: ovdense {command} IMAGE --method {args.what} --checkpoint {export} "
              "--classes '...'")
