"""`ovdense synth`: export the synthetic world in the standard formats (segmentation folder, COCO, grounding JSONL)."""
from __future__ import annotations

from ..errors import UsageError
from .options import command_parser


def add_parser(sub):
    parser = command_parser(sub, "synth", "export the synthetic world in the standard formats")
    parser.add_argument("--output", default="data/synthetic-96", help="folder for the exported dataset (where the "
                                                                       "synthetic recipes export it too)")
    parser.add_argument("--train", type=int, default=1000, help="train scenes")
    parser.add_argument("--val", type=int, default=100, help="val scenes")
    parser.add_argument("--size", type=int, default=96, help="scene size in pixels (at least 32)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed: same seed, same scenes")
    parser.add_argument("--max-objects", type=int, default=4, help="most things painted in one scene")
    return parser


def run(args) -> int:
    from ..data.export import export_world
    from ..data.synthetic import SyntheticWorld
    from ..io import prepare_output_dir
    for option, least in (("train", 0), ("val", 0), ("size", 32), ("max_objects", 1)):
        if getattr(args, option) < least:
            raise UsageError(f"--{option.replace('_', '-')} must be at least {least}, got {getattr(args, option)}")
    if args.train + args.val == 0:
        raise UsageError("--train and --val are both 0: nothing to export")
    prepare_output_dir(args.output)
    world = SyntheticWorld(size=args.size, seed=args.seed, max_objects=args.max_objects)
    out = export_world(world, args.output, {"train": args.train, "val": args.val}, progress=not args.quiet)
    print(f"wrote the synthetic world (seed {args.seed}, {args.size}px, {args.train} train / {args.val} val) to {out}")
    print(f"  evaluate on it: ovdense eval --dataset folder --root {out} ...")
    return 0
