"""Write a synthetic world in the standard formats, so it goes through the same readers as real data.

`export_world(world, out)` writes, for each split:
  images/SPLIT_NNNNNN.png, labels/SPLIT_NNNNNN.png   semantic-segmentation folder (`--dataset folder`)
  SPLIT.txt, classes.txt                             stems of the split, class names (stuff then things)
  instances_SPLIT.json                               COCO instances (things only, RLE masks)
  captions_SPLIT.csv / captions_SPLIT.jsonl          image-caption pairs (open_clip's CSV: filepath<TAB>title)
  grounding_SPLIT.jsonl                              caption, phrase spans and the boxes each phrase refers to
  world.json                                         seed, size, classes, base / novel things, split sizes
Open-vocabulary protocol: in the train split, novel things (`world.novel`) are in the captions but in
no supervision: their pixels are 255 (ignore) in the label maps, they have no COCO annotation, and
their phrases have no boxes. The val split has everything.
Paths inside the files are relative to `out`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from ..io import atomic_path, write_text_atomic
from .synthetic import Scene, SyntheticWorld

SPLIT_OFFSETS = {"train": 0, "val": 1_000_000_000}  # scene indices of the splits never overlap
IGNORE = 255


def scene_index(split: str, i: int) -> int:
    return SPLIT_OFFSETS[split] + i


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _supervised_labels(world: SyntheticWorld, scene: Scene, hide_novel: bool) -> np.ndarray:
    labels = scene.semantic.copy()
    if hide_novel:
        for obj in scene.objects:
            if obj.category in world.novel:
                labels[obj.mask] = IGNORE
    return labels.astype(np.uint8)


def export_world(world: SyntheticWorld, out: str | Path, splits: dict[str, int] | None = None,
                 progress: bool = True) -> Path:
    """Generate and write `splits` ({'train': N, 'val': M}) of `world` under `out`; returns `out`."""
    out = Path(out)
    splits = splits or {"train": 1000, "val": 100}
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    write_text_atomic(out / "classes.txt", "\n".join(world.classes) + "\n")
    categories = [{"id": k + 1, "name": t, "split": "novel" if t in world.novel else "base"}
                  for k, t in enumerate(world.things)]
    for split, count in splits.items():
        hide_novel = split == "train"
        stems, coco_images, annotations, captions, grounding = [], [], [], [], []
        for i in tqdm(range(count), desc=f"synthetic {split}", disable=not progress, unit="img"):
            scene = world.scene(scene_index(split, i))
            stem = f"{split}_{i:06d}"
            image_path = f"images/{stem}.png"
            Image.fromarray(scene.image).save(out / image_path)
            Image.fromarray(_supervised_labels(world, scene, hide_novel)).save(out / "labels" / f"{stem}.png")
            stems.append(stem)
            height, width = scene.semantic.shape
            coco_images.append({"id": i + 1, "file_name": image_path, "height": height, "width": width})
            for obj in scene.objects:
                if hide_novel and obj.category in world.novel:
                    continue
                x0, y0, x1, y1 = obj.box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i + 1,
                    "category_id": world.things.index(obj.category) + 1, "segmentation": _rle(obj.mask),
                    "area": int(obj.mask.sum()), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
                    "attributes": {"colour": obj.colour, "size": obj.size}})
            for caption in scene.captions:
                captions.append({"image": image_path, "caption": caption.text})
                phrases = [{"text": p.text, "span": list(p.span), "category": p.category,
                            "boxes": [] if hide_novel and p.category in world.novel else p.boxes}
                           for p in caption.phrases]
                grounding.append({"image": image_path, "width": width, "height": height,
                                  "caption": caption.text, "phrases": phrases})
        write_text_atomic(out / f"{split}.txt", "\n".join(stems) + "\n")
        coco = {"images": coco_images, "annotations": annotations, "categories": categories}
        write_text_atomic(out / f"instances_{split}.json", json.dumps(coco))
        with atomic_path(out / f"captions_{split}.csv") as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t")
            writer.writerow(["filepath", "title"])
            writer.writerows((c["image"], c["caption"]) for c in captions)
        write_text_atomic(out / f"captions_{split}.jsonl", "".join(json.dumps(c) + "\n" for c in captions))
        write_text_atomic(out / f"grounding_{split}.jsonl", "".join(json.dumps(g) + "\n" for g in grounding))
    info = {"version": world.version, "seed": world.seed, "size": list(world.size), "max_objects": world.max_objects,
            "classes": world.classes, "stuff": list(world.stuff), "things": list(world.things),
            "base": world.base_things, "novel": list(world.novel), "splits": splits}
    write_text_atomic(out / "world.json", json.dumps(info, indent=2))
    return out
