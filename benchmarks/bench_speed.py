"""Speed of every inference path against this machine's limit and against the detectors users would pick instead.

One run prints:
  1. the limit: fp32 (and bf16) matmul GFLOP/s and a 3x3 convolution's, measured here;
  2. per path and stage: GFLOP (of the straightforward forms, `ovdense.methods.straightforward`, as the official code
     computes them; the fast forms do less, counted in "done"), seconds, GFLOP/s and % of the fp32 matmul limit:
       GLIP-T           Swin-T + BERT-base + 6 fusion layers, 1088x800 (a 640x480 image at the COCO test size),
                        20 COCO classes in one prompt
       RegionCLIP RN50  C4 detector, the same image at 1067x800, 100 / 300 / 1000 proposals, 80 classes, soft-NMS
       MaskCLIP         ViT-B/16 (sclip) and RN50 under the SCLIP protocol (a 375x500 image, 6 crops of 224)
  3. the time ratio ovdense / peer, median of interleaved rounds, against Hugging Face GroundingDINO-T (same image),
     OWLv2 B/16 (960x960) and CLIPSeg (352x352, one pass per prompt), built from their configs (`hf_peers.py`);
     skipped with a message when transformers is absent;
  4. the whole-process wall time of a one-image `ovdense segment` against `python -c "import torch"`.
All weights are random (time does not depend on them). FLOPs are counted by `torch.utils.flop_counter` (a
deformable convolution counted as its dense equivalent); memory-bound work (sampling, NMS) counts none.

  python benchmarks/bench_speed.py [--threads 2] [--repeats 3] [--device cpu|cuda] [--before] [--skip ...]

--before also times the straightforward forms (the "before" of each row).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ovdense.methods.straightforward import straightforward_forms

COCO_20 = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
           "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow"]


def _deform_conv_flops(x, weight, offset, mask, bias, *args, out_shape=None, **kwargs) -> int:
    """A deformable convolution's multiply-adds, as its dense equivalent: 2 B C_out Ho Wo C_in k k."""
    batch, channels_out, height, width = out_shape
    return 2 * batch * channels_out * height * width * weight[1] * weight[2] * weight[3]


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The CPU's fused attention kernel, which the counter does not know: 2 B H (Lq Lk d + Lq Lk d_v)."""
    return sdpa_flop_count(query, key, value)


def _fused_attention_layer_flops(query, key, value, embed_dim, heads, *args, out_shape=None, **kwargs) -> int:
    """nn.MultiheadAttention's inference fast path (open_clip's ViT blocks), one op the counter does not know:
    the q, k, v projections, the attention and the output projection."""
    batch, queries, width = query
    keys = key[1]
    return 2 * batch * (queries * width * width + 2 * keys * width * width + 2 * queries * keys * width
                        + queries * width * width)


FLOP_FORMULAS = {torch.ops.torchvision.deform_conv2d: _deform_conv_flops,
                 torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
                 torch.ops.aten._native_multi_head_attention: _fused_attention_layer_flops}


class Clock:
    def __init__(self, device: str):
        self.device = device

    def __call__(self, fn) -> float:
        """Seconds of one call of fn."""
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def median(self, fn, repeats: int) -> float:
        return statistics.median(self(fn) for _ in range(repeats))

    def best(self, fn, repeats: int) -> float:
        return min(self(fn) for _ in range(repeats))


def gflop(fn) -> float:
    with FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def limits(clock: Clock, repeats: int) -> dict[str, float]:
    """The best GFLOP/s of a 2048^3 matmul in fp32 (and bf16) and of a 3x3 convolution (256 channels, 100x136)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(2048, 2048, device=clock.device, dtype=dtype)
        b = torch.randn(2048, 2048, device=clock.device, dtype=dtype)
        a @ b
        out[f"matmul {str(dtype)[6:]}"] = 2 * 2048 ** 3 / clock.best(lambda: a @ b, max(repeats, 5)) / 1e9
    x = torch.randn(1, 256, 100, 136, device=clock.device)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(clock.device)
    with torch.no_grad():
        conv(x)
        out["conv3x3 float32"] = gflop(lambda: conv(x)) / clock.best(lambda: conv(x), max(repeats, 5))
    return out


class Pipeline:
    """A path's stages, run in order (a stage may use what an earlier one returned through `state`)."""

    def __init__(self, name: str):
        self.name, self.stages = name, []

    def stage(self, name: str):
        def register(fn):
            self.stages.append((name, fn))
            return fn
        return register


