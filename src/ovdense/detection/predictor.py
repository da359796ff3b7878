"""The user-facing detection predictor: embed an image once (proposals, region embeddings, refined boxes), then
ask any vocabulary."""
from __future__ import annotations

import torch

from ..data.images import load_image
from ..errors import InputError
from ..presets import DetectionProtocol, get_detection_protocol
from ..text import DEFAULT_CACHE, TextEmbeddingCache, Vocabulary
from .images import prepare_image
from .postprocess import select_detections
from .structures import DetectionResult


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
        embedded = self.detector.embed_image(pixels[None], [tuple(pixels.shape[1:])], boxes=given)[0]
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
