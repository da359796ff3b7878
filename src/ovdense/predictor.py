"""The user-facing segmentation predictor: embed an image once, then ask any vocabulary."""
from __future__ import annotations

import logging
import re

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .backbones.loading import HF_CLIP, is_model_folder
from .data.images import load_image
from .data.synthetic import world_words
from .catalog import TRAINED_METHODS
from .device import resolve_device
from .methods import load_method, recommended_preset
from .errors import InputError, UsageError
from .ops import (PAMR, crop_padding, crop_windows, merge_windows, resize_image, short_side_size, sliding_windows,
                  upsampled_rows)
from .presets import Protocol, get_protocol
from .shipped import shipped
from .text import DEFAULT_CACHE, TextEmbeddingCache, Vocabulary, resolve_templates

logger = logging.getLogger(__name__)


@dataclass
class SegmentationResult:
    """One image's segmentation.

    labels: (H, W) int64 indices into `class_names`, at the image's resolution.
    scores: (K, h, w) class probabilities, at the labels' size or a smaller working size (or None).
    image: the (H, W, 3) uint8 input image, for `plot` and `save` (optional).
    """

    labels: np.ndarray
    scores: torch.Tensor | None
    class_names: list[str]
    image: np.ndarray | None = None

    def __repr__(self) -> str:
        height, width = self.labels.shape
        scores = "none" if self.scores is None else "x".join(map(str, self.scores.shape))
        return (f"SegmentationResult({width}x{height}, {len(self.class_names)} classes, scores {scores}, "
                f"image {'kept' if self.image is not None else 'none'})")

    def score_map(self, index: int) -> torch.Tensor | None:
        """(H, W) float32 scores of class `index` at the labels' size (bilinear up from a smaller map), or None."""
        if self.scores is None:
            return None
        plane = torch.as_tensor(self.scores[index]).detach().float().cpu()
        if tuple(plane.shape) != tuple(self.labels.shape):
            plane = F.interpolate(plane[None, None], size=tuple(self.labels.shape), mode="bilinear",
                                  align_corners=False)[0, 0]
        return plane

    def segments(self, rle: bool = True) -> list[dict]:
        """One dict per class present, by decreasing area: label, index, area (fraction of the image),
        score (mean probability over the segment; None without scores), box [x0, y0, x1, y1) and, with
        `rle`, the mask as COCO RLE {'size': [H, W], 'counts': str} (pycocotools.mask.decode reads it).
        """
        if rle:
            from pycocotools import mask as coco_mask
        labels = np.asarray(self.labels)
        present, counts = np.unique(labels, return_counts=True)
        out = []
        for index, count in zip(present.tolist(), counts.tolist()):
            if not 0 <= index < len(self.class_names):
                continue
            mask = labels == index
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            plane = self.score_map(index)
            segment = {
                "label": self.class_names[index],
                "index": index,
                "area": round(count / labels.size, 6),
                "score": None if plane is None else round(float(plane[torch.from_numpy(mask)].mean()), 6),
                "box": [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1],
            }
            if rle:
                encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
                segment["rle"] = {"size": [int(s) for s in encoded["size"]],
                                  "counts": encoded["counts"].decode("ascii")}
            out.append(segment)
        return sorted(out, key=lambda s: -s["area"])

    def summary(self, rle: bool = True) -> dict:
        """A JSON-serialisable dict: height, width, classes, segments (see `segments`)."""
        height, width = self.labels.shape
        return {"height": int(height), "width": int(width), "classes": list(self.class_names),
                "segments": self.segments(rle=rle)}

    def plot(self, image=None, **overlay_kwargs):
        """The overlay (a PIL image; see `ovdense.visualize.overlay`) on `image`, else on the stored image,
        else the class colours alone."""
        from .visualize import overlay
        return overlay(self.image if image is None else image, self.labels, self.class_names, **overlay_kwargs)

    def save(self, directory, stem: str = "result", metadata: dict | None = None, **overlay_kwargs
             ) -> dict[str, Path]:
        """Write <stem>_overlay.png, <stem>_labels.png (palette PNG of the labels) and <stem>.json (`metadata`, then
        the summary) into `directory`, each atomically; return their paths by kind ('overlay', 'labels', 'json')."""
        import json

        from .io import atomic_path
        from .visualize import label_image
        directory = Path(directory)
        paths = {"overlay": directory / f"{stem}_overlay.png", "labels": directory / f"{stem}_labels.png",
                 "json": directory / f"{stem}.json"}
        with atomic_path(paths["overlay"]) as over, atomic_path(paths["labels"]) as lab, \
                atomic_path(paths["json"]) as js:
            self.plot(**overlay_kwargs).save(over, format="PNG")
            label_image(self.labels, self.class_names).save(lab, format="PNG")
            js.write_text(json.dumps({**(metadata or {}), **self.summary()}, indent=2), encoding="utf-8")
        return paths


IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_BAND_ELEMENTS = 1 << 24  # floats per band of rows when labels are computed at full resolution (64 MB)


class SegmentationPredictor:
    """Open-vocabulary semantic segmentation, in the spirit of SamPredictor.

    `set_image` runs the image encoder over every sliding window once; `predict(vocabulary)` then
    only embeds the (cached) class names and combines them with the stored features, so asking
    many vocabularies of one image is cheap; `predict_batch` shares the encoder's forwards among many
    images. Memory grows with H x W, not with classes x H x W: scores stay at the working resolution
    and labels are computed a band of rows at a time.
    """

    def __init__(self, method, protocol: Protocol | str = "default", dataset: str | None = None,
                 cache: TextEmbeddingCache | None = None, batch_size: int = 8, max_pixels: int | None = None,
                 autocast: torch.dtype | None = None):
        if batch_size < 1:
            raise UsageError(f"batch_size (--batch-size) must be at least 1, got {batch_size}")
        self.method = method.eval()
        self.protocol = get_protocol(protocol).for_dataset(dataset)
        self.cache = cache if cache is not None else DEFAULT_CACHE
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.autocast = autocast  # encode crops in this lower precision (torch.float16 / torch.bfloat16)
        self._image = None
        self._warned: set[str] = set()  # names already warned about

    @property
    def backbone(self):
        return self.method.backbone

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @torch.no_grad()
    def set_image(self, image) -> None:
        """Read `image` (path, PIL image or (H, W[, C]) array), resize, crop windows and embed them."""
        self._image = self._embed([self._prepared(image)])[0]

    @torch.no_grad()
    def predict_batch(self, images: list, vocabularies: list, **overrides) -> list[SegmentationResult]:
        """Segment each image with its vocabulary. The windows of all the images go through the image encoder
        together (`batch_size` crops of one size per forward), so many small images cost few forwards; the rest
        is `predict`, image by image. The last image stays set."""
        if len(images) != len(vocabularies):
            raise UsageError(f"{len(images)} images but {len(vocabularies)} vocabularies")
        states, results = self._embed([self._prepared(image) for image in images]), []
        for i, vocabulary in enumerate(vocabularies):
            self._image, states[i] = states[i], None  # each image's features (and PAMR affinity) freed after its turn
            results.append(self.predict(vocabulary, **overrides))
        return results

    def _prepared(self, image) -> dict:
        """An image read, resized and normalised: {'rgb': (H, W, 3) uint8, 'pixels': (3, h, w), 'windows',
        'padding'}."""
        protocol = self.protocol
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        rgb = load_image(image, **kwargs)
        height, width = rgb.shape[:2]
        size = short_side_size(height, width, protocol.short_side)
        pixels = torch.from_numpy(rgb.copy()).to(self.device).permute(2, 0, 1).float()  # (3, H, W) in [0, 255]
        pixels = resize_image(pixels, size, protocol.antialias) / 255
        mean, std = IMAGENET_MEAN_STD if protocol.normalize == "imagenet" else (self.backbone.image_mean,
                                                                                self.backbone.image_std)
        pixels = (pixels - torch.tensor(mean, device=self.device)[:, None, None]) / torch.tensor(
            std, device=self.device)[:, None, None]
        windows = sliding_windows(*size, protocol.crop, protocol.stride)
        y0, y1, x0, x1 = windows[0]
        padding = crop_padding(y1 - y0, x1 - x0, self.backbone.stride, protocol.pad == "centre",
                               self.method.min_crop_patches)
        return {"rgb": rgb, "pixels": pixels, "windows": windows, "padding": padding}

    def _embed(self, images: list[dict]) -> list[dict]:
        """Prepared images with their windows embedded ('embedded': the method's features, a row per window).
        Crops of one padded size from any of the images share forwards, `batch_size` at a time."""
        by_size: dict[tuple[int, int], list[tuple[int, int]]] = {}  # padded crop size -> (image, window) pairs
        for i, image in enumerate(images):
            left, right, top, bottom = image["padding"]
            for w, (y0, y1, x0, x1) in enumerate(image["windows"]):
                by_size.setdefault((y1 - y0 + top + bottom, x1 - x0 + left + right), []).append((i, w))
        rows = [[None] * len(image["windows"]) for image in images]
        for pairs in by_size.values():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                crops = torch.cat([crop_windows(images[i]["pixels"], [images[i]["windows"][w]], images[i]["padding"])
                                   for i, w in chunk])
                with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    embedded = self.method.embed_crops(crops)
                for row, (i, w) in enumerate(chunk):
                    rows[i][w] = {key: value[row].float() for key, value in embedded.items()}
        return [{**image, "embedded": {key: torch.stack([row[key] for row in image_rows]) for key in image_rows[0]}}
                for image, image_rows in zip(images, rows)]

    def _warn_unknown_words(self, queries: list[str]) -> None:
        """The shipped CLIPs read only the synthetic world's captions: a name with other words gets a warning (once)."""
        if shipped("clip", self.backbone.name, self.backbone.weights) is None:
            return
        known = world_words()
        unknown = [q for q in queries if q not in self._warned and not set(re.findall(r"[a-z]+", q.lower())) <= known]
        if unknown:
            self._warned.update(unknown)
            logger.warning(f"{', '.join(repr(q) for q in unknown[:5])}: words {self.backbone.name} never read (it "
                           "knows only the synthetic world's captions); for real images use real CLIP weights, e.g. "
                           "--model ViT-B-16 --weights openai")

    @torch.no_grad()
    def predict(self, vocabulary: Vocabulary | str | list[str], **overrides) -> SegmentationResult:
        """Segment the current image with `vocabulary` ('cat, dog; puppy, grass', a list or a Vocabulary).

        overrides: Protocol fields to change for this call (e.g. background_threshold=0.3); those that act
        before the image encoder (short_side, crop, ...) need a new `set_image`.
        """
        if self._image is None:
            raise RuntimeError("call set_image(image) before predict(vocabulary)")
        protocol = self.protocol.updated(**overrides)
        vocab = Vocabulary.coerce(vocabulary)
        self._warn_unknown_words(vocab.queries)
        if protocol.background_threshold is not None:
            vocab = vocab.with_virtual_background() if protocol.virtual_background else vocab.with_background()
        if not vocab.queries:
            raise InputError("the vocabulary has no class to look for besides the background")
        text = self.method.embed_text(vocab.queries, resolve_templates(protocol.templates), self.cache).to(self.device)

        embedded, windows, pixels = self._image["embedded"], self._image["windows"], self._image["pixels"]
        logits = torch.cat([
            self.method.crop_logits({key: value[i:i + self.batch_size] for key, value in embedded.items()},
                                    text, protocol)
            for i in range(0, len(windows), self.batch_size)])
        working = tuple(pixels.shape[-2:])
        logits = merge_windows(logits, windows, working, self._image["padding"])  # (Q, h, w)
        if protocol.pamr_iterations > 0 and not (protocol.pamr_at == "mask" and self.method.pamr_on_masks):
            size = working
            if protocol.pamr_at == "original":  # the image's own size, long side at most 2048
                height, width = self._image["rgb"].shape[:2]
                size = short_side_size(height, width, min(height, width), max_long_side=2048)
            pamr = PAMR(protocol.pamr_iterations, protocol.pamr_dilations)
            image = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)
            affinities = self._image.setdefault("pamr_affinity", {})  # an image's affinities serve every vocabulary
            key = (size, pamr.dilations)
            if key not in affinities:
                affinities[key] = pamr.affinity(image)
            # the logits are resized to that size (align_corners=False) chunk by chunk inside PAMR
            logits = pamr(image, logits[None], align_corners=False, affinity=affinities[key])[0]
        kind = self.method.score_kind(protocol)
        if kind == "cosine":  # cosine similarities take the protocol's logit scale; trained heads' logits do not
            logits.mul_(protocol.logit_scale)  # a tensor of this call's own: scaled in place
        to_probabilities = partial(_class_probabilities, vocab=vocab, softmax=kind != "probability")
        labels = _assign_labels(logits, to_probabilities, self._image["rgb"].shape[:2], vocab.background, protocol)
        if tuple(logits.shape[-2:]) != working:  # PAMR ran at the original size: scores stay at the working size
            logits = F.interpolate(logits[None], size=working, mode="bilinear", align_corners=False, antialias=True)[0]
        return SegmentationResult(labels.cpu().numpy(), to_probabilities(logits).cpu(), vocab.names,
                                  image=self._image["rgb"])

    def __call__(self, image, vocabulary, **overrides) -> SegmentationResult:
        self.set_image(image)
        return self.predict(vocabulary, **overrides)


