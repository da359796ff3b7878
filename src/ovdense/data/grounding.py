"""Grounding data in ovdense's JSONL (one caption per line: {"image", "caption", "phrases": [{"text", "span": [s, e],
"boxes": [[x0, y0, x1, y1], ...]}]}, images relative to the file) from MDETR's annotation files, which GLIP trains
and evaluates on (GoldG: final_mixed_train_no_coco.json, final_flickr_separateGT_train.json; Flickr30k Entities:
final_flickr_separateGT_{val,test}.json).

MDETR's files are COCO-style: each image entry is one (image, caption) pair with its `caption`; each annotation a box
(`bbox` x, y, w, h) with `tokens_positive` (character spans of the phrase naming it). Boxes whose spans are equal
make one phrase; a phrase's text is its spans' characters joined by spaces. Empty boxes (w or h <= 0) are left out,
as MDETR's own loader drops them (`datasets/coco.py`, `keep`), and the records' reader refuses them.

  python -m ovdense.data.grounding final_flickr_separateGT_test.json flickr30k/images flickr_test.jsonl
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

from ..errors import InputError
from ..io import write_text_atomic
from .detection import MISSING, box_problem, is_int, shown


def read_records(path: str | Path, check_images: bool = False) -> list[dict]:
    """The records of a grounding (or captions: no 'phrases') JSONL file, each checked by `check_record`, with its
    `image` made a path beside the file and, per phrase, `spans` (see `phrase_spans`) and `boxes` ([] if absent).
    check_images: each image file must exist. An unusable line is an InputError "PATH:LINE: ..." saying why."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"grounding file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"grounding file {path}: not readable UTF-8 text ({error})") from error
    records, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            check_record(record)
        except ValueError as error:  # json.JSONDecodeError is one
            raise InputError(f"{path}:{number}: not a grounding record ({error})") from error
        record["image"] = path.parent / record["image"]
        if check_images and record["image"] not in seen:
            if not record["image"].is_file():
                raise InputError(f"{path}:{number}: the image {record['image']} does not exist")
            seen.add(record["image"])
        for phrase in record.get("phrases") or []:
            phrase["spans"] = phrase_spans(phrase)
            phrase.setdefault("boxes", [])
        records.append(record)
    return records


def check_record(record: object) -> None:
    """ValueError saying what is wrong with one grounding record (a parsed JSONL line), if anything.

    A record is an object with 'image' (a non-empty string: the path relative to the file) and 'caption' (a
    non-empty string); 'phrases', where present and not null, is a list of objects with a non-empty 'text', its
    character spans ('spans': a non-empty list of [start, end] ints, else 'span': one) with 0 <= start < end <=
    len(caption) (a phrase in one piece must be those characters, case aside), and optionally 'boxes' (a list of
    [x0, y0, x1, y1], 4 finite numbers with x1 > x0 and y1 > y0) and 'type' / 'category' (strings: groups)."""
    if not isinstance(record, dict):
        raise ValueError(f"a line must be a JSON object, not {shown(record)}")
    for key in ("image", "caption"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"{key!r} must be a non-empty string, not {shown(record.get(key, MISSING))}")
    phrases = record.get("phrases")
    if phrases is not None and not isinstance(phrases, list):
        raise ValueError(f"'phrases' must be a list of phrase objects, not {shown(phrases)}")
    for k, phrase in enumerate(phrases or []):
        problem = _phrase_problem(phrase, record["caption"])
        if problem:
            raise ValueError(f"phrases[{k}]: {problem}")