def measure(path: Pipeline, state: dict, clock: Clock, repeats: int, before: bool) -> list[dict]:
    """Per stage: GFLOP of the straightforward forms, GFLOP done, seconds (and seconds before)."""
    rows = []
    for name, fn in path.stages:
        with straightforward_forms():
            reference = gflop(lambda: fn(state))
            before_s = clock.median(lambda: fn(state), repeats) if before else None
        done = gflop(lambda: fn(state))
        seconds = clock.median(lambda: fn(state), repeats)
        rows.append({"path": path.name, "stage": name, "gflop": reference, "done": done, "s": seconds,
                     "before_s": before_s})
    return rows


# ------------------------------------------------------------------------------------------------- GLIP-T
def bert_folder(words: list[str]) -> Path:
    """bert-base-uncased's config and a word-level vocabulary of `words` (no download)."""
    import transformers
    folder = Path(tempfile.mkdtemp(prefix="bert-"))
    transformers.BertConfig().save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + sorted({w for n in words for w in n.split()})
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def glip_path(device: str, rgb: np.ndarray) -> tuple[Pipeline, dict, callable]:
    from ovdense.detection.grounding import class_prompt, positive_map
    from ovdense.detection.images import pad_batch, prepare_image
    from ovdense.detection.postprocess import select_detections
    from ovdense.methods.glip import GLIPDetector
    model = GLIPDetector(None, image="swin-t", text="bert", text_source=str(bert_folder(COCO_20)),
                         pretrained_text=False).to(device).eval()
    model.bias0.data.zero_()  # with GLIP's prior random weights pass almost no anchor: time the worst case
    pixels = pad_batch([prepare_image(rgb, 800, 1333, model.image_mean, model.image_std, device)], 32)
    prompt = class_prompt(COCO_20)
    text = model.tokenize([prompt.caption])
    token_map = positive_map(text.offsets[0], prompt.spans, text.ids.shape[1])
    path = Pipeline(f"GLIP-T {pixels.shape[-1]}x{pixels.shape[-2]}, 20 classes ({text.ids.shape[1]} tokens)")
    state = {}

    @path.stage("Swin-T + FPN")
    def backbone(state):
        state["levels"] = model.embed_image(pixels)

    @path.stage("BERT")
    def bert(state):
        model._encode_text(text)

    @path.stage("fusion + DyHead")
    def head(state):
        model.encode_text(text)  # cached: BERT is the row above
        state["out"] = model.head(state["levels"], text)

    @path.stage("post")
    def post(state):
        found = model.candidates(state["out"], [token_map])[0]
        scores = torch.zeros(len(found["scores"]), len(COCO_20), device=device)
        scores[torch.arange(len(scores)), found["labels"]] = found["scores"]
        select_detections(found["boxes"], scores, 0.0, "class", 0.6, 100)

    def whole():
        model._encoded_prompts.clear()  # as a peer, encode the prompt every time
        for _, fn in path.stages:
            fn(state)
    return path, state, whole


