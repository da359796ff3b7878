"""The user-facing segmentation predictor: embed an image once, then ask any vocabulary."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .data.images import load_image
from .methods import load_method
from .ops import PAMR, crop_windows, merge_windows, short_side_size, sliding_windows
from .presets import Protocol, get_protocol
from .text import DEFAULT_CACHE, TextEmbeddingCache, Vocabulary, resolve_templates


@dataclass
class SegmentationResult:
    """labels: (H, W) int64 indices into `class_names`; scores: (K, H, W) class probabilities."""

    labels: np.ndarray
    scores: torch.Tensor
    class_names: list[str]

    def segments(self) -> list[dict]:
        """One dict per class present: label, index, area (fraction of the image), score (mean probability), box."""
        out = []
        total = self.labels.size
        for index in np.unique(self.labels):
            mask = self.labels == index
            ys, xs = np.nonzero(mask)
            out.append({
                "label": self.class_names[index],
                "index": int(index),
                "area": round(float(mask.sum()) / total, 6),
                "score": round(float(self.scores[index][torch.from_numpy(mask)].mean()), 6),
                "box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
            })
        return sorted(out, key=lambda s: -s["area"])


class SegmentationPredictor:
    """Open-vocabulary semantic segmentation of one image at a time, in the spirit of SamPredictor.

    `set_image` runs the image encoder over every sliding window once; `predict(vocabulary)` then
    only embeds the (cached) class names and combines them with the stored features, so asking
    many vocabularies of one image is cheap.
    """

    def __init__(self, method, protocol: Protocol | str = "default", dataset: str | None = None,
                 cache: TextEmbeddingCache | None = None, batch_size: int = 8, max_pixels: int | None = None):
        self.method = method.eval()
        self.protocol = get_protocol(protocol).for_dataset(dataset)
        self.cache = cache if cache is not None else DEFAULT_CACHE
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self._image = None

    @property
    def backbone(self):
        return self.method.backbone

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @torch.no_grad()
    def set_image(self, image) -> None:
        """Read `image` (path, PIL image or (H, W[, C]) array), resize, crop windows and embed them."""
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        rgb = load_image(image, **kwargs)
        height, width = rgb.shape[:2]
        pixels = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div(255).to(self.device)  # (3, H, W) in [0, 1]
        size = short_side_size(height, width, self.protocol.short_side)
        if size != (height, width):
            pixels = F.interpolate(pixels[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        mean = torch.tensor(self.backbone.image_mean, device=self.device)[:, None, None]
        std = torch.tensor(self.backbone.image_std, device=self.device)[:, None, None]
        windows = sliding_windows(*size, self.protocol.crop, self.protocol.stride)
        crops = crop_windows((pixels - mean) / std, windows)
        parts = [self.method.embed_crops(crops[i:i + self.batch_size]) for i in range(0, len(crops), self.batch_size)]
        embedded = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
        self._image = {"size": (height, width), "pixels": pixels, "windows": windows, "embedded": embedded}

    @torch.no_grad()
    def predict(self, vocabulary: Vocabulary | str | list[str], **overrides) -> SegmentationResult:
        """Segment the current image with `vocabulary` ('cat, dog; puppy, grass', a list or a Vocabulary).

        overrides: Protocol fields to change for this call (e.g. background_threshold=0.3).
        """
        if self._image is None:
            raise RuntimeError("call set_image(image) before predict(vocabulary)")
        protocol = self.protocol.updated(**overrides)
        vocab = Vocabulary.coerce(vocabulary)
        if protocol.background_threshold is not None:
            vocab = vocab.with_background()
        if not vocab.queries:
            raise ValueError("the vocabulary has no class to look for besides the background")
        text = self.method.embed_text(vocab.queries, resolve_templates(protocol.templates), self.cache).to(self.device)

        embedded, windows = self._image["embedded"], self._image["windows"]
        logits = torch.cat([
            self.method.crop_logits({key: value[i:i + self.batch_size] for key, value in embedded.items()},
                                    text, protocol)
            for i in range(0, len(windows), self.batch_size)])
        pixels = self._image["pixels"]
        logits = merge_windows(logits, windows, tuple(pixels.shape[-2:]))  # (Q, h, w)
        if protocol.pamr_iterations > 0:
            logits = PAMR(protocol.pamr_iterations, protocol.pamr_dilations)(pixels[None], logits[None])[0]
        if self.method.scores == "probability":  # per-query masks in [0, 1] (TCL): no softmax, no scale
            scores = self._class_probabilities(logits, vocab, protocol.prompt_denoising, softmax=False)
        else:  # cosine similarities take the protocol's logit scale; a trained head's logits (DenseCLIP) do not
            scale = protocol.logit_scale if self.method.scores == "cosine" else 1.0
            scores = self._class_probabilities(logits * scale, vocab, protocol.prompt_denoising)
        scores = F.interpolate(scores[None], size=self._image["size"], mode="bilinear", align_corners=False)[0]
        labels = _assign_labels(scores, vocab.background, protocol)
        return SegmentationResult(labels.cpu().numpy(), scores.cpu(), vocab.names)

    def __call__(self, image, vocabulary, **overrides) -> SegmentationResult:
        self.set_image(image)
        return self.predict(vocabulary, **overrides)

    @staticmethod
    def _class_probabilities(scaled: torch.Tensor, vocab: Vocabulary, denoise: float, softmax: bool = True
                             ) -> torch.Tensor:
        """(Q, h, w) scaled query logits -> (K, h, w): softmax over queries, max over each class's synonyms.

        With prompt denoising, classes whose best probability is under `denoise` leave the softmax.
        softmax=False: `scaled` already holds per-query probabilities; only the synonyms are merged.
        """
        owner = torch.tensor(vocab.query_to_class, device=scaled.device)

        def per_class(probs: torch.Tensor) -> torch.Tensor:
            out = probs.new_zeros((len(vocab), *probs.shape[1:]))
            return out.scatter_reduce_(0, owner[:, None, None].expand_as(probs), probs, "amax")

        if not softmax:
            return per_class(scaled)
        scores = per_class(scaled.softmax(dim=0))
        if denoise > 0:
            dropped = scores.flatten(1).amax(dim=1) < denoise
            dropped[scores.flatten(1).amax(dim=1).argmax()] = False  # always keep the strongest class
            scores = per_class(scaled.masked_fill(dropped[owner][:, None, None], float("-inf")).softmax(dim=0))
        return scores


def _assign_labels(scores: torch.Tensor, background: int | None, protocol: Protocol) -> torch.Tensor:
    """(K, H, W) class probabilities -> (H, W) labels, with the area and background thresholds."""
    if protocol.area_threshold is not None:
        areas = torch.bincount(scores.argmax(dim=0).flatten(), minlength=scores.shape[0]).float()
        foreground = torch.ones_like(areas, dtype=torch.bool)
        if background is not None:
            foreground[background] = False
        small = foreground & (areas <= protocol.area_threshold * areas[foreground].sum())
        scores = scores.masked_fill(small[:, None, None], 0)
    labels = scores.argmax(dim=0)
    if protocol.background_threshold is not None and background is not None:
        labels[scores.amax(dim=0) < protocol.background_threshold] = background
    return labels


def build_predictor(model: str = "ViT-B-16", weights: str = "openai", method: str = "maskclip",
                    mode: str | None = None, preset: Protocol | str = "default", dataset: str | None = None,
                    device: str = "cpu", checkpoint: str | None = None, **predictor_kwargs) -> SegmentationPredictor:
    """Load a method (a CLIP backbone, or a trained checkpoint) and wrap it in a predictor.

    mode: the dense-feature mode of training-free methods; by default the preset's, else 'maskclip'.
    """
    protocol = get_protocol(preset)
    segmenter = load_method(method, model, weights, mode or protocol.mode, checkpoint, device)
    return SegmentationPredictor(segmenter, protocol, dataset=dataset, **predictor_kwargs)
