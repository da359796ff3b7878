"""Speed of dense open-vocabulary segmentation under the SCLIP protocol.

Prints, per architecture (random weights: speed does not depend on their values):
  * images/s of the whole predictor (set_image + predict) on a 375x500 image, VOC-20 vocabulary;
  * the time of `dense_features` over the sliding-window crops divided by the time of plain
    `encode_image` over the same crops (target: at most 1.15);
  * the text-embedding cache speed-up (first vs repeated request of the VOC-20 class names, 80 templates).

    python benchmarks/bench_dense.py [--models RN50 ViT-B-16] [--repeats 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ovdense.backbones import load_clip
from ovdense.data import builtin_vocabulary
from ovdense.methods import MaskCLIP
from ovdense.ops import crop_windows, short_side_size, sliding_windows
from ovdense.predictor import SegmentationPredictor
from ovdense.presets import PRESETS
from ovdense.text import TextEmbeddingCache, resolve_templates


def _timed(fn, repeats: int, device: str) -> float:
    """Median seconds of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@torch.inference_mode()
def bench(model: str, repeats: int, device: str) -> dict:
    backbone = load_clip(model, "random", device=device)
    protocol = PRESETS["sclip"]
    mode = protocol.mode if protocol.mode in backbone.supported_modes() else "maskclip"
    vocabulary = builtin_vocabulary("voc20")
    templates = resolve_templates(protocol.templates)

    cache = TextEmbeddingCache()
    start = time.perf_counter()
    cache.embed(backbone, vocabulary.queries, templates)
    text_first = time.perf_counter() - start
    text_cached = _timed(lambda: cache.embed(backbone, vocabulary.queries, templates), repeats, device)

    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    predictor = SegmentationPredictor(MaskCLIP(backbone, mode), protocol, cache=cache)
    per_image = _timed(lambda: predictor(image, vocabulary), repeats, device)
    predict_only = _timed(lambda: predictor.predict(vocabulary), repeats, device)

    size = short_side_size(375, 500, protocol.short_side)
    crops = crop_windows(torch.randn(3, *size, device=device), sliding_windows(*size, protocol.crop, protocol.stride))
    encode = _timed(lambda: backbone.encode_image(crops), repeats, device)
    dense = _timed(lambda: backbone.dense_features(crops, mode), repeats, device)
    return {"model": model, "mode": mode, "crops": len(crops), "img/s": 1 / per_image, "predict": predict_only,
            "encode": encode, "dense": dense, "ratio": dense / encode, "text_first": text_first,
            "text_cached": text_cached, "speedup": text_first / text_cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["RN50", "ViT-B-16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = [bench(m, args.repeats, args.device) for m in args.models]
    print(f"\nSCLIP protocol (short side 336, windows 224/112), 375x500 image, VOC-20 vocabulary, "
          f"device {args.device}, {torch.get_num_threads()} threads")
    header = (f"| {'model':<9} | {'mode':<8} | crops | img/s | predict s | encode_image s | dense s | dense/encode "
              f"| text 1st s | text cached s | cache speed-up |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['model']:<9} | {r['mode']:<8} | {r['crops']:5d} | {r['img/s']:5.2f} | {r['predict']:9.3f} "
              f"| {r['encode']:14.3f} | {r['dense']:7.3f} | {r['ratio']:12.3f} | {r['text_first']:10.2f} "
              f"| {r['text_cached']:13.5f} | {r['speedup']:13.0f}x |")


if __name__ == "__main__":
    main()
