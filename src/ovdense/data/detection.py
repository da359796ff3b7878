"""Detection datasets: a COCO-format (or LVIS v1) instances JSON and the folder its images are in.

Image paths: COCO's `file_name`, else (LVIS v1) the last two parts of `coco_url` (e.g. val2017/000000397133.jpg),
relative to the image folder (default: the JSON's folder). Base / novel categories, in this order of precedence:
a category's own 'split' field (our synthetic export writes it); LVIS: rare = novel, common and frequent = base;
COCO names: the OVR-CNN split (48 base, 17 novel; the 15 other COCO classes are in neither).
"""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

from pycocotools.coco import COCO

from ..errors import InputError
from ..text import ClassSpec, Vocabulary
from .datasets import DatasetNotFoundError

OV_COCO_NOVEL = ("airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
                 "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors")
OV_COCO_BASE = ("person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
                "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite",
                "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
                "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave",
                "oven", "toaster", "refrigerator", "book", "clock", "vase", "toothbrush")
SPLITS = ("base", "novel")


class DetectionDataset:
    """COCO / LVIS v1 instances annotations; item i is (image path, image id), in increasing image-id order.

    coco: the pycocotools COCO index. vocabulary: the category names in category-id order (LVIS 'baseball_bat'
    shown as 'baseball bat'); category_ids: the ids in the same order. category_split: {category id: 'base' |
    'novel'} for the categories of an open-vocabulary split ({} when there is none). is_lvis: LVIS v1 annotations
    (categories with 'frequency' or images with 'neg_category_ids'), evaluated with the federated rules.
    """

    def __init__(self, annotations: str | Path, images: str | Path | None = None):
        self.path = Path(annotations)
        self.images = Path(images) if images is not None else self.path.parent
        self.name = self.path.stem
        if not self.path.is_file():
            raise DatasetNotFoundError(f"the annotations file {self.path} does not exist")
        if not self.images.is_dir():
            raise DatasetNotFoundError(f"the image folder {self.images} is not a folder")
        self.coco = _load_coco(self.path)
        categories = sorted(self.coco.dataset["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.is_lvis = (any("frequency" in c for c in categories)
                        or any("neg_category_ids" in i for i in self.coco.dataset["images"]))
        names = [c["name"].replace("_", " ") if self.is_lvis else c["name"] for c in categories]
        try:
            self.vocabulary = Vocabulary(tuple(ClassSpec(n, (n,)) for n in names))
        except ValueError as error:
            raise InputError(f"{self.path}: the category names cannot be a vocabulary: {error}") from error
        self.category_split = _category_split(categories, self.is_lvis, self.path)
        self.items = [(self.images / _relative_path(self.coco.imgs[i], self.path), i) for i in sorted(self.coco.imgs)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Path, int]:
        """-> (image path, image id)."""
        return self.items[index]


def _load_coco(path: Path) -> COCO:
    """The pycocotools index of the instances JSON `path`, built quietly; InputError naming the file if malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({error})") from error
    if not isinstance(data, dict):
        raise InputError(f"{path}: not COCO instances annotations (the JSON is not an object)")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise InputError(f"{path}: not COCO instances annotations (no {' / '.join(map(repr, missing))} list)")
    if not data["categories"]:
        raise InputError(f"{path}: the 'categories' list is empty")
    if not all(isinstance(c, dict) and "id" in c and "name" in c for c in data["categories"]):
        raise InputError(f"{path}: every category needs an 'id' and a 'name'")
    coco = COCO()
    coco.dataset = data
    try:
        with redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise InputError(f"{path}: malformed COCO annotations (an entry lacks {error})") from error
    return coco


def _relative_path(image: dict, path: Path) -> str:
    """An image entry's path relative to the image folder: COCO `file_name`, else LVIS `coco_url`'s last two parts."""
    if "file_name" in image:
        return image["file_name"]
    if "coco_url" in image:
        return "/".join(image["coco_url"].split("/")[-2:])
    raise InputError(f"{path}: image {image['id']} has neither 'file_name' nor 'coco_url'")


def _category_split(categories: list[dict], is_lvis: bool, path: Path) -> dict[int, str]:
    """{category id: 'base' | 'novel'} by the rules in the module docstring."""
    if any("split" in c for c in categories):
        split = {c["id"]: c["split"] for c in categories if "split" in c}
        bad = sorted({s for s in split.values() if s not in SPLITS}, key=str)
        if bad:
            raise InputError(f"{path}: a category's 'split' must be 'base' or 'novel', not {', '.join(map(repr, bad))}")
        return split
    if is_lvis:
        return {c["id"]: "novel" if c.get("frequency") == "r" else "base" for c in categories}
    ids = {c["name"]: c["id"] for c in categories}
    if set(OV_COCO_BASE + OV_COCO_NOVEL) <= ids.keys():
        return {ids[n]: "base" for n in OV_COCO_BASE} | {ids[n]: "novel" for n in OV_COCO_NOVEL}
    return {}
