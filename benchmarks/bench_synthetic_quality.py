"""Training-free dense segmentation quality on the synthetic world's val split: the baselines that the
learned methods (TCL, DenseCLIP, ...) must beat.

For each dense mode (plain CLIP, MaskCLIP, SCLIP, ClearCLIP, NACLIP), without and with PAMR, prints the
mIoU over all 20 classes and separately over stuff, base things and novel things (novel things are
never supervised by boxes or masks; CLIP saw them only in captions).

    python benchmarks/bench_synthetic_quality.py [--model ovdense-tiny-vit --weights synthetic]
        [--scenes 200] [--size 96] [--short-side 192 --crop 96 --stride 48] [--templates none]
        [--modes maskclip naclip]

Defaults are the `synthetic` preset's: 96 px scenes (the shipped model's training scale) in one window.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from ovdense.backbones import load_clip
from ovdense.data.export import scene_index
from ovdense.data.synthetic import SyntheticWorld
from ovdense.eval import SegmentationMetric
from ovdense.methods import MaskCLIP
from ovdense.predictor import SegmentationPredictor
from ovdense.presets import PRESETS, Protocol
from ovdense.text import Vocabulary


def evaluate(backbone, world: SyntheticWorld, scenes: int, mode: str, protocol: Protocol) -> dict[str, float]:
    predictor = SegmentationPredictor(MaskCLIP(backbone, mode), protocol)
    vocabulary = Vocabulary.coerce(world.classes)
    metric = SegmentationMetric(len(world.classes))
    for i in range(scenes):
        scene = world.scene(scene_index("val", i))
        metric.update(predictor(scene.image, vocabulary).labels, scene.semantic)
    iou = np.array(metric.compute()["IoU"])
    groups = {"all": world.classes, "stuff": world.stuff, "base": world.base_things, "novel": world.novel}
    return {name: float(np.nanmean(iou[[world.classes.index(c) for c in members]])) for name, members in groups.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ovdense-tiny-vit")
    parser.add_argument("--weights", default="synthetic")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    synthetic = PRESETS["synthetic"]
    parser.add_argument("--short-side", type=int, default=synthetic.short_side, help="processing size (0: native)")
    parser.add_argument("--crop", type=int, default=synthetic.crop, help="window size (0: whole image)")
    parser.add_argument("--stride", type=int, default=synthetic.stride)
    parser.add_argument("--templates", default=synthetic.templates)
    parser.add_argument("--logit-scale", type=float, default=synthetic.logit_scale)
    parser.add_argument("--modes", nargs="+", help="dense modes to score (default: all the model supports)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    backbone = load_clip(args.model, args.weights)
    world = SyntheticWorld(args.size, seed=args.seed)
    rows = []
    for mode in tqdm(args.modes or backbone.supported_modes(), desc="modes"):
        for pamr in (0, 10):
            protocol = replace(synthetic, short_side=args.short_side or None, crop=args.crop or None,
                               stride=args.stride if args.crop else None, templates=args.templates,
                               logit_scale=args.logit_scale, pamr_iterations=pamr)
            rows.append((mode, "on" if pamr else "off", evaluate(backbone, world, args.scenes, mode, protocol)))
    print(f"\nsynthetic val: {args.scenes} scenes of {args.size}px (seed {args.seed}), {args.model} / {args.weights}, "
          f"templates {args.templates}, logit scale {args.logit_scale}, short side {args.short_side or 'native'}, "
          f"windows {args.crop or 'whole image'}/{args.stride}")
    print("| mode      | PAMR | mIoU all | stuff (8) | base things (9) | novel things (3) |")
    print("|-----------|------|----------|-----------|-----------------|------------------|")
    for mode, pamr, r in rows:
        print(f"| {mode:<9} | {pamr:<4} | {r['all']:8.1f} | {r['stuff']:9.1f} | {r['base']:15.1f} | {r['novel']:16.1f} |")


if __name__ == "__main__":
    main()
