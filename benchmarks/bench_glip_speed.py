"""Per-image GLIP-T time at the COCO test size (shortest edge 800, longest at most 1333) on this machine, split into
the stages of `GroundingPredictor`, for a 20-class prompt and for the 80 COCO classes (one prompt, and chunked 40 per
prompt as GLIP evaluates LVIS). Swin-T, BERT-base and the 6-layer fusion head with random weights (time does not
depend on them); BERT's tokenizer is a word-level vocabulary of the class names (no download), so prompts are about
as long as bert-base-uncased makes them.

  backbone  Swin-T and the FPN (once per image, whatever the words)
  text      BERT on the prompt(s)
  head      6 x [bi-attention fusion, text layer, DyHead], the token alignment logits, boxes and centerness
  post      phrase scores, the best 1000 per level, class-wise NMS 0.6, top 100 (every anchor passes the 0.05
            threshold here: the worst case)

  python benchmarks/bench_glip_speed.py [--repeats 3] [--threads 2] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ovdense.data.detection import OV_COCO_BASE, OV_COCO_NOVEL
from ovdense.detection.grounding import chunk_classes, class_prompt, positive_map
from ovdense.detection.images import pad_batch, prepare_image
from ovdense.detection.postprocess import select_detections
from ovdense.methods.glip import GLIPDetector

COCO_80 = sorted(set(OV_COCO_BASE) | set(OV_COCO_NOVEL))


def timed(fn, repeats: int, device: str):
    """(median seconds, last result) of `repeats` calls after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def bert_folder(words: list[str]) -> Path:
    """bert-base-uncased's config and a vocabulary of `words` in a temporary folder."""
    import transformers
    folder = Path(tempfile.mkdtemp(prefix="bert-"))
    transformers.BertConfig().save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + sorted({w for n in words for w in n.split()})
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = COCO_80 + [f"thing {k}" for k in range(80 - len(COCO_80))]
    model = GLIPDetector(None, image="swin-t", text="bert", text_source=str(bert_folder(names)),
                         pretrained_text=False).to(args.device).eval()
    model.bias0.data.zero_()  # random weights with GLIP's prior would pass almost no anchor: time the worst case
    rgb = np.random.default_rng(0).integers(0, 255, (args.height, args.width, 3), dtype=np.uint8)
    pixels = pad_batch([prepare_image(rgb, 800, 1333, model.image_mean, model.image_std, args.device)], 32)
    print(f"GLIP-T (Swin-T, BERT-base, 6 fusion layers; random weights) on {args.device}, image "
          f"{args.width}x{args.height} -> {pixels.shape[-1]}x{pixels.shape[-2]}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    backbone, levels = timed(lambda: model.embed_image(pixels), args.repeats, args.device)
    rows = []
    for label, count, chunk_size in (("20 classes", 20, 40), ("80 classes, 1 prompt", 80, 80),
                                     ("80 classes, chunked 40", 80, 40)):
        chunks = chunk_classes(names[:count], model.count_tokens, model.max_tokens, chunk_size)
        text_s = head_s = post_s = 0.0
        tokens = 0
        for chunk in chunks:
            prompt = class_prompt([names[k] for k in chunk])
            text = model.tokenize([prompt.caption])
            tokens += text.ids.shape[1]
            t, _ = timed(lambda: model.text(text), args.repeats, args.device)
            h, out = timed(lambda: model.head(levels, text), args.repeats, args.device)
            token_map = positive_map(text.offsets[0], prompt.spans, text.ids.shape[1])

            def post():
                found = model.candidates(out, [token_map])[0]
                scores = torch.zeros(len(found["scores"]), len(chunk), device=found["scores"].device)
                scores[torch.arange(len(scores)), found["labels"]] = found["scores"]
                return select_detections(found["boxes"], scores, 0.0, "class", 0.6, 100)
            p, _ = timed(post, args.repeats, args.device)
            text_s, head_s, post_s = text_s + t, head_s + (h - t), post_s + p
        total = backbone + text_s + head_s + post_s
        rows.append((label, len(chunks), tokens, backbone, text_s, head_s, post_s, total))
    print(f"\n{'prompt':<24} {'passes':>6} {'tokens':>6} {'backbone s':>10} {'text s':>7} {'head s':>7} "
          f"{'post s':>7} {'total s':>8} {'img/s':>6}")
    for label, passes, tokens, b, t, h, p, total in rows:
        print(f"{label:<24} {passes:>6} {tokens:>6} {b:>10.3f} {t:>7.3f} {h:>7.3f} {p:>7.3f} {total:>8.3f} "
              f"{1 / total:>6.3f}")


if __name__ == "__main__":
    main()
