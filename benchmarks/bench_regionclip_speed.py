"""Per-image RegionCLIP detection time for CLIP RN50 at the COCO test size (shortest edge 800, longest at most 1333)
on this machine's CPU, split into the stages of `DetectionPredictor`, for several proposal counts (the official
test keeps 1000; the weights are random: time does not depend on them).

  backbone    the two res4 trunks: the frozen CLIP's (feeding the RPN) and the detector's own (feeding RoIAlign);
              RegionCLIP runs two backbones too (its offline RPN has its own R50)
  rpn         the RPN head, anchor decoding and NMS (6000 pre-NMS, P kept)
  roi_head    RoIAlign 14x14 -> res5 -> attention pool for the P proposals, and the box head
  post        class scores for 80 classes (a cached vocabulary), class-wise soft-NMS, top 100
  text        embedding an 80-class vocabulary already in the cache (the second `detect`)

  python benchmarks/bench_regionclip_speed.py [--proposals 100 300 1000] [--repeats 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ovdense.backbones import load_clip
from ovdense.data.detection import OV_COCO_BASE, OV_COCO_NOVEL
from ovdense.detection.images import prepare_image
from ovdense.detection.postprocess import select_detections
from ovdense.methods.regionclip import RegionCLIPDetector, trunk_map
from ovdense.presets import get_detection_protocol
from ovdense.text import TextEmbeddingCache

COCO_80 = sorted(set(OV_COCO_BASE) | set(OV_COCO_NOVEL))  # the 65 of OV-COCO, padded to 80 below


def timed(fn, repeats: int):
    """(median seconds, last result) of `repeats` calls after one warm-up call."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proposals", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = load_clip("RN50", "random")
    names = COCO_80 + [f"thing {k}" for k in range(80 - len(COCO_80))]
    detector = RegionCLIPDetector(clip, names[:4], templates="single").eval()
    cache = TextEmbeddingCache()
    detector.embed_text(names, cache)  # the vocabulary is cached, as on a second `detect`
    protocol = get_detection_protocol("ov-coco")
    rgb = np.random.default_rng(0).integers(0, 255, (args.height, args.width, 3), dtype=np.uint8)
    pixels = prepare_image(rgb, protocol.short, protocol.max_size, clip.image_mean, clip.image_std)[None]
    size = [tuple(pixels.shape[-2:])]
    print(f"RN50 (random weights), image {args.width}x{args.height} -> {size[0][1]}x{size[0][0]}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")

    backbone, (rpn_features, (roi_features, stride)) = timed(
        lambda: (trunk_map(detector.clip, pixels)[0], detector.encoder.feature_map(pixels)), args.repeats)
    text_time, text = timed(lambda: detector.embed_text(names, cache), args.repeats)
    rows = []
    for count in args.proposals:
        detector.proposals._post_nms_top_n = dict(training=count, testing=count)
        rpn, (boxes, objectness, _) = timed(
            lambda: detector.proposals.propose(rpn_features.float(), pixels, size), args.repeats)
        roi, (embeddings, deltas) = timed(
            lambda: (lambda e: (e, detector.box_head(e)))(detector.encoder.pool(roi_features, stride, boxes).float()),
            args.repeats)

        def post():
            refined = detector.box_coder.decode_single(deltas, boxes[0])
            probs = detector.class_scores({"embeddings": embeddings, "objectness": objectness[0]}, text)
            return select_detections(refined, probs, protocol.score_threshold, protocol.nms, protocol.iou_threshold,
                                     protocol.max_detections, protocol.soft_nms_sigma)
        post_time, _ = timed(post, args.repeats)
        total = backbone + rpn + roi + post_time
        rows.append((len(boxes[0]), backbone, rpn, roi, post_time, total, 100 * (total - backbone) / total))
    print(f"\n{'proposals':>9} {'backbone s':>10} {'rpn s':>7} {'roi_head s':>10} {'post s':>7} {'total s':>8} "
          f"{'beyond backbone':>15}")
    for n, b, r, h, p, t, share in rows:
        print(f"{n:>9} {b:>10.3f} {r:>7.3f} {h:>10.3f} {p:>7.3f} {t:>8.3f} {share:>14.1f}%")
    print(f"\ntext for 80 cached class names: {1000 * text_time:.2f} ms (the second `detect` embeds nothing)")


if __name__ == "__main__":
    main()
