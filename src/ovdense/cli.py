"""Command line: ovdense demo | segment | eval | synth | train | models."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch.distributed as dist

from .backbones import DENSE_MODES, RANDOM_WEIGHTS, WeightsNotFoundError
from .data import DATASETS, ImageError, SegmentationDataset, load_image
from .io import atomic_path, write_text_atomic
from .methods import METHODS, TRAINED_METHODS, load_method
from .predictor import SegmentationPredictor
from .presets import PRESETS, get_protocol
from .text import TEMPLATE_SETS, Vocabulary
from .visualize import label_image, overlay

SYNTHETIC_NOTE = ("weights: the tiny CLIP that ships with ovdense, trained from scratch on the synthetic world's "
                  "captions (configs/tiny_clip_vit_synthetic.yaml); it knows only that world's words. For real images "
                  "use real CLIP weights: ovdense demo --model ViT-B-16 --weights openai --preset default.")
RANDOM_NOTE = ("weights: RANDOM initialisation. No pretrained CLIP weights are available offline, so these masks "
               "show the pipeline working, not CLIP's knowledge. For real results pass --weights openai "
               "(downloaded once, then cached) or --weights /path/to/checkpoint.pt.")


def _add_model_args(parser: argparse.ArgumentParser, default_model: str = "ViT-B-16", default_weights: str = "openai",
                    default_preset: str = "default") -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help=f"open_clip architecture (see `ovdense models`; default: {default_model}, "
                                         "or the one a --checkpoint was trained on)")
    group.add_argument("--weights", help="CLIP weights: open_clip pretrained tag, a checkpoint file, or 'random' "
                                         f"(default: {default_weights}, or those a --checkpoint records)")
    group.add_argument("--method", default="maskclip", choices=sorted(METHODS),
                       help=f"trained methods ({', '.join(TRAINED_METHODS)}) need --checkpoint")
    group.add_argument("--checkpoint", help="a trained method's file (from `ovdense train METHOD`)")
    parser.set_defaults(default_model=default_model, default_weights=default_weights)
    group.add_argument("--mode", choices=DENSE_MODES, help="dense-feature mode (default: the preset's, else maskclip)")
    group.add_argument("--device", default="cpu")
    group.add_argument("--batch-size", type=int, default=8, help="crops embedded per forward pass")
    proto = parser.add_argument_group("protocol (each overrides the preset)")
    proto.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                       help="published inference settings (default: %(default)s)")
    proto.add_argument("--short-side", type=int)
    proto.add_argument("--crop", type=int, help="sliding-window size; 0 for whole-image inference")
    proto.add_argument("--stride", type=int)
    proto.add_argument("--templates", choices=sorted(TEMPLATE_SETS))
    proto.add_argument("--logit-scale", type=float)
    proto.add_argument("--pamr", type=int, dest="pamr_iterations", help="PAMR iterations (0: off)")
    proto.add_argument("--background-threshold", type=float)
    proto.add_argument("--area-threshold", type=float)
    proto.add_argument("--prompt-denoising", type=float)
    proto.add_argument("--key-smoothing", type=float)


def _build_predictor(args, dataset: str | None = None) -> SegmentationPredictor:
    protocol = get_protocol(args.preset).for_dataset(dataset)
    protocol = protocol.updated(
        short_side=args.short_side, stride=args.stride, templates=args.templates, logit_scale=args.logit_scale,
        pamr_iterations=args.pamr_iterations, background_threshold=args.background_threshold,
        area_threshold=args.area_threshold, prompt_denoising=args.prompt_denoising,
        key_smoothing=args.key_smoothing)
    if args.crop is not None:  # 0 means whole-image inference
        protocol = replace(protocol, crop=args.crop or None, stride=(args.stride or protocol.stride) if args.crop else None)
    if args.method in TRAINED_METHODS:
        method = load_method(args.method, args.model, args.weights, checkpoint=args.checkpoint, device=args.device)
    else:
        method = load_method(args.method, args.model or args.default_model, args.weights or args.default_weights,
                             args.mode or protocol.mode, args.checkpoint, args.device)
    return SegmentationPredictor(method, protocol, batch_size=args.batch_size)


def _describe(predictor: SegmentationPredictor) -> dict:
    backbone = predictor.backbone
    return {"model": backbone.name, "weights": backbone.weights, "method": predictor.method.name,
            "mode": getattr(predictor.method, "mode", None),
            "protocol": {k: v for k, v in asdict(predictor.protocol).items() if k != "dataset_overrides"}}


def _segment_one(predictor, image_path: Path, vocabulary: Vocabulary, out_dir: Path, note: str | None) -> dict:
    rgb = load_image(image_path)
    result = predictor(rgb, vocabulary)
    summary = {"image": str(image_path), "width": rgb.shape[1], "height": rgb.shape[0], **_describe(predictor),
               "classes": result.class_names, "segments": result.segments()}
    stem = image_path.stem
    with atomic_path(out_dir / f"{stem}_overlay.png") as over, atomic_path(out_dir / f"{stem}_labels.png") as lab, \
            atomic_path(out_dir / f"{stem}.json") as js:
        overlay(rgb, result.labels, result.class_names, note=note).save(over, format="PNG")
        label_image(result.labels, len(result.class_names)).save(lab, format="PNG")
        js.write_text(json.dumps(summary, indent=2))
    return summary


def _vocabulary(args) -> Vocabulary:
    if bool(args.classes) == bool(args.classes_file):
        raise SystemExit("error: give the classes with exactly one of --classes 'cat, dog; puppy' or --classes-file FILE")
    return Vocabulary.parse(args.classes) if args.classes else Vocabulary.from_file(args.classes_file)


def cmd_segment(args) -> int:
    vocabulary = _vocabulary(args)
    predictor = _build_predictor(args)
    note = RANDOM_NOTE.split(".")[0] if args.weights == RANDOM_WEIGHTS else None
    failures = 0
    for path in map(Path, args.images):
        try:
            summary = _segment_one(predictor, path, vocabulary, Path(args.output), note)
        except ImageError as error:
            failures += 1
            print(f"skipped {path}: {error}", file=sys.stderr)
            continue
        found = ", ".join(f"{s['label']} {100 * s['area']:.1f}%" for s in summary["segments"])
        print(f"{path}: {found} -> {Path(args.output) / path.stem}_overlay.png")
    return 1 if failures else 0


def cmd_demo(args) -> int:
    from PIL import Image

    from .data.export import scene_index
    from .data.synthetic import SyntheticWorld
    from .eval import SegmentationMetric
    out_dir = Path(args.output)
    world = SyntheticWorld(size=64, seed=0, max_objects=3)  # the world the shipped model was trained on
    scene = world.scene(scene_index("val", args.scene))
    zoom = max(1, args.zoom)  # pixels are repeated for a picture people can see; the preset resizes anyway
    truth = scene.semantic.repeat(zoom, axis=0).repeat(zoom, axis=1)
    scene_path = out_dir / "demo_scene.png"
    with atomic_path(scene_path) as tmp:
        Image.fromarray(scene.image).resize((64 * zoom, 64 * zoom), Image.NEAREST).save(tmp, format="PNG")
    predictor = _build_predictor(args)
    backbone = predictor.backbone
    random = backbone.weights.startswith(RANDOM_WEIGHTS)
    print(f"ovdense demo: model {backbone.name}, weights {backbone.weights}, method {predictor.method.name}, "
          f"mode {predictor.method.mode}, preset {predictor.protocol.name}")
    print(RANDOM_NOTE if random else SYNTHETIC_NOTE if backbone.name.startswith("ovdense-tiny") else "")
    vocabulary = Vocabulary.parse(args.classes) if args.classes else Vocabulary.coerce(world.classes)
    summary = _segment_one(predictor, scene_path, vocabulary, out_dir, RANDOM_NOTE.split(".")[0] if random else None)
    with atomic_path(out_dir / "demo_scene_truth.png") as tmp:
        overlay(np.asarray(Image.open(scene_path)), truth, world.classes).save(tmp, format="PNG")
    print(f"scene {args.scene} of the synthetic val split; captions: " + " | ".join(c.text for c in scene.captions))
    for segment in summary["segments"]:
        print(f"  {segment['label']:<14} area {100 * segment['area']:5.1f}%  mean score {segment['score']:.3f}")
    if backbone.name.startswith("ovdense-tiny") and not random:
        for obj, guess in zip(scene.objects, _name_objects(backbone, scene)):
            print(f"  object crop: {obj.name:<16} -> zero-shot '{guess}'")
    if vocabulary.names == world.classes:
        metric = SegmentationMetric(len(world.classes))
        metric.update(np.asarray(Image.open(out_dir / "demo_scene_labels.png")), truth)
        print(f"against the exact ground truth: pixel accuracy {metric.compute()['aAcc']:.1f}%")
    print(f"wrote {out_dir}/demo_scene_overlay.png (prediction), demo_scene_truth.png (ground truth), "
          "demo_scene_labels.png, demo_scene.json")
    return 0


def _name_objects(backbone, scene) -> list[str]:
    """Zero-shot names ('red star') of each ground-truth object of a synthetic scene, from a crop around it."""
    from .data.synthetic import COLOURS, THINGS
    from .engine.clip_pretrain import object_crop, score_object_crops
    scores = score_object_crops(backbone, [object_crop(scene.image, o.box) for o in scene.objects], list(THINGS))
    best = scores.flatten(1).argmax(dim=1).tolist()  # index colour * len(THINGS) + shape
    return [f"{list(COLOURS)[i // len(THINGS)]} {THINGS[i % len(THINGS)]}" for i in best]


def cmd_eval(args) -> int:
    from .eval import evaluate_segmentation, format_table
    dataset = SegmentationDataset(args.dataset, args.root, args.split)
    predictor = _build_predictor(args, dataset=args.dataset)
    metrics = evaluate_segmentation(predictor, dataset, limit=args.limit)
    if dist.is_initialized():  # under torchrun every rank holds the summed metrics; rank 0 reports them
        rank = dist.get_rank()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    print(format_table(metrics, dataset.vocabulary.names))
    if args.output:
        report = {"dataset": args.dataset, "split": args.split, "images": min(len(dataset), args.limit or len(dataset)),
                  **_describe(predictor), "metrics": metrics, "classes": dataset.vocabulary.names}
        write_text_atomic(args.output, json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return 0


def cmd_synth(args) -> int:
    from .data.export import export_world
    from .data.synthetic import SyntheticWorld
    world = SyntheticWorld(size=args.size, seed=args.seed, max_objects=args.max_objects)
    out = export_world(world, args.output, {"train": args.train, "val": args.val})
    print(f"wrote the synthetic world (seed {args.seed}, {args.size}px, {args.train} train / {args.val} val) to {out}")
    print(f"  evaluate on it: ovdense eval --dataset folder --root {out} ...")
    return 0


def cmd_train(args) -> int:
    from .engine.recipe import load_recipe
    if args.what == "clip":
        from .engine.clip_pretrain import PretrainConfig, pretrain_clip
        config = load_recipe(PretrainConfig, args.config)
        if args.export:
            config.export = args.export
        _, scores = pretrain_clip(config, args.output, device=args.device, resume=not args.restart,
                                  max_steps=args.max_steps)
        print("zero-shot shape accuracy on val object crops: "
              f"base {scores['zs_base_acc']:.1f}%, novel {scores['zs_novel_acc']:.1f}% "
              f"(chance {scores['chance_acc']:.1f}%, {scores['zs_crops']} crops); colour {scores['zs_colour_acc']:.1f}%")
        if config.export:
            print(f"wrote {config.export}")
        return 0
    from .engine.denseclip_train import DenseCLIPRecipe, train_denseclip
    from .engine.tcl_train import TCLRecipe, train_tcl
    recipe_class, train = {"tcl": (TCLRecipe, train_tcl), "denseclip": (DenseCLIPRecipe, train_denseclip)}[args.what]
    recipe = load_recipe(recipe_class, args.config)
    if args.export:
        recipe.export = args.export
    _, export = train(recipe, args.output, device=args.device, resume=not args.restart, max_steps=args.max_steps)
    print(f"wrote {export}; segment with: ovdense segment IMAGE --method {args.what} --checkpoint {export} "
          "--classes '...'")
    return 0


def cmd_models(args) -> int:
    import open_clip
    for name, tag in open_clip.list_pretrained():
        print(f"{name:<32} {tag}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovdense", description="Open-vocabulary dense prediction with CLIP.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="segment a synthetic-world scene end to end; runs offline")
    _add_model_args(demo, default_model="ovdense-tiny-vit", default_weights="synthetic", default_preset="synthetic")
    demo.add_argument("--classes", help="free-text classes (default: the synthetic world's 20 class names)")
    demo.add_argument("--scene", type=int, default=0, help="index of the val scene to segment")
    demo.add_argument("--zoom", type=int, default=4, help="the 64 px scene is shown this many times larger")
    demo.add_argument("--output", default="outputs/demo")
    demo.set_defaults(func=cmd_demo)

    seg = sub.add_parser("segment", help="segment images with free-text classes")
    seg.add_argument("images", nargs="+")
    seg.add_argument("--classes", help="'cat, dog; puppy, grass': ',' separates classes, ';' synonyms")
    seg.add_argument("--classes-file", help="one class per line, synonyms separated by ';'")
    seg.add_argument("--output", default="outputs/segment")
    _add_model_args(seg)
    seg.set_defaults(func=cmd_segment)

    ev = sub.add_parser("eval", help="mIoU of a method on a standard dataset")
    ev.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    ev.add_argument("--root", required=True, help="dataset folder (see ovdense.data.datasets for layouts)")
    ev.add_argument("--split", default="val")
    ev.add_argument("--limit", type=int, help="evaluate only the first N images")
    ev.add_argument("--output", help="write the metrics as JSON here")
    _add_model_args(ev)
    ev.set_defaults(func=cmd_eval)

    synth = sub.add_parser("synth", help="export the synthetic world in the standard formats")
    synth.add_argument("--output", default="data/synthetic")
    synth.add_argument("--train", type=int, default=1000)
    synth.add_argument("--val", type=int, default=100)
    synth.add_argument("--size", type=int, default=96)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--max-objects", type=int, default=4)
    synth.set_defaults(func=cmd_synth)

    train = sub.add_parser("train", help="train a model from a YAML recipe")
    train.add_argument("what", choices=["clip", "tcl", "denseclip"],
                       help="clip: a tiny CLIP from scratch on synthetic captions; tcl: TCL from image-caption pairs; "
                            "denseclip: DenseCLIP (or its baseline) fine-tuned on a segmentation dataset")
    train.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    train.add_argument("--output", default="runs/train", help="checkpoints (last.pt) and metrics.csv go here")
    train.add_argument("--export", help="write the trained weights here (default: the recipe's, else in --output)")
    train.add_argument("--device", default="cpu")
    train.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    train.add_argument("--max-steps", type=int, help="stop after this many more steps (resume later)")
    train.set_defaults(func=cmd_train)

    models = sub.add_parser("models", help="list open_clip architectures and pretrained tags")
    models.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (WeightsNotFoundError, ImageError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
