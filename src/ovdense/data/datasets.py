"""Semantic-segmentation datasets in their standard on-disk layouts (those of mmsegmentation).

Each dataset yields (image path, label map) pairs with labels in 0..K-1 and 255 = ignore, and
ships its class names (with the synonyms of the public training-free protocols) as a Vocabulary.

Layouts (`root` is the folder named in brackets):
  voc21, voc20     [VOCdevkit/VOC2012] JPEGImages/ID.jpg, SegmentationClass/ID.png, ImageSets/Segmentation/SPLIT.txt
  context60/59     [VOCdevkit/VOC2010] JPEGImages/ID.jpg, SegmentationClassContext/ID.png,
                   ImageSets/SegmentationContext/SPLIT.txt
  coco_stuff171    [coco_stuff164k] images/SPLIT2017/*.jpg, annotations/SPLIT2017/*_labelTrainIds.png
  coco_object      [coco_stuff164k] images/SPLIT2017/*.jpg, annotations/SPLIT2017/*_instanceTrainIds.png
  ade150           [ADEChallengeData2016] images/validation/*.jpg, annotations/validation/*.png
  cityscapes       [cityscapes] leftImg8bit/SPLIT/CITY/*_leftImg8bit.png, gtFine/SPLIT/CITY/*_gtFine_labelTrainIds.png
  folder           [any] images/*, labels/STEM.png (values = class index, 255 ignore), classes.txt,
                   SPLIT.txt listing stems; only when the folder has no .txt file besides classes.txt
                   does split 'val' (the default) take all images, with a warning

Problems with the data raise InputError naming the file: DatasetNotFoundError (also a FileNotFoundError)
for a missing root, list file, image or label map; InputError for an empty or duplicated class list, an
unreadable label map, or label values that are neither a class index nor 255.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import InputError, UsageError
from ..text import Vocabulary

logger = logging.getLogger(__name__)
IGNORE_INDEX = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class DatasetNotFoundError(InputError, FileNotFoundError):
    """A dataset folder, split list, image or label map that should exist does not."""


def _reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 (background / 'other') becomes ignore, every other class moves down by one."""
    label = label.astype(np.int64) - 1
    label[(label == -1) | (label == IGNORE_INDEX - 1)] = IGNORE_INDEX
    return label


def _identity(label: np.ndarray) -> np.ndarray:
    return label.astype(np.int64)


def _listed(root: Path, list_file: str, image_dir: str, label_dir: str, image_suffix=".jpg") -> list[tuple[Path, Path]]:
    if not (root / list_file).is_file():
        raise DatasetNotFoundError(f"the split list {root / list_file} does not exist")
    ids = (root / list_file).read_text().split()
    return [(root / image_dir / f"{i}{image_suffix}", root / label_dir / f"{i}.png") for i in ids]


def _paired(root: Path, image_glob: str, label_of: Callable[[Path], Path]) -> list[tuple[Path, Path]]:
    return [(image, label_of(image)) for image in sorted(root.glob(image_glob))]


def _voc(root: Path, split: str):
    return _listed(root, f"ImageSets/Segmentation/{split}.txt", "JPEGImages", "SegmentationClass")


def _context(root: Path, split: str):
    return _listed(root, f"ImageSets/SegmentationContext/{split}.txt", "JPEGImages", "SegmentationClassContext")


def _coco(suffix: str):
    def find(root: Path, split: str):
        return _paired(root, f"images/{split}2017/*.jpg",
                       lambda p: root / f"annotations/{split}2017" / f"{p.stem}_{suffix}.png")
    return find


def _ade(root: Path, split: str):
    folder = {"val": "validation", "train": "training"}.get(split, split)
    return _paired(root, f"images/{folder}/*.jpg", lambda p: root / f"annotations/{folder}" / f"{p.stem}.png")


def _cityscapes(root: Path, split: str):
    def label_of(p: Path) -> Path:
        stem = p.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        return root / "gtFine" / split / p.parent.name / stem
    return _paired(root, f"leftImg8bit/{split}/*/*_leftImg8bit.png", label_of)