# ------------------------------------------------------------------------------------------- RegionCLIP RN50
def regionclip_paths(device: str, rgb: np.ndarray, proposals: list[int]):
    from ovdense.backbones import load_clip
    from ovdense.data.detection import OV_COCO_BASE, OV_COCO_NOVEL
    from ovdense.detection.images import prepare_image
    from ovdense.detection.postprocess import select_detections
    from ovdense.methods.regionclip import RegionCLIPDetector, trunk_map
    from ovdense.presets import get_detection_protocol
    from ovdense.text import TextEmbeddingCache
    clip = load_clip("RN50", "random", device=device)
    names = sorted(set(OV_COCO_BASE) | set(OV_COCO_NOVEL))
    names += [f"thing {k}" for k in range(80 - len(names))]
    detector = RegionCLIPDetector(clip, names[:4], templates="single").to(device).eval()
    cache = TextEmbeddingCache()
    text = detector.embed_text(names, cache)
    protocol = get_detection_protocol("ov-coco")
    pixels = prepare_image(rgb, protocol.short, protocol.max_size, clip.image_mean, clip.image_std, device)[None]
    size = [tuple(pixels.shape[-2:])]
    out = []
    for count in proposals:
        path = Pipeline(f"RegionCLIP RN50 {size[0][1]}x{size[0][0]}, {count} proposals, 80 classes")
        state = {}

        @path.stage("2 x res4 trunk")
        def backbone(state):
            state["rpn_map"] = trunk_map(detector.clip, pixels)[0]
            state["roi_map"], state["stride"] = detector.encoder.feature_map(pixels)

        @path.stage("RPN")
        def rpn(state, count=count):
            detector.proposals._post_nms_top_n = dict(training=count, testing=count)
            state["boxes"], state["objectness"], _ = detector.proposals.propose(state["rpn_map"].float(), pixels,
                                                                                 size)

        @path.stage("RoI head: RoIAlign 14x14, res5, attention pool")
        def roi_head(state):
            state["embeddings"] = detector.encoder.pool(state["roi_map"], state["stride"], state["boxes"]).float()
            state["deltas"] = detector.box_head(state["embeddings"])

        @path.stage("scores + soft-NMS")
        def post(state):
            refined = detector.box_coder.decode_single(state["deltas"], state["boxes"][0])
            probs = detector.class_scores({"embeddings": state["embeddings"], "objectness": state["objectness"][0]},
                                          text)
            select_detections(refined, probs, protocol.score_threshold, protocol.nms, protocol.iou_threshold,
                              protocol.max_detections, protocol.soft_nms_sigma)

        def whole(path=path, state=state):
            for _, fn in path.stages:
                fn(state)
        out.append((path, state, whole))
    return out


# ------------------------------------------------------------------------------------------------ MaskCLIP
def maskclip_path(device: str, model: str):
    from ovdense.backbones import load_clip
    from ovdense.methods import MaskCLIP
    from ovdense.predictor import SegmentationPredictor
    from ovdense.presets import PRESETS
    from ovdense.text import TextEmbeddingCache
    backbone = load_clip(model, "random", device=device)
    protocol = PRESETS["sclip"]
    mode = protocol.mode if protocol.mode in backbone.supported_modes() else "maskclip"
    predictor = SegmentationPredictor(MaskCLIP(backbone, mode), protocol, cache=TextEmbeddingCache())
    image = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    predictor(image, COCO_20)  # the 20 class names cached: what is timed is the image
    path = Pipeline(f"MaskCLIP {model} ({mode}), SCLIP protocol, 375x500, 20 classes")

    @path.stage("whole predictor")
    def whole_predictor(state):
        predictor(image, COCO_20)

    return path, {}, lambda: whole_predictor({})


# -------------------------------------------------------------------------------------------------- printing
def print_rows(rows: list[dict], limit: float, before: bool) -> None:
    print(f"\n| path | stage | GFLOP | GFLOP done | s | GFLOP/s | % of limit |{' s before | speed-up |' if before else ''}")
    print(f"|---|---|---|---|---|---|---|{'---|---|' if before else ''}")
    for group in dict.fromkeys(r["path"] for r in rows):
        stages = [r for r in rows if r["path"] == group]
        total = {"stage": "**total**", "gflop": sum(r["gflop"] for r in stages),
                 "done": sum(r["done"] for r in stages), "s": sum(r["s"] for r in stages),
                 "before_s": sum(r["before_s"] for r in stages) if before else None}
        for r in stages + ([total] if len(stages) > 1 else []):
            rate = r["gflop"] / r["s"]
            extra = f" {r['before_s']:.3f} | {r['before_s'] / r['s']:.2f}x |" if before else ""
            print(f"| {group} | {r['stage']} | {r['gflop']:.1f} | {r['done']:.1f} | {r['s']:.3f} | {rate:.0f} | "
                  f"{100 * rate / limit:.0f}% |{extra}")


