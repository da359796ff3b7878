"""Speed of the on-disk text-embedding cache, across processes.

Embeds the VOC-20 vocabulary (its 30 queries: the 20 class names and their synonyms) with the 80
ImageNet templates through `DEFAULT_CACHE`, first in a fresh process with an empty cache folder, then
in a second fresh process sharing that folder. Prints the text time of each run (text-tower fingerprint
and cache included, model loading not), their ratio (target: the second run under 5% of the first) and
whether both runs gave the same embeddings, bit for bit.

    python benchmarks/bench_text_cache.py [--model ovdense-tiny-vit] [--weights synthetic] [--device cpu]
    python benchmarks/bench_text_cache.py --model ViT-B-16 --weights random
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time


def one_run(model: str, weights: str, device: str) -> dict:
    """Load the model, then time the text embedding of the vocabulary (run in a fresh process)."""
    import torch

    from ovdense.backbones import load_clip
    from ovdense.data import builtin_vocabulary
    from ovdense.text import DEFAULT_CACHE, resolve_templates

    backbone = load_clip(model, weights, device=device)
    queries, templates = builtin_vocabulary("voc20").queries, resolve_templates("imagenet80")
    start = time.perf_counter()
    backbone.text_fingerprint
    fingerprinted = time.perf_counter()
    embeddings = DEFAULT_CACHE.embed(backbone, queries, templates)
    end = time.perf_counter()
    return {"text": end - start, "fingerprint": fingerprinted - start, "queries": len(queries),
            "templates": len(templates), "threads": torch.get_num_threads(), "on_disk": DEFAULT_CACHE.path is not None,
            "digest": hashlib.sha256(embeddings.numpy().tobytes()).hexdigest()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ovdense-tiny-vit")
    parser.add_argument("--weights", default="synthetic")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)  # the child processes
    args = parser.parse_args()
    if args.one_run:
        print(json.dumps(one_run(args.model, args.weights, args.device)))
        return
    with tempfile.TemporaryDirectory(prefix="ovdense-bench-cache-") as folder:
        env = {k: v for k, v in os.environ.items() if k != "OVDENSE_NO_CACHE"} | {"OVDENSE_CACHE_DIR": folder}
        command = [sys.executable, __file__, "--one-run", "--model", args.model, "--weights", args.weights,
                   "--device", args.device]
        first, second = (json.loads(subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
                                    .stdout.splitlines()[-1]) for _ in range(2))
    assert first["on_disk"] and second["on_disk"], "the disk cache was not used (see the warning above)"
    print(f"\nVOC-20 vocabulary ({first['queries']} queries) x {first['templates']} templates = "
          f"{first['queries'] * first['templates']} prompts, device {args.device}, {first['threads']} threads, "
          f"each run a fresh process")
    header = (f"| {'model':<16} | {'weights':<9} | 1st run s | 2nd run s | 2nd / 1st | fingerprint s "
              f"| same embeddings |")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    print(f"| {args.model:<16} | {args.weights:<9} | {first['text']:9.3f} | {second['text']:9.4f} "
          f"| {second['text'] / first['text']:8.2%} | {second['fingerprint']:13.4f} "
          f"| {str(first['digest'] == second['digest']):<15} |")


if __name__ == "__main__":
    main()
