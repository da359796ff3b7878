"""RegionCLIP's three trainings with the shared engine (`ovdense train rpn|regionclip-pretrain|regionclip`):

  rpn                  a class-agnostic RPN on a frozen CLIP trunk, from base-class boxes (COCO JSON)
  regionclip-pretrain  region-text pretraining of the image tower from image-caption pairs (RPN frozen)
  regionclip           the open-vocabulary detector, trained on base-class boxes (RPN frozen)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..backbones import load_clip
from ..data.captions import pair_pixels, read_sources
from ..data.detection import DetectionDataset
from ..data.images import load_image
from ..detection.images import pad_batch, prepare_image
from ..detection.rpn import ProposalNetwork
from ..errors import InputError
from ..io import atomic_path
from ..methods.regionclip import RegionCLIPDetector, RegionCLIPPretrainer, RegionProposer
from . import checks
from .checks import within
from .recipe import MethodRecipe, check_synthesize, finish_run, start_run
from .trainer import Trainer, seeded


class BoxTrainingSet(torch.utils.data.Dataset):
    """Detection training items from a COCO-format dataset, only the `classes` given (e.g. the base split).

    sample(index, epoch) -> (image (3, h, w) resized to `short` / `max_size` and normalised, {'boxes': (G, 4) in
    the resized pixels, 'labels': (G,) indices into `classes`, 'size': (h, w)}); a horizontal flip with
    probability 1/2 and, when `short` is a list, the shortest edge (detectron2's 'choice' sampling) drawn from
    (seed, epoch, index). Crowd boxes are left out; images without boxes stay.
    """

    def __init__(self, dataset: DetectionDataset, classes: list[str], short: int | list[int], max_size: int, mean, std,
                 flip: bool = True, seed: int = 0):
        names = dataset.vocabulary.names
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise InputError(f"{dataset.path}: no category named {', '.join(map(repr, unknown))}")
        self.index_of = {dataset.category_ids[names.index(c)]: k for k, c in enumerate(classes)}
        self.dataset, self.short, self.max_size, self.mean, self.std = dataset, short, max_size, mean, std
        self.flip, self.seed = flip, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def sample(self, index: int, epoch: int):
        path, image_id = self.dataset[index]
        rgb = load_image(path)
        coco = self.dataset.coco
        annotations = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))  # LVIS has no iscrowd
                       if a["category_id"] in self.index_of and not a.get("iscrowd", 0)]
        boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                              for a in annotations], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.index_of[a["category_id"]] for a in annotations], dtype=torch.long)
        rng = np.random.default_rng([self.seed, epoch, index])
        image, boxes = training_view(rgb, boxes, self.short, self.max_size, self.mean, self.std, rng, self.flip)
        return image, {"boxes": boxes, "labels": labels, "size": torch.tensor(image.shape[1:])}

    def __getitem__(self, index: int):
        return self.sample(index, 0)


def _shortest_edge(short: int | list[int], rng: np.random.Generator) -> int:
    """A training image's shortest edge: `short`, or one of the list drawn with `rng`."""
    return short if isinstance(short, int) else int(rng.choice(short))


def training_view(rgb: np.ndarray, boxes: torch.Tensor, short: int | list[int], max_size: int, mean, std,
                  rng: np.random.Generator, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A training image and its (G, 4) xyxy boxes, resized (the shortest edge drawn with `rng` when `short` is a
    list), normalised, and, when `flip` allows, mirrored with probability 1/2 -> ((3, h, w), (G, 4) in its pixels)."""
    height, width = rgb.shape[:2]
    image = prepare_image(rgb, _shortest_edge(short, rng), max_size, mean, std)
    boxes = boxes * torch.tensor([image.shape[2] / width, image.shape[1] / height] * 2)
    if flip and rng.random() < 0.5:
        image = image.flip(-1)
        boxes = torch.stack([image.shape[2] - boxes[:, 2], boxes[:, 1], image.shape[2] - boxes[:, 0], boxes[:, 3]], 1)
    return image, boxes


def collate_boxes(items):
    images, targets = zip(*items)
    return pad_batch(list(images)), list(targets)


class CaptionedImages(torch.utils.data.Dataset):
    """Image-caption pairs (CSV / JSONL files, see `ovdense.data.captions`), one item per pair: sample(index,
    epoch) -> (image (3, h, w) resized and normalised, caption), flipped with probability 1/2; `short` as in
    BoxTrainingSet."""

    def __init__(self, sources: list[str], short: int | list[int], max_size: int, mean, std, seed: int = 0):
        self.pairs = read_sources(sources)
        self.short, self.max_size, self.mean, self.std, self.seed = short, max_size, mean, std, seed

    def __len__(self) -> int:
        return len(self.pairs)

    def sample(self, index: int, epoch: int):
        pair = self.pairs[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        image = prepare_image(pair_pixels(pair), _shortest_edge(self.short, rng), self.max_size, self.mean, self.std)
        if rng.random() < 0.5:
            image = image.flip(-1)
        return image, pair.caption


# --------------------------------------------------------------------------------------------- recipes
_DATA_KEYS = ("annotations", "images", "classes", "captions", "synthesize", "short", "max_size")


def _check_data(data, needs: str) -> dict:
    data = checks.mapping("data", data)
    with within("data."):
        checks.known_keys(data, _DATA_KEYS, "a RegionCLIP data section")
        if needs == "boxes":
            checks.text("annotations", checks.required(data, "annotations", "the data section (a COCO JSON)"))
        else:
            sources = checks.required(data, "captions", "the data section (caption files)")
            if not isinstance(sources, list) or not sources:
                raise InputError(f"captions: must be a list of caption files, got {sources!r}")
        if data.get("classes") is not None and not isinstance(data["classes"], (list, str)):
            raise InputError(f"classes: a list of category names or 'base', got {data['classes']!r}")
        short = data.get("short", 800)
        for size in short if isinstance(short, list) and short else [short]:
            checks.integer("short", size, minimum=16)
        checks.integer("max_size", data.get("max_size", 1333), minimum=16)
        if data.get("synthesize") is not None:
            check_synthesize(data["synthesize"])
    return data


def _classes(data: dict, dataset: DetectionDataset) -> list[str]:
    """The trained classes: data.classes, 'base' (the dataset's base split, the default) or 'all'."""
    chosen = data.get("classes", "base")
    if chosen == "all":
        return list(dataset.vocabulary.names)
    if chosen == "base":
        split = dataset.category_split
        if not split:
            raise InputError(f"data.classes: {dataset.path} has no base / novel split; list the classes to train")
        return [n for n, c in zip(dataset.vocabulary.names, dataset.category_ids) if split.get(c) == "base"]
    return list(chosen)


@dataclass
class RPNRecipe(MethodRecipe):
    """A class-agnostic RPN on the frozen trunk of `model` / `weights`. rpn: ProposalNetwork arguments.
    data: annotations (COCO JSON), images, classes ('base' default), short / max_size, synthesize."""

    rpn: dict = field(default_factory=dict)

    def check_keys(self) -> None:
        checks.arguments(self.rpn, ProposalNetwork.__init__, "rpn", exclude=("self", "in_channels"))
        _check_data(self.data, "boxes")


@dataclass
class PretrainRecipe(MethodRecipe):
    """RegionCLIP pretraining. model / weights: the teacher (and the student's start). rpn: a RegionProposer
    checkpoint. concepts: a file with one concept per line, or {'captions': ..., 'nouns': [...], 'min_count': N}
    (the caption words that are in `nouns`, seen at least N times). method: RegionCLIPPretrainer arguments."""

    rpn: str = ""
    concepts: str | dict = ""
    method: dict = field(default_factory=dict)

    def check_keys(self) -> None:
        checks.text("rpn", self.rpn)
        checks.arguments(self.method, RegionCLIPPretrainer.__init__, "method",
                         exclude=("self", "teacher", "concepts", "proposer"))
        if not isinstance(self.concepts, (str, dict)) or not self.concepts:
            raise InputError("concepts: a concept file, or {captions, nouns, min_count}")
        _check_data(self.data, "captions")


@dataclass
class DetectorRecipe(MethodRecipe):
    """The RegionCLIP detector. model / weights: the CLIP for the text tower and the RPN trunk; init: a
    RegionCLIP-pretrained CLIP file whose image tower starts the detector (default: the CLIP's own); rpn: a
    RegionProposer checkpoint on the same CLIP; method: RegionCLIPDetector arguments."""

    init: str | None = None
    rpn: str = ""
    method: dict = field(default_factory=dict)
    eval: dict | None = None

    def check_keys(self) -> None:
        checks.text("rpn", self.rpn)
        checks.arguments(self.method, RegionCLIPDetector.__init__, "method",
                         exclude=("self", "clip", "class_names", "rpn", "init"))
        _check_data(self.data, "boxes")


def concept_pool(spec: str | dict) -> list[str]:
    """The concept pool: one concept per line of a file (as RegionCLIP's released pools), or the `nouns` (words or
    compounds, plural 's' allowed) that the captions use at least `min_count` times, most frequent first
    (RegionCLIP parses the nouns of its captions with a parser; a closed list of nouns stands in for it here)."""
    if isinstance(spec, str):
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"concepts: {path} does not exist")
        concepts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        import re
        nouns = [n.lower() for n in spec.get("nouns", [])]
        patterns = {n: re.compile(rf"\b{re.escape(n)}s?\b") for n in nouns}
        counts = dict.fromkeys(nouns, 0)
        for pair in read_sources(spec["captions"], progress=False):
            caption = pair.caption.lower()
            for noun, pattern in patterns.items():
                counts[noun] += len(pattern.findall(caption))
        concepts = [n for n, c in sorted(counts.items(), key=lambda x: -x[1]) if c >= spec.get("min_count", 1)]
    if not concepts:
        raise InputError("concepts: the concept pool is empty")
    return list(dict.fromkeys(concepts))


def _wrapped(method: str):
    class Losses(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *batch):
            return getattr(self.model, method)(*batch)
    return Losses


def _box_data(recipe, clip, seed: int) -> tuple[BoxTrainingSet, list[str]]:
    data = recipe.data
    dataset = DetectionDataset(data["annotations"], data.get("images"))
    classes = _classes(data, dataset)
    return BoxTrainingSet(dataset, classes, data.get("short", 800), data.get("max_size", 1333), clip.image_mean,
                          clip.image_std, seed=seed), classes


def train_rpn(recipe: RPNRecipe, out_dir, device: str = "cpu", resume: bool = True, max_steps: int | None = None,
              progress: bool = True):
    out_dir, export, config = start_run(recipe, out_dir, "rpn", resume, progress)
    clip = load_clip(recipe.model, recipe.weights, device=device)
    with within(f"{recipe.source or 'RPNRecipe'}: "):
        data, _ = _box_data(recipe, clip, config.seed)
    with seeded(config.seed):
        model = RegionProposer(clip, **recipe.rpn)
    run = {"method": "rpn", "recipe": recipe.source, "model": {"model": recipe.model, "weights": recipe.weights}}
    trainer = Trainer(_wrapped("losses")(model), lambda m, b: m(*b), data, config, out_dir, collate=collate_boxes,
                      device=device, progress=progress, run=run)
    trainer.fit(resume=resume, max_steps=max_steps)
    saved = finish_run(trainer, export, lambda: model.save(export))
    return model.eval(), saved


def train_pretrain(recipe: PretrainRecipe, out_dir, device: str = "cpu", resume: bool = True,
                   max_steps: int | None = None, progress: bool = True):
    """Region-text pretraining; exports the pretrained CLIP (student image tower + text tower, open_clip keys,
    safetensors), usable as --weights anywhere and as a detector recipe's `init`."""
    from safetensors.torch import save_file
    out_dir, export, config = start_run(recipe, out_dir, "regionclip-pretrain", resume, progress)
    teacher = load_clip(recipe.model, recipe.weights, device=device)
    proposer = RegionProposer.from_checkpoint(recipe.rpn, device=device)
    if (proposer.clip.name, proposer.clip.weights) != (teacher.name, teacher.weights):
        raise InputError(f"rpn: {recipe.rpn} runs on {proposer.clip.identity}, not on the teacher {teacher.identity}")
    data = recipe.data
    pairs = CaptionedImages(data["captions"], data.get("short", 800), data.get("max_size", 1333), teacher.image_mean,
                            teacher.image_std, seed=config.seed)
    concepts = concept_pool(recipe.concepts)
    model = RegionCLIPPretrainer(teacher, concepts, proposer, **recipe.method)

    def collate(items):
        images, captions = zip(*items)
        return pad_batch(list(images)), teacher.tokenize(list(captions), truncate=True), \
            [tuple(i.shape[1:]) for i in images]

    run = {"method": "regionclip-pretrain", "recipe": recipe.source,
           "model": {"model": recipe.model, "weights": recipe.weights, "concepts": len(concepts)}}
    trainer = Trainer(_wrapped("losses")(model), lambda m, b: m(*b), pairs, config, out_dir, collate=collate,
                      device=device, progress=progress, run=run, find_unused_parameters=True)
    trainer.fit(resume=resume, max_steps=max_steps)

    def save():
        with atomic_path(export) as tmp:
            save_file({k: v.detach().contiguous() for k, v in model.student_clip_state().items()}, str(tmp),
                      metadata={"model": recipe.model, "regionclip_pretrained_from": recipe.weights,
                                "concepts": json.dumps(concepts), "steps": str(trainer.step)})
    saved = finish_run(trainer, export, save)
    return model.eval(), saved


def build_detector(recipe: DetectorRecipe, clip, class_names: list[str], device: str) -> RegionCLIPDetector:
    proposer = RegionProposer.from_checkpoint(recipe.rpn, device=device)
    if (proposer.clip.name, proposer.clip.weights) != (clip.name, clip.weights):
        raise InputError(f"rpn: {recipe.rpn} runs on {proposer.clip.identity}, not on {clip.identity}")
    init = load_clip(recipe.model, recipe.init, device=device) if recipe.init else None
    with seeded(recipe.train_config().seed):
        detector = RegionCLIPDetector(clip, class_names, rpn=proposer.config, init=init, **recipe.method)
    detector.proposals.load_state_dict(proposer.network.state_dict())
    return detector


def train_detector(recipe: DetectorRecipe, out_dir, device: str = "cpu", resume: bool = True,
                   max_steps: int | None = None, progress: bool = True):
    out_dir, export, config = start_run(recipe, out_dir, "regionclip", resume, progress)
    clip = load_clip(recipe.model, recipe.weights, device=device)
    with within(f"{recipe.source or 'DetectorRecipe'}: "):
        data, classes = _box_data(recipe, clip, config.seed)
    model = build_detector(recipe, clip, classes, device)
    run = {"method": "regionclip", "recipe": recipe.source,
           "model": {"model": recipe.model, "weights": recipe.weights, "init": recipe.init, "method": model.config}}
    trainer = Trainer(_wrapped("losses")(model), lambda m, b: m(*b), data, config, out_dir, collate=collate_boxes,
                      device=device, progress=progress, run=run, find_unused_parameters=True)
    trainer.fit(resume=resume, max_steps=max_steps)
    saved = finish_run(trainer, export, lambda: model.save(export, preset=(recipe.eval or {}).get("preset")))
    return model.eval(), saved

