"""The user-facing detection predictors: embed an image once, then ask any vocabulary (or caption).

DetectionPredictor: region detectors (RegionCLIP): proposals, region embeddings and boxes are computed once.
GroundingPredictor: grounding detectors (GLIP): the backbone and FPN run once, the fusion head per prompt.
"""
from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from ..data.images import load_image
from ..errors import InputError
from ..presets import DetectionProtocol, get_detection_protocol
from ..text import DEFAULT_CACHE, TextEmbeddingCache, Vocabulary
from ..text.prompts import GroundingPrompt
from .atss import to_continuous
from .grounding import caption_prompt, chunk_classes, class_prompt, positive_map
from .images import pad_batch, prepare_image
from .postprocess import select_detections, select_pairs
from .structures import DetectionResult, GroundingResult


class DetectionPredictor:
    """Open-vocabulary detection of one image at a time, in the spirit of SamPredictor.

    `set_image` runs everything that does not depend on the words (the RPN, the region encoder, the box head);
    `detect(vocabulary)` then only embeds the (cached) class names, scores the stored regions and post-processes.
    detector: a model with `clip` (image mean / std), `embed_image`, `embed_text` and `class_scores` (see
    `ovdense.methods.regionclip.RegionCLIPDetector`).
    """

    def __init__(self, detector, protocol: DetectionProtocol | str = "ov-coco", cache: TextEmbeddingCache | None = None,
                 max_pixels: int | None = None):
        self.detector = detector.eval()
        self.protocol = get_detection_protocol(protocol)
        self.cache = cache if cache is not None else DEFAULT_CACHE
        self.max_pixels = max_pixels
        self._image = None

    @property
    def device(self) -> torch.device:
        return self.detector.clip.device

    @torch.no_grad()
    def set_image(self, image, boxes=None) -> None:
        """Read `image` (path, PIL image or (H, W[, C]) array), resize it and embed its regions.

        boxes: (N, 4) xyxy boxes in the image's pixels to classify instead of the RPN's proposals (ground truth for
        region recognition); they are kept as given.
        """
        rgb = load_image(image, **({"max_pixels": self.max_pixels} if self.max_pixels else {}))
        height, width = rgb.shape[:2]
        clip = self.detector.clip
        pixels = prepare_image(rgb, self.protocol.short, self.protocol.max_size, clip.image_mean, clip.image_std,
                               self.device)
        scale = torch.tensor([pixels.shape[2] / width, pixels.shape[1] / height] * 2, device=self.device)
        given = None
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=self.device).reshape(-1, 4)
            if not torch.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
                raise InputError("boxes must be finite [x0, y0, x1, y1] with x1 >= x0 and y1 >= y0")
            given = [boxes * scale]
        # padded to 32 px at least (the res4 stride twice): a thinner image would vanish in the ResNet's pooling
        embedded = self.detector.embed_image(pad_batch([pixels], minimum=32), [tuple(pixels.shape[1:])],
                                             boxes=given)[0]
        embedded["boxes"] = boxes if boxes is not None else embedded["boxes"] / scale
        self._image = {"rgb": rgb, "embedded": embedded}

    def _probabilities(self, vocabulary, multiply_objectness: bool) -> tuple[Vocabulary, torch.Tensor]:
        if self._image is None:
            raise RuntimeError("call set_image(image) before detect(vocabulary)")
        vocab = Vocabulary.coerce(vocabulary)
        if not vocab.queries:
            raise InputError("the vocabulary has no class to look for")
        text = self.detector.embed_text(vocab.queries, self.cache)
        probs = self.detector.class_scores(self._image["embedded"], text, multiply_objectness)  # (R, Q)
        owner = torch.tensor(vocab.query_to_class, device=probs.device)
        merged = probs.new_zeros(len(probs), len(vocab))  # a class scores the best of its synonyms
        merged.scatter_reduce_(1, owner[None].expand_as(probs), probs, "amax", include_self=False)
        return vocab, merged

    @torch.no_grad()
    def classify_regions(self, vocabulary) -> torch.Tensor:
        """(R, K) class probabilities of the current image's regions (the given boxes, or the refined proposals)."""
        return self._probabilities(vocabulary, self.protocol.multiply_objectness)[1].cpu()

    @torch.no_grad()
    def detect(self, vocabulary: Vocabulary | str | list[str], **overrides) -> DetectionResult:
        """Detect `vocabulary` ('heart, red star', a list or a Vocabulary; ';' separates synonyms) in the current
        image. overrides: DetectionProtocol fields for this call (score_threshold=0.3, max_detections=10, ...); the
        resize fields need a new `set_image`."""
        protocol = self.protocol.updated(**overrides)
        vocab, probs = self._probabilities(vocabulary, protocol.multiply_objectness)
        boxes, scores, labels = select_detections(
            self._image["embedded"]["boxes"], probs, protocol.score_threshold, protocol.nms, protocol.iou_threshold,
            protocol.max_detections, protocol.soft_nms_sigma)
        return DetectionResult(boxes, scores, labels, vocab.names, tuple(self._image["rgb"].shape[:2]),
                               image=self._image["rgb"])

    def __call__(self, image, vocabulary, **overrides) -> DetectionResult:
        self.set_image(image)
        return self.detect(vocabulary, **overrides)


