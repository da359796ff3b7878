"""Trained methods against the training-free baseline on the synthetic world's val split.

Each row is one method (a training-free MaskCLIP, or a checkpoint from `ovdense train tcl|denseclip`),
evaluated with the `synthetic` preset over the 20 classes; mIoU is given over all classes and over
stuff, base things and novel things (novel things were never in any mask supervision; TCL saw
them only in captions, DenseCLIP's training labels mark them ignore).

    python benchmarks/bench_synthetic_methods.py --scenes 200 \
        --tcl runs/tcl-synthetic/tcl.safetensors \
        --denseclip runs/denseclip-synthetic/denseclip.safetensors \
        --baseline runs/denseclip-baseline-synthetic/denseclip.safetensors [--vit FILE]
"""
from __future__ import annotations

import argparse

import torch
from tqdm import tqdm

from ovdense.backbones import load_clip
from ovdense.data.export import scene_index
from ovdense.data.synthetic import SyntheticWorld
from ovdense.eval import SegmentationMetric, group_means
from ovdense.methods import MaskCLIP, load_method
from ovdense.methods.denseclip import DenseCLIP
from ovdense.methods.tcl import TCL
from ovdense.predictor import SegmentationPredictor
from ovdense.text import Vocabulary


def evaluate(method, world: SyntheticWorld, scenes: int, preset: str, desc: str) -> dict[str, float]:
    predictor = SegmentationPredictor(method, preset)
    vocabulary = Vocabulary.coerce(world.classes)
    metric = SegmentationMetric(len(world.classes))
    for i in tqdm(range(scenes), desc=desc, leave=False):
        scene = world.scene(scene_index("val", i))
        metric.update(predictor(scene.image, vocabulary).labels, scene.semantic)
    groups = {"all": world.classes, "stuff": list(world.stuff), "base": world.base_things, "novel": list(world.novel)}
    return group_means(metric.compute()["IoU"], world.classes, groups)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--preset", default="synthetic")
    parser.add_argument("--tcl", help="TCL checkpoint")
    parser.add_argument("--denseclip", help="DenseCLIP checkpoint")
    parser.add_argument("--baseline", help="checkpoint of DenseCLIP's baseline (language_guidance: false)")
    parser.add_argument("--vit", default="synthetic",
                        help="tiny ViT CLIP weights of the MaskCLIP row (a file from `ovdense train clip`); the trained "
                             "checkpoints run on the CLIP they record, so pass the one they were trained on")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    world = SyntheticWorld()  # the 96 px world the shipped models were trained on
    backbone = load_clip("ovdense-tiny-vit", args.vit)
    rows = [("MaskCLIP (training-free)", MaskCLIP(backbone, "maskclip"))]
    if args.tcl:
        tcl = load_method("tcl", checkpoint=args.tcl)
        torch.manual_seed(0)
        rows.append(("TCL, untrained grounder", TCL(tcl.backbone, **tcl.config)))  # on the CLIP TCL was trained on
        rows.append(("TCL", tcl))
    if args.denseclip:
        rows.append(("DenseCLIP, FPN head", load_method("denseclip", checkpoint=args.denseclip)))
        rows.append(("DenseCLIP, score map", DenseCLIP.from_checkpoint(args.denseclip, inference="score_map")))
    if args.baseline:
        rows.append(("Baseline CLIP + FPN, no language", load_method("denseclip", checkpoint=args.baseline)))
    results = [(name, evaluate(method.eval(), world, args.scenes, args.preset, name)) for name, method in rows]
    print(f"\nsynthetic val, {args.scenes} scenes of 96 px, preset {args.preset}, tiny CLIP {args.vit!r}")
    print("| method                           | mIoU all | stuff (8) | base things (9) | novel things (3) |")
    print("|----------------------------------|----------|-----------|-----------------|------------------|")
    for name, r in results:
        print(f"| {name:<32} | {r['all']:8.1f} | {r['stuff']:9.1f} | {r['base']:15.1f} | {r['novel']:16.1f} |")


if __name__ == "__main__":
    main()
