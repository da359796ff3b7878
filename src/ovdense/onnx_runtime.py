"""Segmentation with onnxruntime alone (numpy, Pillow, onnxruntime; no torch) from an `ovdense export --format onnx`
folder: resize the short side, normalise, run the image encoder once (no sliding window, no PAMR), cosine with the
stored text embeddings, upsample the logits bilinearly to the image, softmax over the queries, keep each class's best
synonym and take the best class (the torch predictor's steps, minus its windows and PAMR).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def read_rgb(image) -> np.ndarray:
    """A path, a PIL image or an (H, W, 3) uint8 array -> (H, W, 3) uint8 RGB (EXIF orientation applied to files)."""
    if isinstance(image, np.ndarray):
        return image
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    return np.asarray(image.convert("RGB"))


class OnnxSegmenter:
    """folder: what `ovdense.onnx_export.export_onnx` wrote. short: the side images are resized to (default: the one
    the export recorded, its model's preset; 0: as they are)."""

    def __init__(self, folder: str | Path, short: int | None = None, providers: list[str] | None = None):
        import onnxruntime
        folder = Path(folder)
        self.config = json.loads((folder / "ovdense_onnx.json").read_text(encoding="utf-8"))
        self.text = np.load(folder / "text_embeddings.npy")  # (Q, D)
        self.query_to_class = np.asarray(self.config["query_to_class"])  # (Q,) class of each query
        self.session = onnxruntime.InferenceSession(str(folder / "image_encoder.onnx"),
                                                    providers=providers or ["CPUExecutionProvider"])
        self.short = self.config.get("short_side", 448) if short is None else short

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]

    def features(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 normalised images -> (B, D, h, w) unit-norm dense features."""
        return self.session.run(None, {"images": pixels.astype(np.float32)})[0]

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (1, 3, h, w) float32: the short side to `short` (bicubic), normalised."""
        image = Image.fromarray(rgb)
        if self.short:
            scale = self.short / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) / 255.0
        pixels = (pixels - np.array(self.config["image_mean"], np.float32)) / np.array(self.config["image_std"],
                                                                                       np.float32)
        return pixels.transpose(2, 0, 1)[None]

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray]:
        """An image (path, PIL image or (H, W, 3) uint8 array) -> ((H, W) int64 class indices, (K, H, W) float32 class
        probabilities: each class's best synonym's share of the softmax over all queries)."""
        rgb = read_rgb(image)
        height, width = rgb.shape[:2]
        features = self.features(self.prepare(rgb))[0]  # (D, h, w)
        logits = np.einsum("dhw,qd->qhw", features, self.text) * self.config["logit_scale"]
        upsampled = np.stack([np.asarray(Image.fromarray(m).resize((width, height), Image.BILINEAR)) for m in logits])
        upsampled = upsampled - upsampled.max(axis=0, keepdims=True)
        query_probs = np.exp(upsampled)
        query_probs /= query_probs.sum(axis=0, keepdims=True)
        probs = np.stack([query_probs[self.query_to_class == k].max(axis=0) for k in range(len(self.classes))])
        return probs.argmax(axis=0), probs