def _folder(root: Path, split: str):
    if not (root / "images").is_dir():
        raise DatasetNotFoundError(f"the image folder {root / 'images'} does not exist")
    images = {p.stem: p for p in sorted((root / "images").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    split_file = root / f"{split}.txt"
    if split_file.is_file():
        stems = split_file.read_text().split()
    else:
        splits = sorted(p.name for p in root.glob("*.txt") if p.name != "classes.txt")
        if splits or split != "val":
            raise DatasetNotFoundError(f"the split list {split_file} does not exist (split lists there: "
                                       f"{', '.join(splits) or 'none'}); write one stem per line, or pick "
                                       f"another split")
        logger.warning(f"{root} has no split lists (e.g. val.txt): evaluating on all {len(images)} images")
        stems = list(images)
    missing = [s for s in stems if s not in images]
    if missing:
        raise DatasetNotFoundError(f"{root / 'images'} has no image for {', '.join(missing[:5])}"
                                   + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                                   + f" (listed in {split_file})")
    return [(images[s], root / "labels" / f"{s}.png") for s in stems]


@dataclass(frozen=True)
class DatasetSpec:
    """How to find one dataset's pairs, decode its labels, and name its classes."""

    find: Callable[[Path, str], list[tuple[Path, Path]]]
    decode: Callable[[np.ndarray], np.ndarray]
    classnames: str | None  # file in ovdense/data/classnames, None: root/classes.txt


DATASETS: dict[str, DatasetSpec] = {
    "voc21": DatasetSpec(_voc, _identity, "voc21"),
    "voc20": DatasetSpec(_voc, _reduce_zero_label, "voc20"),
    "context60": DatasetSpec(_context, _identity, "context60"),
    "context59": DatasetSpec(_context, _reduce_zero_label, "context59"),
    "coco_stuff171": DatasetSpec(_coco("labelTrainIds"), _identity, "coco_stuff171"),
    "coco_object": DatasetSpec(_coco("instanceTrainIds"), _identity, "coco_object"),
    "ade150": DatasetSpec(_ade, _reduce_zero_label, "ade150"),
    "cityscapes": DatasetSpec(_cityscapes, _identity, "cityscapes"),
    "folder": DatasetSpec(_folder, _identity, None),
}


def builtin_vocabulary(name: str) -> Vocabulary:
    """The shipped class names of a standard dataset ('voc21', 'ade150', ...)."""
    return Vocabulary.from_file(resources.files("ovdense.data") / "classnames" / f"{name}.txt")


class SegmentationDataset:
    """A list of (image path, label path) pairs with the dataset's label decoding and vocabulary.

    Every listed image and label map must exist; label values are checked as each map is read.
    """

    def __init__(self, name: str, root: str | Path, split: str = "val"):
        if name not in DATASETS:
            raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
        self.name, self.root, self.split = name, Path(root), split
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"dataset root {self.root} is not a folder")
        self.spec = DATASETS[name]
        try:
            self.items = self.spec.find(self.root, split)
        except DatasetNotFoundError as error:
            raise DatasetNotFoundError(f"{self.root} does not have the {name} layout "
                                       f"(see ovdense.data.datasets): {error}") from error
        if not self.items:
            raise DatasetNotFoundError(f"no {split} images of {name} found under {self.root} "
                                       f"(see the layouts in ovdense.data.datasets)")
        missing = [path for pair in self.items for path in pair if not path.is_file()]
        if missing:
            raise DatasetNotFoundError(f"{len(missing)} files of the {split} split of {name} are missing: "
                                       f"{', '.join(map(str, missing[:3]))}{' ...' if len(missing) > 3 else ''}")
        self.vocabulary = (builtin_vocabulary(self.spec.classnames) if self.spec.classnames
                           else _vocabulary_file(self.root / "classes.txt"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Path, np.ndarray]:
        """-> (image path, (H, W) int64 labels in 0..K-1 or 255)."""
        image, label = self.items[index]
        try:
            with Image.open(label) as png:
                raw = np.asarray(png)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise InputError(f"{label}: not a readable label map ({error})") from error
        if raw.ndim != 2:
            raise InputError(f"{label}: a label map must have one channel of class indices, not shape {raw.shape}")
        labels = self.spec.decode(raw)
        bad = ((labels < 0) | (labels >= len(self.vocabulary))) & (labels != IGNORE_INDEX)
        if bad.any():
            values = np.unique(raw[bad])
            listed = ", ".join(map(str, values[:10])) + (" ..." if len(values) > 10 else "")
            raise InputError(f"{label}: values {listed} are neither labels of the {len(self.vocabulary)} "
                             f"{self.name} classes nor {IGNORE_INDEX} (ignore)")
        return image, labels

    def check_size(self, index: int, image_size: tuple[int, int], labels: np.ndarray) -> None:
        """Raise InputError unless the (H, W) labels of item `index` match its image's (H, W) as loaded."""
        if tuple(labels.shape) != tuple(image_size):
            image, label = self.items[index]
            raise InputError(f"{label}: the label map is {labels.shape[1]}x{labels.shape[0]} (WxH) but its image "
                             f"{image} is {image_size[1]}x{image_size[0]}; label maps must match their images")


def _vocabulary_file(path: Path) -> Vocabulary:
    """The class list of a `folder` dataset, with errors that name the file."""
    if not path.is_file():
        raise DatasetNotFoundError(f"the class list {path} does not exist; write one class name per line")
    return Vocabulary.from_file(path)  # its errors name the file