def _phrase_problem(phrase: object, caption: str) -> str | None:
    """What is wrong with one phrase of a record whose caption is `caption` (see `check_record`), or None."""
    if not isinstance(phrase, dict):
        return f"must be an object with 'text', 'span' and 'boxes', not {shown(phrase)}"
    text = phrase.get("text", MISSING)
    if not isinstance(text, str) or not text.strip():
        return f"'text' must be a non-empty string, not {shown(text)}"
    key = "spans" if phrase.get("spans") else "span"
    spans = phrase[key] if key == "spans" else [phrase.get("span", MISSING)]
    if not isinstance(spans, list):
        return f"'spans' must be a list of [start, end] character offsets, not {shown(spans)}"
    for span in spans:
        if not (isinstance(span, list) and len(span) == 2 and all(map(is_int, span))):
            return f"{key!r} of {text!r}: {shown(span)} is not [start, end], two integers"
        start, end = span
        if not 0 <= start < end <= len(caption):
            return f"{key!r} of {text!r}: {start}:{end} is outside the caption (0:{len(caption)}) or empty"
    (start, end), *more = spans
    if not more and caption[start:end].lower() != text.lower():  # a phrase in one piece is its caption's characters
        return f"span {start}:{end} is not {text!r} but {caption[start:end]!r}"
    boxes = phrase.get("boxes", [])
    if not isinstance(boxes, list):
        return f"'boxes' of {text!r} must be a list of [x0, y0, x1, y1], not {shown(boxes)}"
    for b, box in enumerate(boxes):
        problem = box_problem(box, "xyxy")
        if problem:
            return f"boxes[{b}] of {text!r} {problem}"
    for key in ("type", "category"):
        if key in phrase and not isinstance(phrase[key], str):
            return f"{key!r} of {text!r} must be a string, not {shown(phrase[key])}"
    return None


def phrase_spans(phrase: dict) -> list[tuple[int, int]]:
    """A grounding record's phrase -> its character spans ('spans' when it has several, else 'span')."""
    return [(int(s), int(e)) for s, e in phrase.get("spans") or [phrase["span"]]]


def phrase_record(text: str, spans: list[tuple[int, int]], boxes: list[list[float]], **extra) -> dict:
    """A phrase as the JSONL holds it: its text, its first span and all of them ('spans'), its boxes, and `extra`."""
    return {"text": text, "span": list(spans[0]), "spans": [list(s) for s in spans], "boxes": boxes, **extra}


def record_prompt(record: dict):
    """A record read by `read_records` -> the GroundingPrompt of its caption and phrases (their known spans)."""
    # imported here: the ovdense.text package imports torch, this module does not
    from ..text.prompts import GroundingPrompt
    phrases = record["phrases"]
    return GroundingPrompt(record["caption"], [p["text"] for p in phrases], [p["spans"] for p in phrases])


def relative_image(image: str | Path, out: Path) -> str:
    """An image's path relative to the folder of the JSONL file `out` (how the files name their images)."""
    return os.path.relpath(Path(image).resolve(), out.parent.resolve())


def mdetr_to_jsonl(annotations: str | Path, images: str | Path, out: str | Path) -> int:
    """Write `out` from an MDETR annotation file whose images are in `images`; returns the number of captions."""
    annotations, images, out = Path(annotations), Path(images), Path(out)
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        boxes_of = defaultdict(list)
        for a in data["annotations"]:
            boxes_of[a["image_id"]].append(a)
        lines = []
        for entry in data["images"]:
            caption = entry["caption"]
            phrases: dict[tuple, list] = {}
            for a in boxes_of[entry["id"]]:
                x, y, w, h = a["bbox"]
                if w <= 0 or h <= 0:
                    continue
                phrases.setdefault(tuple(tuple(s) for s in a["tokens_positive"]), []).append([x, y, x + w, y + h])
            records = [phrase_record(" ".join(caption[s:e] for s, e in spans), spans, boxes)
                       for spans, boxes in phrases.items()]
            lines.append(json.dumps({"image": relative_image(images / entry["file_name"], out), "caption": caption,
                                     "phrases": records}))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{annotations}: not an MDETR annotation file ({error})") from error
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    return len(lines)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    print(f"{mdetr_to_jsonl(*sys.argv[1:])} captions -> {sys.argv[3]}")
