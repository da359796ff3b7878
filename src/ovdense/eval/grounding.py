"""Phrase-grounding recall, Flickr30k Entities' protocol as GLIP's `flickr_eval.py` computes it (ANY-box).

Each phrase with ground-truth boxes counts once per caption: it is recalled at k when one of its k best-scoring
predicted boxes has IoU >= 0.5 with any of its boxes (GLIP's default 'separate' boxes; a phrase without a prediction
is a miss). R@any: any of its predictions (GLIP's upper bound). Groups: a phrase's "type" (Flickr's phrase types) or,
for ovdense's synthetic world (a world.json beside the file), base / novel things and stuff.

Input: grounding JSONL as `ovdense.data.export` writes it: {"image", "caption", "phrases": [{"text", "span": [s, e],
"boxes": [[x0, y0, x1, y1], ...], "type"?}]}; images relative to the file.
"""
from __future__ import annotations

import json
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torchvision.ops import box_iou
from tqdm import tqdm

from ..data.grounding import read_records, record_prompt
from ..distributed import init_distributed
from ..errors import InputError
from .detection import pipe_table

KS = (1, 5, 10)
IOU = 0.5


def read_grounding(path: str | Path, check_images: bool = False) -> tuple[list[dict], dict[str, str]]:
    """The records of a grounding JSONL file (checked by `ovdense.data.grounding.read_records`; check_images: each
    image file must exist) and, when a synthetic world.json lies beside it, each thing or stuff name's group ('base',
    'novel', 'stuff'). InputError naming the file, and the line, for anything unusable."""
    path = Path(path)
    records = read_records(path, check_images=check_images)
    groups = {}
    world = path.parent / "world.json"
    if world.is_file():
        try:
            info = json.loads(world.read_text(encoding="utf-8"))
            groups = {**{n: "stuff" for n in info["stuff"]}, **{n: "base" for n in info["base"]},
                      **{n: "novel" for n in info["novel"]}}
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"{world}: not the synthetic world's description, whose 'stuff', 'base' and 'novel' "
                             f"list the names of each group ({error!r})") from error
    return records, groups


def phrase_hits(predicted: torch.Tensor, truth: torch.Tensor, ks=KS) -> list[bool]:
    """predicted (N, 4) boxes best first, truth (G, 4) -> for each k of `ks` and then 'any', whether one of the k best
    predictions overlaps a true box at IoU >= 0.5."""
    if not len(predicted):
        return [False] * (len(ks) + 1)
    good = box_iou(predicted, truth).amax(dim=1) >= IOU
    return [bool(good[:k].any()) for k in ks] + [bool(good.any())]


def grounding_hits(predictor, records: list[dict], groups: dict[str, str], progress: bool = True
                   ) -> list[tuple[int, str, list[bool]]]:
    """For each phrase with boxes of `records` (in order): (its record's index, its group ('' when none), its
    `phrase_hits`), from `predictor` (a GroundingPredictor), each image set once for its run of captions."""
    rows = []
    last_image = None
    for index, record in enumerate(tqdm(records, desc="eval grounding", disable=not progress, unit="cap")):
        if record["image"] != last_image:
            predictor.set_image(record["image"])
            last_image = record["image"]
        result = predictor.ground_prompt(record_prompt(record))
        for phrase_index, phrase in enumerate(record["phrases"]):
            if not phrase["boxes"]:
                continue
            mine = result.boxes[result.labels == phrase_index]  # best first
            group = phrase.get("type") or groups.get(phrase.get("category"), "")
            rows.append((index, group, phrase_hits(mine, torch.tensor(phrase["boxes"], dtype=torch.float32))))
    return rows


def evaluate_grounding(predictor, path: str | Path, limit: int | None = None, progress: bool = True) -> dict:
    """R@1, R@5, R@10 and R@any (percent) of `predictor` (a GroundingPredictor) over the phrases of the first `limit`
    captions of a grounding file, overall and per group (e.g. 'R@1_novel'), with the phrase counts. Under torchrun
    each rank takes every WORLD_SIZE-th caption."""
    records, groups = read_grounding(path)
    records = records[:limit]
    rank, world = init_distributed()
    rows = [(group, hits) for _, group, hits in
            grounding_hits(predictor, records[rank::world], groups, progress=progress and rank == 0)]
    if world > 1:
        gathered = [None] * world
        with torch.cuda.device(predictor.device) if predictor.device.type == "cuda" else nullcontext():
            dist.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    if not rows:
        raise InputError(f"{path}: no phrase with boxes to evaluate")
    by_group = defaultdict(list)
    for group, hits in rows:
        by_group[""].append(hits)
        if group:
            by_group[group].append(hits)
    metrics = {}
    names = [f"R@{k}" for k in KS] + ["R@any"]
    for group, hits in sorted(by_group.items()):
        suffix = f"_{group}" if group else ""
        for i, name in enumerate(names):
            metrics[name + suffix] = 100.0 * sum(h[i] for h in hits) / len(hits)
        metrics["phrases" + suffix] = len(hits)
    return metrics


def format_grounding_metrics(metrics: dict) -> str:
    """The metrics of `evaluate_grounding` as a table (see `ovdense.eval.detection.pipe_table`): a row for all
    phrases, then one per group present; columns the group, its phrase count, R@1, R@5, R@10 and R@any."""
    names = [f"R@{k}" for k in KS] + ["R@any"]
    rows = []
    for group in [""] + sorted(key[len("phrases_"):] for key in metrics if key.startswith("phrases_")):
        suffix = f"_{group}" if group else ""
        rows.append([group or "all", metrics["phrases" + suffix], *(metrics[name + suffix] for name in names)])
    return "Phrase grounding recall (%):\n" + pipe_table(["group", "phrases", *names], rows, "left")
