"""Peak memory of segmenting a large photo with a large vocabulary, and start-up time of the CLI.

Each case runs in a fresh process and reports its peak resident memory (ru_maxrss), so the figures include
Python, torch and the model. Target (issue 9): a 4000x3000 photo with the 150 ADE20K classes under 2.5 GB;
labels are computed a band of rows at a time, so memory grows with H x W, not with classes x H x W.
`ovdense --help` is timed the same way (target: under 1 s; torch is imported only by the commands).

    python benchmarks/bench_memory.py [--size 4000x3000] [--presets default naclip]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

CASE = r"""
import json, resource, sys, time
import numpy as np, torch
from ovdense.data import builtin_vocabulary
from ovdense.predictor import build_predictor
torch.set_num_threads(2)
width, height, preset = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
predictor = build_predictor("ovdense-tiny-vit", "synthetic", preset=preset, device="cpu")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = predictor(image, builtin_vocabulary("ade150"))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_gb": peak / 2**20, "before_gb": before / 2**20, "seconds": seconds,
                  "labels": list(result.labels.shape), "scores": list(result.scores.shape)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the photo")
    parser.add_argument("--presets", nargs="+", default=["default", "naclip"])
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    full_maps_gb = 150 * width * height * 4 / 2**30
    print(f"{width}x{height} image, 150 ADE20K classes, shipped tiny CLIP, CPU; one K x H x W float32 map would "
          f"be {full_maps_gb:.1f} GB")
    print("| preset   | peak RSS GB | RSS before predict GB | predict s | labels      | scores         |")
    print("|----------|-------------|-----------------------|-----------|-------------|----------------|")
    for preset in args.presets:
        out = subprocess.run([sys.executable, "-c", CASE, str(width), str(height), preset], check=True,
                             capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {preset:<8} | {r['peak_gb']:11.2f} | {r['before_gb']:21.2f} | {r['seconds']:9.1f} | "
              f"{'x'.join(map(str, r['labels'])):<11} | {'x'.join(map(str, r['scores'])):<14} |")
    script = shutil.which("ovdense")
    for command in ([script, "--help"] if script else None, [sys.executable, "-m", "ovdense.cli", "--help"]):
        if command is None:
            continue
        times = []
        for _ in range(5):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        shown = "ovdense --help" if command[0] == script else "python -m ovdense.cli --help"
        print(f"`{shown}`: median {sorted(times)[2]:.2f} s over 5 runs (fresh processes)")


if __name__ == "__main__":
    main()