def interleaved_ratio(clock: Clock, ours, peer, rounds: int) -> tuple[float, float, float]:
    """(median ours / peer of per-round ratios, median ours s, median peer s), rounds alternating the two."""
    ours(), peer()
    pairs = [(clock(ours), clock(peer)) for _ in range(rounds)]
    return (statistics.median(a / b for a, b in pairs), statistics.median(a for a, _ in pairs),
            statistics.median(b for _, b in pairs))


def process_latency(repeats: int) -> tuple[float, float]:
    """Median wall seconds of `python -c "import torch"` and of `ovdense segment` on one small image (the shipped
    model), each a fresh process."""
    from PIL import Image
    folder = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(folder / "a.png")
    commands = ([sys.executable, "-c", "import torch"],
                [sys.executable, "-m", "ovdense.cli", "segment", str(folder / "a.png"), "--classes", "sky, grass",
                 "--output", str(folder / "out")])
    times = []
    for command in commands:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            runs.append(time.perf_counter() - start)
        times.append(statistics.median(runs))
    return times[0], times[1]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--proposals", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--before", action="store_true", help="also time the straightforward forms")
    parser.add_argument("--skip", nargs="*", default=[], choices=["glip", "regionclip", "maskclip", "peers", "process"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = Clock(args.device)
    limit = limits(clock, args.repeats)
    print(f"device {args.device}, {torch.get_num_threads()} threads; limits (GFLOP/s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in limit.items()))
    rgb = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    paths = {}
    if "glip" not in args.skip:
        paths["glip"] = glip_path(args.device, rgb)
    if "regionclip" not in args.skip:
        for count, entry in zip(args.proposals, regionclip_paths(args.device, rgb, args.proposals)):
            paths[f"regionclip {count}"] = entry
    if "maskclip" not in args.skip:
        for model in ("ViT-B-16", "RN50"):
            paths[f"maskclip {model}"] = maskclip_path(args.device, model)
    rows = []
    for key, (path, state, _) in paths.items():
        print(f"measuring {path.name} ...", file=sys.stderr)
        rows += measure(path, state, clock, args.repeats, args.before)
    print_rows(rows, limit["matmul float32"], args.before)
    if args.device == "cuda":
        print("\nimages/s: " + ", ".join(f"{p.name}: {1 / sum(r['s'] for r in rows if r['path'] == p.name):.2f}"
                                         for p, _, _ in paths.values()))

    if "peers" not in args.skip:
        try:
            import hf_peers
            peers = {"GroundingDINO-T": hf_peers.grounding_dino_tiny(*(800, 1088), COCO_20, args.device),
                     "OWLv2 B/16": hf_peers.owlv2_base16(COCO_20, args.device),
                     "CLIPSeg": hf_peers.clipseg(COCO_20, args.device)}
        except ImportError as error:
            print(f"\npeers skipped: {error}")
        else:
            print("\n| ovdense | peer (its input) | ovdense s | peer s | time ratio ovdense / peer |\n|---|---|---|---|---|")
            pairs = [("glip", "GroundingDINO-T"), (f"regionclip {args.proposals[-1]}", "GroundingDINO-T"),
                     (f"regionclip {args.proposals[-1]}", "OWLv2 B/16"), ("maskclip ViT-B-16", "CLIPSeg")]
            for ours, theirs in pairs:
                if ours in paths:
                    peer = peers[theirs]
                    ratio, a, b = interleaved_ratio(clock, paths[ours][2], peer.run, args.repeats)
                    print(f"| {paths[ours][0].name} | {peer.name} ({peer.input}) | {a:.3f} | {b:.3f} | {ratio:.2f} |")
    if "process" not in args.skip and args.device == "cpu":
        torch_s, segment_s = process_latency(args.repeats)
        print(f"\nwhole process: `python -c \"import torch\"` {torch_s:.2f} s, one-image `ovdense segment` "
              f"{segment_s:.2f} s ({segment_s / torch_s:.2f}x)")


if __name__ == "__main__":
    main()
