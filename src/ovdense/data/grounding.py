"""Grounding data in ovdense's JSONL (one caption per line: {"image", "caption", "phrases": [{"text", "span": [s, e],
"boxes": [[x0, y0, x1, y1], ...]}]}, images relative to the file) from MDETR's annotation files, which GLIP trains
and evaluates on (GoldG: final_mixed_train_no_coco.json, final_flickr_separateGT_train.json; Flickr30k Entities:
final_flickr_separateGT_{val,test}.json).

MDETR's files are COCO-style: each image entry is one (image, caption) pair with its `caption`; each annotation a box
(`bbox` x, y, w, h) with `tokens_positive` (character spans of the phrase naming it). Boxes whose spans are equal
make one phrase; a phrase's text is its spans' characters joined by spaces.

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


def read_records(path: str | Path) -> list[dict]:
    """The records of a grounding (or captions) JSONL file, each with its `image` made a path beside the file and, per
    phrase, `spans` (see `phrase_spans`) checked to lie in the caption; an unusable line is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"grounding file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record["image"] = path.parent / record["image"]
            for phrase in record.get("phrases") or []:
                phrase["spans"] = phrase_spans(phrase)
                if not all(0 <= start < end <= len(record["caption"]) for start, end in phrase["spans"]):
                    raise ValueError(f"a span of {phrase['text']!r} is outside the caption")
                if len(phrase["spans"]) == 1:  # a phrase in one piece is its caption's characters
                    start, end = phrase["spans"][0]
                    if record["caption"][start:end].lower() != phrase["text"].lower():
                        raise ValueError(f"span {start}:{end} is not {phrase['text']!r}")
                phrase.setdefault("boxes", [])
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}:{number}: not a grounding record ({error})") from error
        records.append(record)
    return records


def phrase_spans(phrase: dict) -> list[tuple[int, int]]:
    """A grounding record's phrase -> its character spans ('spans' when it has several, else 'span')."""
    return [(int(s), int(e)) for s, e in phrase.get("spans") or [phrase["span"]]]


def phrase_record(text: str, spans: list[tuple[int, int]], boxes: list[list[float]], **extra) -> dict:
    """A phrase as the JSONL holds it: its text, its first span and all of them ('spans'), its boxes, and `extra`."""
    return {"text": text, "span": list(spans[0]), "spans": [list(s) for s in spans], "boxes": boxes, **extra}


def record_prompt(record: dict):
    """A record read by `read_records` -> the GroundingPrompt of its caption and phrases (their known spans)."""
    from ..detection.grounding import GroundingPrompt
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