class GroundingPredictor:
    """Detection and phrase grounding with a grounding detector (GLIP), one image at a time.

    `set_image` runs the backbone and FPN once; `detect(vocabulary)` and `ground(caption)` then run the text encoder
    (its output is cached per prompt), the fusion head and post-processing for each prompt (fusion mixes image and
    text, so that part cannot be cached).
    detector: a model with `image_mean` / `image_std`, `device`, `embed_image`, `tokenize`, `count_tokens`,
    `max_tokens` and `predict` (see `ovdense.methods.glip.GLIPDetector`).
    """

    def __init__(self, detector, protocol: DetectionProtocol | str = "glip", max_pixels: int | None = None):
        self.detector = detector.eval()
        self.protocol = get_detection_protocol(protocol)
        self.max_pixels = max_pixels
        self._image = None

    @property
    def device(self) -> torch.device:
        return self.detector.device

    @torch.no_grad()
    def set_image(self, image) -> None:
        """Read `image` (path, PIL image or (H, W[, C]) array), resize it (the protocol's short / max size), pad it
        to a multiple of 32 and compute its FPN levels."""
        rgb = load_image(image, **({"max_pixels": self.max_pixels} if self.max_pixels else {}))
        pixels = prepare_image(rgb, self.protocol.short, self.protocol.max_size, self.detector.image_mean,
                               self.detector.image_std, self.device)
        levels = self.detector.embed_image(pad_batch([pixels], 32))
        self._image = {"rgb": rgb, "levels": levels, "size": tuple(pixels.shape[1:])}

    def _boxes(self, prompt: GroundingPrompt, protocol: DetectionProtocol
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One prompt -> (N, 4) continuous boxes in the input image's pixels, (N,) scores, (N,) phrase indices after
        class-wise NMS and the top `max_detections` (GLIP's `ATSSPostProcessor`, then `BoxList.resize`)."""
        if self._image is None:
            raise RuntimeError("call set_image(image) first")
        text = self.detector.tokenize([prompt.caption])
        token_map = positive_map(text.offsets[0], prompt.spans, text.ids.shape[1])
        lost = [prompt.phrases[p] for p in range(len(prompt.spans)) if not token_map[p].any()]
        if lost:
            raise InputError(f"no token of the text encoder falls on {', '.join(map(repr, lost))}")
        found = self.detector.predict(self._image["levels"], text, [token_map], protocol.score_threshold)[0]
        height, width = self._image["size"]
        # pixel-index boxes clipped to the resized image (`clip_to_image`); NMS on them made continuous (x1 + 1,
        # y1 + 1) is maskrcnn-benchmark's `ml_nms`, whose areas and overlaps count the +1 pixel
        clipped = found["boxes"].clamp(min=torch.zeros(4, device=self.device),
                                       max=found["boxes"].new_tensor([width - 1, height - 1] * 2))
        rows, labels, scores = select_pairs(to_continuous(clipped),
                                            _one_hot_scores(found["scores"], found["labels"], len(prompt.spans)),
                                            0.0, protocol.nms, protocol.iou_threshold, protocol.max_detections,
                                            protocol.soft_nms_sigma)
        # `BoxList.resize` scales the pixel-index boxes to the input image, whose continuous box adds the pixel back
        # (the width COCO's evaluation of GLIP gives them); then kept inside the image
        original_h, original_w = self._image["rgb"].shape[:2]
        ratio = clipped.new_tensor([original_w / width, original_h / height] * 2)
        limit = clipped.new_tensor([original_w, original_h] * 2)
        return torch.minimum(to_continuous(clipped[rows] * ratio), limit), scores, labels

    @torch.no_grad()
    def detect(self, vocabulary: Vocabulary | str | list[str], **overrides) -> DetectionResult:
        """Detect `vocabulary` ('heart, red star', a list or a Vocabulary; ';' separates synonyms): its names are put
        into prompts of at most `chunk_size` names that fit the text encoder; a class scores its best synonym."""
        protocol = self.protocol.updated(**overrides)
        vocab = Vocabulary.coerce(vocabulary)
        if not vocab.queries:
            raise InputError("the vocabulary has no class to look for")
        all_boxes, all_scores, all_labels = [], [], []
        for chunk in chunk_classes(vocab.queries, self.detector.count_tokens, self.detector.max_tokens,
                                   protocol.chunk_size):
            boxes, scores, phrases = self._boxes(class_prompt([vocab.queries[q] for q in chunk]), protocol)
            all_boxes.append(boxes)
            all_scores.append(scores)
            all_labels.append(torch.tensor([vocab.query_to_class[chunk[p]] for p in phrases.tolist()],
                                           dtype=torch.long))
        boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
        if len(vocab.queries) > len(vocab):  # synonyms of one class may come from several prompts
            keep = batched_nms(boxes, scores, labels, protocol.iou_threshold)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if not protocol.per_prompt:  # the image's best max_detections over all its prompts
            keep = scores.argsort(descending=True, stable=True)[:protocol.max_detections]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return DetectionResult(boxes, scores, labels, vocab.names, tuple(self._image["rgb"].shape[:2]),
                               image=self._image["rgb"])

    @torch.no_grad()
    def ground(self, caption: str, phrases: list[str] | None = None, chunker: str = "auto", **overrides
               ) -> GroundingResult:
        """The boxes of each phrase of `caption`: the given `phrases` (found in the caption) or its noun phrases."""
        prompt = caption_prompt(caption, phrases, chunker)
        if not prompt.spans:
            raise InputError(f"no noun phrase found in {caption!r}: name the phrases to ground")
        return self.ground_prompt(prompt, **overrides)

    @torch.no_grad()
    def ground_prompt(self, prompt: GroundingPrompt, **overrides) -> GroundingResult:
        """The boxes of each phrase of a prompt whose phrases' character spans are known (grounding datasets)."""
        boxes, scores, labels = self._boxes(prompt, self.protocol.updated(**overrides))
        return GroundingResult(boxes, scores, labels, prompt.phrases, tuple(self._image["rgb"].shape[:2]),
                               image=self._image["rgb"], caption=prompt.caption, spans=prompt.spans)

    def __call__(self, image, vocabulary, **overrides) -> DetectionResult:
        self.set_image(image)
        return self.detect(vocabulary, **overrides)


def _one_hot_scores(scores: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
    """(N,) scores of (N,) labels -> (N, classes) with each row's score in its label's column."""
    out = scores.new_zeros(len(scores), classes)
    out[torch.arange(len(scores)), labels] = scores
    return out
