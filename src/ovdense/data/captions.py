"""Image-caption pairs for caption-supervised training (TCL), in the formats such data comes in.

Sources (a list may mix them):
  *.csv / *.tsv   open_clip's layout: a header row, image path and caption columns ('filepath' and
                  'title' by default; tab-separated unless the file ends in .csv and has no tab)
  *.jsonl         one object per line: {"image": path, "caption": text, "phrases": [...]?}
                  ('phrases': strings or {"text": ...} objects, e.g. ovdense's grounding files)
  *.tar           webdataset shards (CC3M / CC12M as img2dataset writes them): files sharing a key,
                  KEY.jpg|png|webp and KEY.txt (or KEY.json with a "caption"); brace ranges
                  'cc-{000000..001175}.tar' and globs are expanded
Image paths inside CSV / JSONL files are relative to the file's folder.

Items are (normalised image (3, S, S), text): a random-resized crop (a pure function of the item
index, so that resumed runs see the same pixels) and either the caption or one of its noun phrases.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .images import load_image, to_tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# A light chunker for noun phrases: phrases end at these words (prepositions, conjunctions, common verbs)
# and at punctuation; leading determiners and numbers are kept out.
_BREAKS = set("""
about above across after against along among and around as at before behind below beneath beside besides between
beyond but by down during for from in inside into is are was were be been being has have had near next of off on
onto or out outside over past through to toward towards under underneath up upon with within without while that
which who whose where when there their its his her it they them he she we you i this these those holding sitting
standing walking running playing looking lying riding wearing eating using showing taking made left right
""".split())
_DETERMINERS = set("a an the some two three four five several many one each every another other".split())


def phrase_spans(caption: str, max_words: int | None = 4, determiners: bool = False) -> list[tuple[int, int]]:
    """Character spans [start, end) of a caption's noun phrases by a rule-based chunker, in order.

    Words are split at prepositions, conjunctions, common verbs and punctuation; leading determiners and numbers
    are left out unless `determiners` (GLIP's grammar keeps one: 'NP: {<DT>?<JJ.*>*<NN.*>+}'); chunks longer than
    `max_words` keep their last words (the head noun comes last in English).
    """
    spans, chunk, content = [], [], False
    for match in re.finditer(r"[A-Za-z][A-Za-z'\-]*|[,.;:!?()]+", caption + "."):
        word = match.group().lower()
        if word in _BREAKS or not word[0].isalpha():
            if content:  # a chunk of determiners alone ('the' of 'to the left of') is no phrase
                spans.append((chunk[0][0], chunk[-1][1]))
            chunk, content = [], False
        elif word not in _DETERMINERS or chunk or determiners:
            chunk.append(match.span())
            chunk = chunk[-max_words:] if max_words else chunk
            content = content or word not in _DETERMINERS
    return spans


def noun_phrases(caption: str, max_words: int = 4) -> list[str]:
    """Short noun phrases of a caption (see `phrase_spans`), lower-cased and without repeats:
    'a red star on the grass' -> ['red star', 'grass']."""
    words = (re.findall(r"[A-Za-z][A-Za-z'\-]*", caption[s:e]) for s, e in phrase_spans(caption, max_words))
    return list(dict.fromkeys(" ".join(w).lower() for w in words))


@dataclass
class ImageText:
    """One pair: where the image is (a path, or a tar shard with the member's offset and size) and its texts."""

    image: str
    caption: str
    phrases: list[str]
    offset: int = -1
    size: int = 0


def _phrase_texts(record: dict) -> list[str]:
    return [p["text"] if isinstance(p, dict) else str(p) for p in record.get("phrases", [])]


def read_csv(path: Path, image_key: str = "filepath", caption_key: str = "title") -> list[ImageText]:
    text = path.read_text(encoding="utf-8")
    delimiter = "," if path.suffix == ".csv" and "\t" not in text.split("\n", 1)[0] else "\t"
    rows = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if rows.fieldnames is None or image_key not in rows.fieldnames or caption_key not in rows.fieldnames:
        raise ValueError(f"{path}: expected columns {image_key!r} and {caption_key!r}, found {rows.fieldnames}")
    return [ImageText(str(path.parent / r[image_key]), r[caption_key], []) for r in rows]


def read_jsonl(path: Path) -> list[ImageText]:
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            items.append(ImageText(str(path.parent / record["image"]), record["caption"], _phrase_texts(record)))
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{path}:{number}: expected {{\"image\": ..., \"caption\": ...}} ({error})") from error
    return items


def read_shard(path: Path) -> list[ImageText]:
    """Index a webdataset tar shard: one ImageText per key that has an image and a caption."""
    images, captions = {}, {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            extension = "." + extension.lower()
            if extension in IMAGE_EXTENSIONS:
                images[key] = (member.offset_data, member.size)
            elif extension in (".txt", ".json"):
                raw = tar.extractfile(member).read().decode("utf-8")
                captions[key] = json.loads(raw).get("caption", "") if extension == ".json" else raw.strip()
    return [ImageText(str(path), captions[k], [], *images[k]) for k in images if captions.get(k)]


def expand_sources(pattern: str) -> list[Path]:
    """'cc-{000000..000002}.tar' -> the three shard paths; globs are expanded; a plain path stays."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if match:
        first, last = match.groups()
        names = [pattern[:match.start()] + str(i).zfill(len(first)) + pattern[match.end():]
                 for i in range(int(first), int(last) + 1)]
    else:
        names = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    paths = [Path(n) for n in names]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"caption data not found: {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return paths


def read_sources(sources: list[str], progress: bool = True) -> list[ImageText]:
    """All pairs of the given CSV / JSONL files and tar shards (patterns expanded)."""
    paths = [p for s in sources for p in expand_sources(s)]
    items = []
    for path in tqdm(paths, desc="index captions", disable=not progress or len(paths) < 4, unit="file"):
        suffix = path.suffix.lower()
        reader = {".csv": read_csv, ".tsv": read_csv, ".jsonl": read_jsonl, ".tar": read_shard}.get(suffix)
        if reader is None:
            raise ValueError(f"{path}: caption data must be .csv, .tsv, .jsonl or .tar (webdataset)")
        items.extend(reader(path))
    if not items:
        raise ValueError(f"no image-caption pairs in {sources}")
    return items


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """A crop of `image` (H, W, 3) covering a random `scale` fraction of its area with a random aspect ratio."""
    height, width = image.shape[:2]
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w, h = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return image[y:y + h, x:x + w]
    side = min(height, width)  # fall back to the central square
    y, x = (height - side) // 2, (width - side) // 2
    return image[y:y + side, x:x + side]


def pair_pixels(item: ImageText) -> np.ndarray:
    """The (H, W, 3) uint8 image of a pair, from its file or its tar shard."""
    if item.offset < 0:
        return load_image(item.image)
    with open(item.image, "rb") as handle:
        handle.seek(item.offset)
        return load_image(Image.open(io.BytesIO(handle.read(item.size))))


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style dataset over `read_sources(sources)`: item i -> (image (3, size, size), text).

    text: 'caption' (the whole caption) or 'phrase' (one of its noun phrases, the given ones or
        `noun_phrases`, chosen by the item index; captions without any phrase give the caption).
    scale: the random-resized-crop area range; (1, 1) keeps the whole image.
    """

    def __init__(self, sources: list[str], image_size: int, mean, std, text: str = "caption",
                 scale: tuple[float, float] = (0.5, 1.0), seed: int = 0, progress: bool = True):
        if text not in ("caption", "phrase"):
            raise ValueError(f"text must be 'caption' or 'phrase', not {text!r}")
        self.items = read_sources(sources, progress)
        self.image_size, self.mean, self.std = image_size, mean, std
        self.text, self.scale, self.seed = text, tuple(scale), seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        item = self.items[index]
        rng = np.random.default_rng([self.seed, index])
        image = pair_pixels(item)
        if self.scale != (1.0, 1.0):
            image = random_resized_crop(image, rng, self.scale)
        text = item.caption
        if self.text == "phrase":
            phrases = item.phrases or noun_phrases(item.caption)
            text = phrases[int(rng.integers(len(phrases)))] if phrases else item.caption
        return to_tensor(image, self.mean, self.std, self.image_size), text