def _class_probabilities(logits: torch.Tensor, vocab: Vocabulary, softmax: bool = True) -> torch.Tensor:
    """(Q, h, w) query logits -> (K, h, w): softmax over queries, max over each class's synonyms (SCLIP).

    softmax=False: `logits` already are per-query probabilities; only the synonyms are merged.
    """
    probs = logits.softmax(dim=0) if softmax else logits
    owner = torch.tensor(vocab.query_to_class, device=logits.device)
    out = probs.new_zeros((len(vocab), *probs.shape[1:]))
    return out.scatter_reduce_(0, owner[:, None, None].expand_as(probs), probs, "amax", include_self=False)


def _assign_labels(logits: torch.Tensor, to_probabilities, size: tuple[int, int], background: int | None,
                   protocol: Protocol) -> torch.Tensor:
    """(Q, h, w) logits -> (H, W) labels at `size`, as the official code does it at full resolution (logits resized
    bilinearly, then probabilities, SCLIP's area threshold, argmax, background threshold), a band of rows at a
    time. to_probabilities: (Q, n, W) -> (K, n, W)."""
    rows = max(1, _BAND_ELEMENTS // (logits.shape[0] * size[1]))
    drop = None
    if protocol.area_threshold is not None:  # classes covering at most this share of the foreground are dropped
        areas = 0
        for _, band in upsampled_rows(logits, size, rows):
            probs = to_probabilities(band)
            areas = areas + torch.bincount(probs.argmax(dim=0).flatten(), minlength=len(probs)).float()
        foreground = torch.ones_like(areas, dtype=torch.bool)
        if background is not None:
            foreground[background] = False
        drop = foreground & (areas <= protocol.area_threshold * areas[foreground].sum())
    labels = torch.empty(size, dtype=torch.int64, device=logits.device)
    for start, band in upsampled_rows(logits, size, rows):
        probs = to_probabilities(band)
        if drop is not None:
            probs[drop] = 0
        best, band_labels = probs.max(dim=0)
        if protocol.background_threshold is not None and background is not None:
            band_labels[best < protocol.background_threshold] = background
        labels[start:start + len(band_labels)] = band_labels
    return labels


def build_predictor(model: str | None = None, weights: str | None = None, method: str = "maskclip",
                    mode: str | None = None, preset: Protocol | str | None = None, dataset: str | None = None,
                    device: str = "auto", checkpoint: str | None = None, **predictor_kwargs) -> SegmentationPredictor:
    """Load a method (a CLIP backbone, or a trained checkpoint) and wrap it in a predictor.

    model, weights: the CLIP (training-free default ViT-B-16 / openai; trained methods: the checkpoint's).
    mode: the dense-feature mode of training-free methods; by default the preset's, else 'maskclip'.
    preset: default the one the weights or checkpoint recommend, else 'default'.
    device: 'auto' (CUDA when present), 'cpu', 'cuda', ...
    """
    if method not in TRAINED_METHODS:
        weights = weights or "openai"
        model = model or (HF_CLIP if is_model_folder(weights) else "ViT-B-16")
    protocol = get_protocol(preset or recommended_preset(method, model, weights, checkpoint) or "default")
    segmenter = load_method(method, model, weights, mode or protocol.mode, checkpoint, str(resolve_device(device)))
    return SegmentationPredictor(segmenter, protocol, dataset=dataset, **predictor_kwargs)
