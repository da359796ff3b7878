"""Where a CLIP's dense map loses the things: a diagnostic of issue 25's foundation runs.

For the val things of the synthetic world, scored like the training runs' `metrics.csv` (shape accuracy, best colour
per shape, "a photo of a {colour} {shape}.", chance 1 / 12), it separates:

- crop: the pooled embedding of a crop around the thing (25% margin), as `zero_shot_crops`;
- crop dense: the MaskCLIP dense map of that same crop, RoIAligned over the thing's box inside it: do the patch
  tokens know the shape at close-up scale?
- scene dense: the dense map of the whole scene over the exact box, as `zero_shot_regions`: do they in context?
- pointing: in the crop's dense map, is the patch that matches the thing's own caption best on the thing (its
  mask)? A token term that names a caption from context rather than from the object points off it. Its chance is
  the share of the crop's patch centres that lie on the thing (column "on thing").

and, for each group, which shapes the scene dense map takes its things for (the three most frequent answers).

    python benchmarks/diagnose_dense_things.py --weights FILE [--model ovdense-tiny-vit] [--scenes 200]
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from ovdense.backbones import load_clip
from ovdense.backbones.loading import recorded_architecture
from ovdense.data.export import scene_index
from ovdense.data.images import to_tensor
from ovdense.data.synthetic import COLOURS, SyntheticWorld
from ovdense.engine.clip_pretrain import colour_shape_text, crop_window, region_scores


@torch.no_grad()
def diagnose(backbone, world: SyntheticWorld, scenes: int) -> dict[str, dict]:
    """Per group (base, novel): crop, crop dense, scene dense accuracies and pointing (%), scene answers."""
    things = list(world.things)
    text = colour_shape_text(backbone, things)  # (colours * shapes, D)
    size, mean, std = backbone.image_size, backbone.image_mean, backbone.image_std
    rows = []  # (group, crop ok, crop dense ok, scene dense ok, pointing ok, on-thing share, scene answer)
    for i in range(scenes):
        scene = world.scene(scene_index("val", i))
        if not scene.objects:
            continue
        whole = to_tensor(scene.image, mean, std, size)[None].to(backbone.device)
        dense = backbone.dense_features(whole, "maskclip").features
        boxes = torch.tensor([o.box for o in scene.objects], dtype=dense.dtype, device=dense.device)
        in_scene = region_scores(dense, boxes, dense.shape[-1] / scene.image.shape[1], text)
        for obj, scene_scores in zip(scene.objects, in_scene):
            x0, y0, x1, y1 = crop_window(scene.image.shape[:2], obj.box)
            crop = to_tensor(scene.image[y0:y1, x0:x1], mean, std, size)[None].to(backbone.device)
            pooled = F.normalize(backbone.encode_image(crop), dim=-1)
            crop_dense = backbone.dense_features(crop, "maskclip").features  # (1, D, h, w)
            sx, sy = size / (x1 - x0), size / (y1 - y0)
            box = torch.tensor([[(obj.box[0] - x0) * sx, (obj.box[1] - y0) * sy, (obj.box[2] - x0) * sx,
                                 (obj.box[3] - y0) * sy]], dtype=crop_dense.dtype, device=crop_dense.device)
            crop_scores = region_scores(crop_dense, box, crop_dense.shape[-1] / size, text)[0]
            shape = things.index(obj.category)
            own = text[list(COLOURS).index(obj.colour) * len(things) + shape]
            best = int((F.normalize(crop_dense[0].flatten(1).T, dim=-1) @ own).argmax())
            grid = crop_dense.shape[-1]
            centres_y = y0 + ((np.arange(grid) + 0.5) * (y1 - y0) / grid).astype(int)  # patch centres, scene pixels
            centres_x = x0 + ((np.arange(grid) + 0.5) * (x1 - x0) / grid).astype(int)
            on_thing = obj.mask[np.ix_(centres_y, centres_x)]  # (grid, grid)
            crop_answer = int(((pooled @ text.T).view(len(COLOURS), -1).amax(dim=0)).argmax())
            scene_answer = int(scene_scores.amax(dim=0).argmax())
            rows.append(("novel" if obj.category in world.novel else "base", crop_answer == shape,
                         int(crop_scores.amax(dim=0).argmax()) == shape, scene_answer == shape,
                         bool(on_thing.flat[best]), on_thing.mean(), things[scene_answer]))
    report = {}
    for group in ("base", "novel"):
        mine = [r for r in rows if r[0] == group]
        report[group] = {"things": len(mine), **{name: 100 * float(np.mean([r[k] for r in mine]))
                                                 for k, name in enumerate(("crop", "crop dense", "scene dense",
                                                                           "pointing", "on thing"), start=1)},
                         "scene answers": Counter(r[6] for r in mine).most_common(3)}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: the architecture the weights file records")
    parser.add_argument("--weights", default="synthetic")
    parser.add_argument("--scenes", type=int, default=200)
    args = parser.parse_args()
    model = args.model or recorded_architecture(args.weights) or "ovdense-tiny-vit"
    backbone = load_clip(model, args.weights)
    report = diagnose(backbone, SyntheticWorld(96, seed=0), args.scenes)
    print(f"\n{model} / {args.weights}, {args.scenes} val scenes (shape accuracy %, chance 8.3)")
    print("| things | n | crop | crop dense | scene dense | pointing | on thing | scene dense takes them for |")
    print("|---|---|---|---|---|---|---|---|")
    for group, r in report.items():
        answers = ", ".join(f"{name} {count}" for name, count in r["scene answers"])
        print(f"| {group} | {r['things']} | {r['crop']:.1f} | {r['crop dense']:.1f} | {r['scene dense']:.1f} | "
              f"{r['pointing']:.1f} | {r['on thing']:.1f} | {answers} |")


if __name__ == "__main__":
    main()
