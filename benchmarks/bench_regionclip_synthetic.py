"""RegionCLIP's evidence on the synthetic world (v2), printed as the two tables of the issue:

1. Region recognition with ground-truth boxes (the paper's zero-shot region table): each val thing's box is
   classified among the 12 thing names ("a photo of a {}.") by its region embedding (`RegionEncoder`: res4 ->
   RoIAlign 7x7 -> res5 -> attention pool, as the synthetic recipes, at 192 px); top-1 accuracy over base and novel
   things, for the frozen CLIP teacher and the RegionCLIP-pretrained student.
2. Open-vocabulary detection (OV-COCO protocol: AP50 over novel / base / all things) of detectors trained on
   base boxes only, initialised from CLIP and from RegionCLIP pretraining.

  python benchmarks/bench_regionclip_synthetic.py \
      --student runs/regionclip-pretrain-synthetic/regionclip-pretrain.safetensors \
      --detector clip=runs/regionclip-clipinit-synthetic/regionclip.safetensors \
      --detector regionclip=runs/regionclip-synthetic/regionclip.safetensors
"""
from __future__ import annotations

import argparse

import torch

from ovdense.backbones import load_clip
from ovdense.data.detection import DetectionDataset
from ovdense.data.images import load_image
from ovdense.detection.images import prepare_image
from ovdense.detection.predictor import DetectionPredictor
from ovdense.eval.detection import evaluate_detection
from ovdense.methods.regionclip import RegionCLIPDetector, RegionEncoder, region_logits
from ovdense.text import TextEmbeddingCache, resolve_templates


@torch.no_grad()
def region_predictions(clip, dataset: DetectionDataset, short: int, resolution: int, templates: str = "single",
                       limit: int | None = None) -> dict[int, list[tuple[str, bool]]]:
    """{image id: [(the thing's split, 'base' or 'novel'; whether its ground-truth box is named right among all
    category names) for each box]} over the first `limit` images."""
    encoder = RegionEncoder(clip, resolution).eval()
    names = dataset.vocabulary.names
    text = TextEmbeddingCache().embed(clip, names, resolve_templates(templates), raw_mean=True)
    predictions = {}
    for path, image_id in list(dataset)[:limit]:
        rgb = load_image(path)
        pixels = prepare_image(rgb, short, 4 * short, clip.image_mean, clip.image_std)[None]
        scale = pixels.shape[-1] / rgb.shape[1]
        annotations = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=image_id))
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in annotations], dtype=torch.float32)
        predicted = region_logits(encoder(pixels, [boxes * scale]), text, background=False).argmax(dim=1)
        predictions[image_id] = [(dataset.category_split[a["category_id"]], dataset.category_ids[p] == a["category_id"])
                                 for a, p in zip(annotations, predicted.tolist())]
    return predictions


def region_recognition(clip, dataset: DetectionDataset, short: int, resolution: int, templates: str = "single",
                       limit: int | None = None) -> dict:
    """Top-1 accuracy (%) of ground-truth boxes among all category names, over base and novel categories."""
    correct = {"base": [], "novel": []}
    for boxes in region_predictions(clip, dataset, short, resolution, templates, limit).values():
        for split, right in boxes:
            correct[split].append(right)
    return {split: 100 * sum(v) / max(1, len(v)) for split, v in correct.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", default="data/synthetic-96/instances_val.json")
    parser.add_argument("--model", default="ovdense-tiny-rn")
    parser.add_argument("--teacher", default="synthetic", help="the CLIP weights of the teacher")
    parser.add_argument("--student", help="a RegionCLIP-pretrained CLIP file (from `ovdense train regionclip-pretrain`)")
    parser.add_argument("--detector", action="append", default=[], help="NAME=checkpoint of a trained detector")
    parser.add_argument("--limit", type=int, help="only the first N val images")
    parser.add_argument("--short", type=int, default=192, help="shortest image edge for region recognition")
    parser.add_argument("--resolution", type=int, default=7, help="RoIAlign side for region recognition")
    args = parser.parse_args()
    dataset = DetectionDataset(args.annotations)
    rows = [("CLIP teacher", load_clip(args.model, args.teacher))]
    if args.student:
        rows.append(("RegionCLIP student", load_clip(args.model, args.student)))
    print("region recognition with ground-truth boxes, top-1 accuracy % among the "
          f"{len(dataset.vocabulary)} thing names (chance {100 / len(dataset.vocabulary):.1f})")
    print(f"{'image tower':<22}{'base':>8}{'novel':>8}")
    for name, clip in rows:
        scores = region_recognition(clip, dataset, args.short, args.resolution, limit=args.limit)
        print(f"{name:<22}{scores['base']:>8.1f}{scores['novel']:>8.1f}")
    if args.detector:
        print("\nopen-vocabulary detection, AP50 % (trained on base boxes only; preset synthetic-detection)")
        print(f"{'detector init':<22}{'novel':>8}{'base':>8}{'all':>8}")
        for spec in args.detector:
            name, path = spec.split("=", 1)
            predictor = DetectionPredictor(RegionCLIPDetector.from_checkpoint(path), "synthetic-detection")
            metrics = evaluate_detection(predictor, dataset, "ov-coco", limit=args.limit, progress=False)
            print(f"{name:<22}{metrics['AP50_novel']:>8.1f}{metrics['AP50_base']:>8.1f}{metrics['AP50']:>8.1f}")


if __name__ == "__main__":
    main()
