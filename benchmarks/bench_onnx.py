"""onnxruntime against torch on this CPU: the dense image encoder of a training-free segmenter (MaskCLIP features,
unit-norm) exported by `ovdense export --format onnx`, seconds per image at a few sizes, and the largest difference
between the two (random weights: time and parity do not depend on them).

  python benchmarks/bench_onnx.py [--models ViT-B-16 RN50] [--sizes 224 448 672] [--repeats 3] [--threads 2]
(--threads sets torch's; onnxruntime uses every core by default.)
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from ovdense.backbones import load_clip
from ovdense.onnx_export import DenseEncoder, export_onnx
from ovdense.onnx_runtime import OnnxSegmenter


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-B-16", "RN50"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448, 672])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} threads, median of {args.repeats}, MaskCLIP dense features, random weights")
    print(f"{'model':<10} {'size':>5} {'torch s':>8} {'onnxruntime s':>14} {'speed-up':>9} {'max |diff|':>11}")
    for name in args.models:
        clip = load_clip(name, "random").eval()
        folder = tempfile.mkdtemp(prefix="onnx-")
        export_onnx(clip, "maskclip", ["a", "b"], ("{}",), folder)
        segmenter = OnnxSegmenter(folder)
        encoder = DenseEncoder(clip, "maskclip").eval()
        for size in args.sizes:
            pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                torch_s = median_time(lambda: encoder(pixels), args.repeats)
                diff = float(np.abs(encoder(pixels).numpy() - segmenter.features(pixels.numpy())).max())
            ort_s = median_time(lambda: segmenter.features(pixels.numpy()), args.repeats)
            print(f"{name:<10} {size:>5} {torch_s:>8.3f} {ort_s:>14.3f} {torch_s / ort_s:>8.2f}x {diff:>11.2e}")


if __name__ == "__main__":
    main()
