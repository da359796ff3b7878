"""GLIP training with the shared engine (`ovdense train glip`): detection data turned into grounding prompts, and
grounding data (captions whose phrases carry boxes, gold or a teacher's pseudo-labels), in one stream.

Sources (the recipe's `data`):
  detection  COCO JSONs; each image's prompt is its positive classes and sampled negatives, shuffled (GLIP's
             `od_to_grounding`); `classes` picks the trained categories ('base' by default)
  grounding  JSONL files as `ovdense.data.export` writes them: {"image", "caption", "phrases": [{"text", "span",
             "boxes"}]}; a caption with an unboxed phrase is left out unless `allow_unboxed` (pseudo-label files
             list only what the teacher found)
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbones import load_clip
from ..data.detection import DetectionDataset, box_problem
from ..data.grounding import phrase_record, read_records, record_prompt, relative_image
from ..data.images import load_image
from ..detection.grounding import positive_map, training_prompt
from ..detection.images import pad_batch
from ..errors import InputError
from ..methods.glip import GLIPDetector
from . import checks
from .checks import within
from .recipe import MethodRecipe, check_synthesize, finish_run, start_run
from .regionclip_train import _classes, _wrapped, training_view
from .trainer import Trainer, seeded

_RELATIONS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


@dataclass
class GroundingItem:
    """What one training image needs: the image file, its caption (None: build one from `classes`), its boxes
    (continuous xyxy in the file's pixels) and, per box, its phrase's character spans or its class name."""

    image: Path
    caption: str | None
    boxes: list[list[float]]
    spans: list[list[tuple[int, int]]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)


def grounding_items(path: str | Path, allow_unboxed: bool = False) -> list[GroundingItem]:
    """The captions of a grounding JSONL file; a box named by several phrases takes all their spans."""
    items = []
    for record in read_records(path):
        phrases = record.get("phrases") or []
        if not phrases or (not allow_unboxed and any(not p["boxes"] for p in phrases)):
            continue
        by_box: dict[tuple, list] = {}
        for phrase in phrases:
            for box in phrase["boxes"]:
                by_box.setdefault(tuple(float(v) for v in box), []).extend(phrase["spans"])
        items.append(GroundingItem(record["image"], record["caption"], [list(b) for b in by_box],
                                   list(by_box.values())))
    return items


def detection_items(dataset: DetectionDataset, classes: list[str]) -> list[GroundingItem]:
    """Every image of a COCO dataset with its boxes of `classes` (crowd boxes left out; images without boxes stay)."""
    names = dict(zip(dataset.category_ids, dataset.vocabulary.names))
    wanted = set(classes)
    coco = dataset.coco
    items = []
    for index in range(len(dataset)):
        path, image_id = dataset[index]
        annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))  # LVIS has no iscrowd
                       if names.get(a["category_id"]) in wanted and not a.get("iscrowd", 0)]
        items.append(GroundingItem(path, None, [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                                 a["bbox"][1] + a["bbox"][3]] for a in annotations],
                                   classes=[names[a["category_id"]] for a in annotations]))
    return items


class GroundingTrainingSet(torch.utils.data.Dataset):
    """GLIP training items: sample(index, epoch) -> (image (3, h, w) resized and normalised, caption, boxes (G, 4)
    continuous xyxy in the resized pixels, per box its character spans in the caption).

    Detection items get a fresh prompt (positives and negatives from `pool`) drawn from (seed, epoch, index); their
    boxes whose class did not fit the prompt are dropped. Images are flipped with probability 1/2, except captions
    that say 'left' or 'right' (GLIP flips those too, teaching the wrong side).
    """

    def __init__(self, items: list[GroundingItem], pool: list[str], count_tokens, max_tokens: int,
                 short: int | list[int], max_size: int, mean, std, negatives: int = 85, seed: int = 0):
        self.items, self.pool, self.count_tokens, self.max_tokens = items, pool, count_tokens, max_tokens
        self.short, self.max_size, self.mean, self.std, self.negatives, self.seed = short, max_size, mean, std, \
            negatives, seed

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int, epoch: int):
        item = self.items[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        boxes = torch.tensor(item.boxes, dtype=torch.float32).reshape(-1, 4)
        if item.caption is None:
            prompt = training_prompt(list(dict.fromkeys(item.classes)), self.pool, self.count_tokens,
                                     self.max_tokens, rng, self.negatives)
            where = {name: spans for name, spans in zip(prompt.phrases, prompt.spans)}
            keep = [k for k, name in enumerate(item.classes) if name in where]
            caption, spans = prompt.caption, [where[item.classes[k]] for k in keep]
            boxes = boxes[keep]
        else:
            caption, spans = item.caption, item.spans
        image, boxes = training_view(load_image(item.image), boxes, self.short, self.max_size, self.mean, self.std,
                                     rng, flip=not _RELATIONS.search(caption))
        return image, caption, boxes, spans

    def __getitem__(self, index: int):
        return self.sample(index, 0)


def grounding_collate(tokenize):
    """A collate function: items -> (padded images (B, 3, H, W) multiple of 32, TokenizedText, targets [{'boxes',
    'positive_map': (G_i, T) bool}]); boxes whose phrase lost all its tokens to truncation are dropped."""
    def collate(items):
        images, captions, boxes, spans = zip(*items)
        text = tokenize(list(captions), truncate=True)
        targets = []
        for offsets, b, s in zip(text.offsets, boxes, spans):
            token_map = positive_map(offsets, s, text.ids.shape[1])
            keep = token_map.any(dim=1)
            targets.append({"boxes": b[keep], "positive_map": token_map[keep]})
        return pad_batch(list(images), 32), text, targets
    return collate


# --------------------------------------------------------------------------------------------------- recipe
_DATA_KEYS = ("detection", "grounding", "synthesize", "short", "max_size", "negatives")
_DETECTION_KEYS = ("annotations", "images", "classes")
_GROUNDING_KEYS = ("path", "allow_unboxed")


@dataclass
class GLIPRecipe(MethodRecipe):
    """GLIP training. model / weights: the CLIP whose towers start the backbone and the text encoder (null for GLIP-T:
    Swin-T and BERT); init: a GLIP checkpoint to start from; method: GLIPDetector arguments; data: see the module."""

    init: str | None = None
    method: dict = field(default_factory=dict)
    eval: dict | None = None

    def check_model(self) -> None:
        """The method first: it says whether there is a CLIP to check (`needs_clip`)."""
        checks.arguments(self.method, GLIPDetector.__init__, "method", exclude=("self", "clip"))
        if self.needs_clip:
            super().check_model()

    def check_keys(self) -> None:
        data = checks.mapping("data", self.data)
        with within("data."):
            checks.known_keys(data, _DATA_KEYS, "a GLIP data section")
            if not data.get("detection") and not data.get("grounding"):
                raise InputError("give detection (COCO JSONs) or grounding (JSONL files) sources, or both")
            for i, source in enumerate(checks.sequence("detection", data.get("detection") or [])):
                checks.mapping(f"detection[{i}]", source)
                with within(f"detection[{i}]."):
                    checks.known_keys(source, _DETECTION_KEYS, "a COCO source")
                    checks.text("annotations", source.get("annotations"))
                    classes = source.get("classes", "base")
                    if not isinstance(classes, (list, str)):
                        raise InputError(f"classes: a list of category names, 'base' or 'all', got {classes!r}")
            for i, source in enumerate(checks.sequence("grounding", data.get("grounding") or [])):
                checks.mapping(f"grounding[{i}]", source)
                with within(f"grounding[{i}]."):
                    checks.known_keys(source, _GROUNDING_KEYS, "a grounding JSONL source")
                    checks.text("path", source.get("path"))
                    checks.boolean("allow_unboxed", source.get("allow_unboxed", False))
            short = data.get("short", 800)
            for size in short if isinstance(short, list) and short else [short]:
                checks.integer("short", size, minimum=16)
            checks.integer("max_size", data.get("max_size", 1333), minimum=16)
            checks.integer("negatives", data.get("negatives", 85), minimum=0)
            if data.get("synthesize") is not None:
                check_synthesize(data["synthesize"])

    @property
    def needs_clip(self) -> bool:
        return "clip" in (self.method.get("image", "clip"), self.method.get("text", "clip"))


def _training_items(data: dict) -> tuple[list[GroundingItem], list[str]]:
    items, pool = [], []
    for source in data.get("detection") or []:
        dataset = DetectionDataset(source["annotations"], source.get("images"))
        classes = _classes(source, dataset)
        items += detection_items(dataset, classes)
        pool += [c for c in classes if c not in pool]
    for source in data.get("grounding") or []:
        items += grounding_items(source["path"], source.get("allow_unboxed", False))
    if not items:
        raise InputError("the data sources hold no training image")
    return items, pool


def build_glip(recipe: GLIPRecipe, device: str) -> GLIPDetector:
    if recipe.init:
        method = {k: v for k, v in recipe.method.items() if k != "prompt_tuning"}
        model = GLIPDetector.from_checkpoint(recipe.init, device=device, **method)
        if recipe.method.get("prompt_tuning"):
            model.tune_prompts()
        if (model.backbone.name, model.backbone.weights) != (recipe.model, recipe.weights):
            raise InputError(f"init: {recipe.init} is built on {model.backbone.name}/{model.backbone.weights}, not "
                             f"{recipe.model}/{recipe.weights}")
        return model.train()
    clip = load_clip(recipe.model, recipe.weights, device=device) if recipe.needs_clip else None
    with seeded(recipe.train_config().seed):
        return GLIPDetector(clip, **recipe.method).to(device)


def train_glip(recipe: GLIPRecipe, out_dir, device: str = "cpu", resume: bool = True, max_steps: int | None = None,
               progress: bool = True):
    out_dir, export, config = start_run(recipe, out_dir, "glip", resume, progress)
    model = build_glip(recipe, device)
    data = recipe.data
    with within(f"{recipe.source or 'GLIPRecipe'}: data."):
        items, pool = _training_items(data)
    dataset = GroundingTrainingSet(items, pool, model.count_tokens, model.max_tokens, data.get("short", 800),
                                   data.get("max_size", 1333), model.image_mean, model.image_std,
                                   data.get("negatives", 85), config.seed)
    run = {"method": "glip", "recipe": recipe.source,
           "model": {"model": recipe.model, "weights": recipe.weights, "init": recipe.init, "method": model.config}}
    trainer = Trainer(_wrapped("losses")(model), lambda m, b: m(*b), dataset, config, out_dir,
                      collate=grounding_collate(model.tokenize), device=device, progress=progress, run=run,
                      find_unused_parameters=True)
    trainer.fit(resume=resume, max_steps=max_steps)
    saved = finish_run(trainer, export, lambda: model.save(export, preset=(recipe.eval or {}).get("preset")))
    return model.eval(), saved


# ------------------------------------------------------------------------------------------ pseudo-labels
def pseudo_label(predictor, path: str | Path, out: str | Path, threshold: float = 0.5, skip_boxed: bool = False,
                 chunker: str = "auto", progress: bool = True) -> dict[str, int]:
    """GLIP's self-training data: a teacher (a GroundingPredictor) grounds the phrases of captions and keeps its boxes
    scoring above `threshold`; a caption where it keeps none is dropped (at least one box per caption).

    path: a grounding JSONL (its phrase spans are used, its boxes ignored) or a captions JSONL ({"image", "caption"}:
    phrases by `chunker`). skip_boxed: leave out captions whose phrases all have boxes already (gold data).
    Writes `out` (a grounding JSONL, images relative to it) atomically; returns counts of captions read, kept and
    boxes written.
    """
    from tqdm import tqdm

    from ..detection.grounding import caption_prompt
    from ..io import write_text_atomic
    out = Path(out)
    lines, counts, last = [], {"captions": 0, "kept": 0, "boxes": 0}, None
    for record in tqdm(read_records(path), desc="pseudo-label", disable=not progress, unit="cap"):
        phrases = record.get("phrases")
        if skip_boxed and phrases is not None and all(p["boxes"] for p in phrases):
            continue
        counts["captions"] += 1
        prompt = caption_prompt(record["caption"], chunker=chunker) if phrases is None else record_prompt(record)
        if not prompt.spans:
            continue
        if record["image"] != last:
            predictor.set_image(record["image"])
            last = record["image"]
        result = predictor.ground_prompt(prompt).above(threshold)
        if not len(result):
            continue
        found = [phrase_record(text, spans, [], scores=[]) for text, spans in zip(prompt.phrases, prompt.spans)]
        kept = 0
        for box, score, label in zip(result.boxes.tolist(), result.scores.tolist(), result.labels.tolist()):
            box = [round(v, 2) for v in box]
            if box_problem(box, "xyxy") is None:  # a sliver that rounds to nothing is no box to learn from
                found[label]["boxes"].append(box)
                found[label]["scores"].append(round(score, 4))
                kept += 1
        if not kept:
            continue
        lines.append(json.dumps({"image": relative_image(record["image"], out), "caption": prompt.caption,
                                 "phrases": found}))
        counts["kept"] += 1
        counts["boxes"] += kept
    write_text_atomic(out, "".join(line + "\n" for line in lines))
    return counts
