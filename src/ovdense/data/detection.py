"""Detection datasets: a COCO-format (or LVIS v1) instances JSON and the folder its images are in.

Image paths: COCO's `file_name`, else (LVIS v1) the last two parts of `coco_url` (e.g. val2017/000000397133.jpg),
relative to the image folder (default: the JSON's folder). Base / novel categories, in this order of precedence:
a category's own 'split' field (our synthetic export writes it); LVIS: rare = novel, common and frequent = base;
COCO names: the OVR-CNN split (48 base, 17 novel; the 15 other COCO classes are in neither).

The JSON is checked when it is read (`check_instances`), so that a broken file is an InputError naming the file,
the entry and the problem before any model work, instead of a crash or a silently different score.
"""
from __future__ import annotations

import io
import json
import math
import numbers
import reprlib
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
        self.is_lvis = is_lvis(self.coco.dataset)
        names = [display_name(c["name"], self.is_lvis) for c in categories]
        try:
            self.vocabulary = Vocabulary(tuple(ClassSpec(n, (n,)) for n in names))
        except ValueError as error:
            raise InputError(f"{self.path}: the category names cannot be a vocabulary: {error}") from error
        self.category_split = _category_split(categories, self.is_lvis, self.path)
        self.items = [(self.images / _relative_path(self.coco.imgs[i]), i) for i in sorted(self.coco.imgs)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Path, int]:
        """-> (image path, image id)."""
        return self.items[index]


def is_lvis(data: dict) -> bool:
    """Whether instances JSON `data` is LVIS v1 (categories with 'frequency' or images with 'neg_category_ids')."""
    return (any("frequency" in c for c in data["categories"])
            or any("neg_category_ids" in i for i in data["images"]))


def display_name(name: str, lvis: bool) -> str:
    """A category's name as the vocabulary shows it: LVIS 'baseball_bat' -> 'baseball bat'."""
    return name.replace("_", " ") if lvis else name


