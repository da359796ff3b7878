"""`ovdense export --format onnx`: a training-free segmenter for onnxruntime alone.

The folder it writes:
  image_encoder.onnx   (B, 3, H, W) normalised images, any B, H, W -> (B, D, H/s, W/s) unit-norm dense features
                       (the CLIP's `dense_features` in the chosen mode, e.g. MaskCLIP's)
  text_embeddings.npy  (Q, D) unit-norm embeddings of the vocabulary's queries, synonyms included (template-averaged)
  ovdense_onnx.json    model, weights, mode, stride, image mean / std, the class names, each query's class, the
                       templates, the logit scale, the short side images are resized to
`ovdense.onnx_runtime.OnnxSegmenter(folder)` segments with numpy, Pillow and onnxruntime (no torch).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .io import atomic_path, write_text_atomic

FILES = ("image_encoder.onnx", "text_embeddings.npy", "ovdense_onnx.json")


class DenseEncoder(nn.Module):
    """(B, 3, H, W) -> (B, D, h, w) unit-norm dense features of `clip` in `mode` (what the ONNX graph holds)."""

    def __init__(self, clip, mode: str):
        super().__init__()
        self.clip, self.mode = clip, mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.dense_features(images, self.mode).features.float(), dim=1)


def export_onnx(clip, mode: str, vocabulary, templates: tuple[str, ...], out_dir: str | Path,
                logit_scale: float = 100.0, short_side: int | None = 448) -> dict[str, Path]:
    """Write the three files of the module docstring into `out_dir` (each atomically); returns their paths.
    vocabulary: a Vocabulary, 'sky, grass; lawn' or a list of names. logit_scale, short_side: the protocol the
    runtime follows (short_side None: images as they are)."""
    try:
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as error:
        raise InputError("ONNX export needs onnx and onnxscript: pip install 'ovdense[onnx]'") from error
    from .text import TextEmbeddingCache, Vocabulary
    vocabulary = Vocabulary.coerce(vocabulary)
    out_dir = Path(out_dir)
    encoder = DenseEncoder(clip.eval(), mode).eval()
    probe = torch.randn(2, 3, 2 * clip.stride * 3, 2 * clip.stride * 4, device=clip.device)
    dynamic = {"images": {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}}
    paths = {name: out_dir / name for name in FILES}
    with torch.no_grad():
        program = torch.onnx.export(encoder, (probe,), input_names=["images"], output_names=["features"],
                                    dynamic_shapes=dynamic, dynamo=True, verbose=False)
        text = TextEmbeddingCache().embed(clip, list(vocabulary.queries), templates).float().cpu().numpy()
    with atomic_path(paths["image_encoder.onnx"]) as tmp:
        program.save(str(tmp))
    with atomic_path(paths["text_embeddings.npy"]) as tmp, open(tmp, "wb") as handle:
        np.save(handle, text.astype(np.float32))
    write_text_atomic(paths["ovdense_onnx.json"], json.dumps({
        "model": clip.name, "weights": clip.weights, "mode": mode, "stride": clip.stride,
        "image_mean": list(clip.image_mean), "image_std": list(clip.image_std), "classes": list(vocabulary.names),
        "query_to_class": list(vocabulary.query_to_class), "templates": list(templates), "logit_scale": logit_scale,
        "short_side": short_side}, indent=2))
    return paths