def _load_coco(path: Path) -> COCO:
    """The pycocotools index of the instances JSON `path` (checked by `check_instances`), built quietly."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({error})") from error
    check_instances(data, path)
    coco = COCO()
    coco.dataset = data
    with redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def check_instances(data: object, path: Path) -> None:
    """InputError "PATH: annotations[5] (id 6): ..." for the first entry of a COCO / LVIS v1 instances JSON (parsed:
    `data`) that the evaluators would crash on or silently score wrong.

    Structure: an object with lists 'images', 'annotations', 'categories' of objects, the first and last non-empty.
    Every entry: an int 'id' (not a bool), unique in its list. Categories: 'name' a non-empty string, unique as the
    vocabulary compares names (case-insensitive; LVIS '_' read as ' '); 'frequency' r, c or f where present. Images:
    'file_name' (or LVIS 'coco_url') a non-empty string; 'width' / 'height' positive ints where present; LVIS
    'neg_category_ids' / 'not_exhaustive_category_ids' lists of known category ids. Annotations: 'image_id' and
    'category_id' known ids; 'bbox' [x, y, w, h], 4 finite numbers with w > 0 and h > 0; 'area' a finite number >= 0
    (COCOeval's size ranges read it; faster-coco-eval takes a missing one as 0, pycocotools fails); 'iscrowd' 0 or 1,
    required outside LVIS (whose annotations have none; pycocotools needs it).
    """
    if not isinstance(data, dict):
        raise InputError(f"{path}: not COCO instances annotations (the JSON is not an object)")
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data.get(key), list)]
    if missing:
        raise InputError(f"{path}: not COCO instances annotations (no {' / '.join(map(repr, missing))} list)")
    for key in ("categories", "images"):
        if not data[key]:
            raise InputError(f"{path}: the {key!r} list is empty")
    index = {key: _check_ids(data[key], key, path) for key in ("categories", "images", "annotations")}
    lvis = is_lvis(data)
    names: dict[str, int] = {}
    for k, category in enumerate(data["categories"]):
        name = category.get("name", MISSING)
        if not isinstance(name, str) or not name.strip():
            _fail(path, "categories", k, category, f"'name' must be a non-empty string, not {shown(name)}")
        other = names.setdefault(display_name(name, lvis).strip().lower(), k)
        if other != k:
            _fail(path, "categories", k, category, f"{_name('categories', other, data['categories'][other])} has "
                  f"the name {data['categories'][other]['name']!r} too; category names must be unique")
        if "frequency" in category and category["frequency"] not in ("r", "c", "f"):
            _fail(path, "categories", k, category,
                  f"'frequency' must be 'r', 'c' or 'f' (LVIS), not {shown(category['frequency'])}")
    for k, image in enumerate(data["images"]):
        _check_image(image, k, index["categories"], path)
    for k, annotation in enumerate(data["annotations"]):
        _check_annotation(annotation, k, index, lvis, path)


def _check_ids(entries: list, key: str, path: Path) -> dict[int, int]:
    """{id: position} of a list of entries; InputError for an entry that is not an object, or an id that is not an
    int or repeats one before it."""
    positions: dict[int, int] = {}
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"{path}: {key}[{k}]: must be an object, not {shown(entry)}")
        if not is_int(entry.get("id")):
            _fail(path, key, k, entry, f"'id' must be an integer, not {shown(entry.get('id', MISSING))}")
        first = positions.setdefault(entry["id"], k)
        if first != k:
            _fail(path, key, k, entry, f"{key}[{first}] has id {entry['id']} too; ids must be unique in {key!r}")
    return positions


def _check_image(image: dict, k: int, categories: dict[int, int], path: Path) -> None:
    """The checks of `check_instances` on images[k]."""
    where = "file_name" if "file_name" in image else "coco_url" if "coco_url" in image else None
    if where is None:
        _fail(path, "images", k, image, "needs a 'file_name' (or LVIS's 'coco_url')")
    if not isinstance(image[where], str) or not image[where].strip():
        _fail(path, "images", k, image, f"{where!r} must be a non-empty string, not {shown(image[where])}")
    for size in ("width", "height"):
        if size in image and not (is_int(image[size]) and image[size] > 0):
            _fail(path, "images", k, image, f"{size!r} must be a positive integer, not {shown(image[size])}")
    for key in ("neg_category_ids", "not_exhaustive_category_ids"):
        ids = image.get(key, [])
        if not isinstance(ids, list):
            _fail(path, "images", k, image, f"{key!r} must be a list of category ids, not {shown(ids)}")
        unknown = [c for c in ids if not is_int(c) or c not in categories]
        if unknown:
            _fail(path, "images", k, image, f"{key!r} holds {shown(unknown[0])}, which is not a category id")


def _check_annotation(annotation: dict, k: int, index: dict[str, dict[int, int]], lvis: bool, path: Path) -> None:
    """The checks of `check_instances` on annotations[k]; index: {list name: {id: position}}."""
    for key, known in (("image_id", "images"), ("category_id", "categories")):
        value = annotation.get(key, MISSING)
        if not is_int(value) or value not in index[known]:
            _fail(path, "annotations", k, annotation,
                  f"{key!r} must be the id of one of the {known}, not {shown(value)}")
    problem = box_problem(annotation.get("bbox", MISSING), "xywh")
    if problem:
        _fail(path, "annotations", k, annotation, f"bbox {problem}")
    area = annotation.get("area", MISSING)
    if not (is_finite_number(area) and area >= 0):
        _fail(path, "annotations", k, annotation, f"'area' must be a finite number >= 0, not {shown(area)}")
    if "iscrowd" in annotation or not lvis:
        crowd = annotation.get("iscrowd", MISSING)
        if not (is_int(crowd) and crowd in (0, 1)):
            _fail(path, "annotations", k, annotation, f"'iscrowd' must be 0 or 1, not {shown(crowd)}")


def _fail(path: Path, key: str, k: int, entry: dict, problem: str):
    """Raise the InputError of `check_instances` about entry k of list `key`."""
    raise InputError(f"{path}: {_name(key, k, entry)}: {problem}")


def _name(key: str, k: int, entry: dict) -> str:
    """'images[3] (id 17)': how messages name entry k of list `key`."""
    return f"{key}[{k}] (id {entry['id']})" if is_int(entry.get("id")) else f"{key}[{k}]"


def is_int(value: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return type(value) is int or (isinstance(value, numbers.Integral) and not isinstance(value, bool))  # int: fast


def is_finite_number(value: object) -> bool:
    """A finite real number (Python or NumPy), not a bool (nor a string that reads as a number)."""
    return ((type(value) in (float, int) or (isinstance(value, numbers.Real) and not isinstance(value, bool)))
            and math.isfinite(value))


def box_problem(box: object, form: str, empty_ok: bool = False) -> str | None:
    """What is wrong with a box, or None. A box is a list (or tuple) of 4 finite numbers: form 'xywh' (COCO
    [x, y, w, h]) with w > 0 and h > 0, or 'xyxy' ([x0, y0, x1, y1]) with x1 > x0 and y1 > y0; empty_ok: >= instead."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(map(is_finite_number, box))):
        return f"must be {_LAYOUT[form]}, 4 finite numbers, not {shown(box)}"
    x, y, a, b = box
    sizes = {"width": a, "height": b} if form == "xywh" else {"width": a - x, "height": b - y}
    if min(sizes.values()) > 0 or (empty_ok and min(sizes.values()) == 0):
        return None
    side = next(side for side, size in sizes.items() if size < 0 or (size == 0 and not empty_ok))
    rule = side if form == "xywh" else {"width": "x1 - x0", "height": "y1 - y0"}[side]
    return (f"{shown(list(box))} has {side} {sizes[side]:g}; {_LAYOUT[form]} needs {rule} "
            f"{'>=' if empty_ok else '>'} 0")


_LAYOUT = {"xywh": "[x, y, width, height]", "xyxy": "[x0, y0, x1, y1]"}


class _Missing:
    """What `shown` calls a key that is absent (`entry.get(key, MISSING)`), unlike a JSON null."""

    def __repr__(self) -> str:
        return "missing"


MISSING = _Missing()
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist = 40, 40, 6


def shown(value: object) -> str:
    """A short repr of a value for an error message: JSON's word 'null' for None, 'missing' for MISSING."""
    return "null" if value is None else _SHORT.repr(value)


def _relative_path(image: dict) -> str:
    """An image entry's path relative to the image folder: COCO `file_name`, else LVIS `coco_url`'s last two parts."""
    if "file_name" in image:
        return image["file_name"]
    return "/".join(image["coco_url"].split("/")[-2:])


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
