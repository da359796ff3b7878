"""Command line: ovdense demo | segment | detect | eval | synth | train | models.

torch and open_clip are imported inside the commands, so `ovdense --help` answers at once. Every failure is one
`error:` line on stderr, never a traceback (unless -v): exit code 1 for data and runtime errors, 2 for usage.
"""
from __future__ import annotations

import argparse
import glob
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .catalog import (CHUNKERS, DATASETS, DENSE_MODES, DETECTION_METHODS, DETECTION_PRESETS, DETECTION_PROTOCOLS, METHODS, NMS_KINDS,
                      TEMPLATE_SETS, TRAINED_METHODS)
from .errors import InputError, UsageError
from .presets import PRESETS

logger = logging.getLogger("ovdense")

SYNTHETIC_NOTE = ("weights: the tiny CLIP that ships with ovdense, trained from scratch on the synthetic world's "
                  "captions (configs/tiny_clip_vit_synthetic.yaml); it knows only that world's words. For real images "
                  "use real CLIP weights: ovdense demo --model ViT-B-16 --weights openai --preset default.")
SHIPPED_MODEL = "ovdense-tiny-vit"  # the CLIP the shipped segmenters run on
REAL_MODEL = "ViT-B-16"  # the architecture real weights named alone (--weights openai) imply
RANDOM_NOTE = ("weights: RANDOM initialisation. No pretrained CLIP weights are available offline, so these masks "
               "show the pipeline working, not CLIP's knowledge. For real results pass --weights openai "
               "(downloaded once, then cached) or --weights /path/to/checkpoint.pt.")


class _Parser(argparse.ArgumentParser):
    """argparse's usage errors as one `error:` line (exit code 2), pointing at --help."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in --help (where it has one)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


MODEL_RULE = (f"Without --model and --weights every command runs the CLIP that ships with ovdense ({SHIPPED_MODEL}, "
              "weights 'synthetic': offline, but it knows only the synthetic world's words). For real images name "
              "real weights, e.g. --model ViT-B-16 --weights openai (one flag implies the other: --model alone takes "
              "its first open_clip tag, --weights alone takes ViT-B-16, or the tiny CLIP for 'synthetic').")


def _add_model_args(parser: argparse.ArgumentParser, methods=METHODS, presets=None) -> None:
    group = parser.add_argument_group("model", MODEL_RULE)
    group.add_argument("--model", help="open_clip architecture (see `ovdense models`; default: the one --weights or a "
                                       f"--checkpoint implies, else {SHIPPED_MODEL})")
    group.add_argument("--weights", help="CLIP weights: open_clip pretrained tag, a checkpoint file, a transformers "
                                         "CLIP folder (config.json + model.safetensors; --model then optional), "
                                         "'synthetic' (shipped) or 'random' (default: the --model's first tag, or "
                                         "those a --checkpoint records)")
    group.add_argument("--method", choices=methods,
                       help=f"default: the one a --checkpoint records, else maskclip; trained methods "
                            f"({', '.join(TRAINED_METHODS)}) need --checkpoint")
    group.add_argument("--checkpoint", help="a trained method's file (from `ovdense train METHOD`)")
    group.add_argument("--mode", choices=DENSE_MODES, help="dense-feature mode (default: the preset's, else maskclip)")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")
    group.add_argument("--half", action="store_true",
                       help="encode images in lower precision where this device runs it faster: fp16 on a GPU; "
                            "bf16 on a CPU only if a quick test measures it faster than fp32 (CPUs with AMX: about "
                            "5x faster; without bf16 units several times slower: then fp32, with a warning)")
    group.add_argument("--batch-size", type=int, default=8, help="crops embedded per forward pass")
    group.add_argument("--no-cache", action="store_true",
                       help="do not read or write the on-disk text-embedding cache ($OVDENSE_CACHE_DIR, default "
                            "~/.cache/ovdense)")
    proto = parser.add_argument_group("protocol (each overrides the preset)")
    proto.add_argument("--preset", choices=presets or sorted(PRESETS),
                       help="published inference settings (default: the one the weights or checkpoint recommend, "
                            "else 'default')")
    proto.add_argument("--short-side", type=int, help="resize the image's short side to this many pixels")
    proto.add_argument("--crop", type=int, help="sliding-window size; 0 for whole-image inference")
    proto.add_argument("--stride", type=int, help="sliding-window step")
    proto.add_argument("--templates", choices=TEMPLATE_SETS, help="prompt templates")
    proto.add_argument("--logit-scale", type=float, help="multiplies cosine similarities before the softmax")
    proto.add_argument("--pamr", type=int, dest="pamr_iterations", help="PAMR iterations (0: off)")
    proto.add_argument("--background-threshold", type=float, help="best-class probability under which a pixel is "
                                                                    "background")
    proto.add_argument("--area-threshold", type=float, help="drop classes covering at most this share (SCLIP)")
    proto.add_argument("--prompt-denoising", type=float, help="MaskCLIP's prompt denoising threshold (0: off)")
    proto.add_argument("--key-smoothing", type=float, help="MaskCLIP's key smoothing threshold (0: off)")


def _protocol(args, preset: str, dataset: str | None):
    """The preset's protocol for `dataset` with the protocol options applied (each checked by Protocol)."""
    from dataclasses import replace

    from .presets import get_protocol
    protocol = get_protocol(preset).for_dataset(dataset)
    if args.crop is not None:  # 0: whole-image inference; a smaller crop takes a stride that still covers the image
        whole = args.crop == 0
        stride = None if whole else args.stride or min(protocol.stride or args.crop, args.crop)
        protocol = replace(protocol, crop=None if whole else args.crop, stride=stride)
    return protocol.updated(
        short_side=args.short_side, stride=None if args.crop is not None else args.stride, templates=args.templates,
        logit_scale=args.logit_scale, pamr_iterations=args.pamr_iterations,
        background_threshold=args.background_threshold, area_threshold=args.area_threshold,
        prompt_denoising=args.prompt_denoising, key_smoothing=args.key_smoothing)


def _check_model_options(args, dataset: str | None = None) -> None:
    """The model and protocol options, checked before torch is imported, so that a mistake is reported at once."""
    from .device import check_device_name
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_device_name(args.device)
    _protocol(args, args.preset or "default", dataset)


def _build_predictor(args, dataset: str | None = None):
    """The predictor the options describe; the preset defaults to the one the weights or checkpoint recommend."""
    from .device import half_precision, resolve_device
    from .methods import read_trained, recommended_preset
    from .predictor import build_predictor
    from .text.cache import disable_disk_cache
    if args.checkpoint and not args.method:  # a trained checkpoint records its method
        args.method = read_trained(args.checkpoint, tensors=False)[0]["method"]
    args.method = args.method or "maskclip"
    _complete_model_flags(args)
    if args.method in TRAINED_METHODS and args.mode:
        raise UsageError(f"--mode applies to the training-free method (maskclip); {args.method} has its own dense head")
    model, weights = args.model, args.weights
    recommended = recommended_preset(args.method, model, weights, args.checkpoint)
    args.preset = args.preset or recommended or "default"
    protocol = _protocol(args, args.preset, dataset)
    device = resolve_device(args.device)
    if args.no_cache:
        disable_disk_cache()
    logger.info("preset %s (%s)", args.preset, "recommended by the weights" if args.preset == recommended else "chosen")
    return build_predictor(model, weights, args.method, args.mode, preset=protocol, device=str(device),
                           checkpoint=args.checkpoint, batch_size=args.batch_size,
                           autocast=half_precision(device) if args.half else None)


def _complete_model_flags(args) -> None:
    """Fill --model / --weights by MODEL_RULE (a --checkpoint records its own), and give a trained --method on the
    shipped CLIP the checkpoint that ships for it."""
    import open_clip

    from . import demo
    from .backbones.loading import HF_CLIP, PACKAGED_WEIGHTS, is_model_folder
    if getattr(args, "checkpoint", None):
        return
    if args.model is None and args.weights is not None and is_model_folder(args.weights):
        args.model = HF_CLIP  # a transformers CLIP folder: its config.json says the architecture
    if args.model is None:
        args.model = SHIPPED_MODEL if args.weights in (None, *(tag for _, tag in PACKAGED_WEIGHTS)) else REAL_MODEL
    if args.weights is None:
        tags = [tag for name, tag in PACKAGED_WEIGHTS if name == args.model]
        tags = tags or open_clip.list_pretrained_tags_by_model(args.model)
        if not tags:
            raise UsageError(f"--model {args.model}: no pretrained weights are known for it; give --weights (an open_clip "
                             "tag, a checkpoint file or 'random'); `ovdense models` lists architectures and their tags")
        args.weights = tags[0]
    if args.method in TRAINED_METHODS and (args.model, args.weights) == (SHIPPED_MODEL, "synthetic"):
        args.checkpoint = str(demo.shipped_method(args.method).checkpoint)


def _describe(predictor) -> dict:
    from dataclasses import asdict
    backbone = predictor.backbone
    return {"model": backbone.name, "weights": backbone.weights, "method": predictor.method.name,
            "mode": getattr(predictor.method, "mode", None),
            "protocol": {k: v for k, v in asdict(predictor.protocol).items() if k != "dataset_overrides"}}


def _segment_one(predictor, image_path: Path, vocabulary, out_dir: Path, stem: str, note: str | None) -> dict:
    """Segment one image and write <stem>_overlay.png, <stem>_labels.png and <stem>.json; returns the summary."""
    result = predictor(image_path, vocabulary)
    result.save(out_dir, stem, metadata={"image": str(image_path), **_describe(predictor)}, note=note)
    return result.summary(rle=False)


def _vocabulary(args):
    classes_file = getattr(args, "classes_file", None)
    if bool(args.classes) == bool(classes_file):  # checked before the import below loads torch
        raise UsageError("give the classes with exactly one of --classes 'cat, dog; puppy' or --classes-file FILE")
    from .text import Vocabulary
    if classes_file:
        return Vocabulary.from_file(classes_file)
    try:
        return Vocabulary.parse(args.classes)
    except ValueError as error:  # a bad --classes value is a usage error; a bad file's content a data error
        raise UsageError(f"--classes: {error}") from error


def expand_inputs(patterns: list[str], exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """Image paths from files, folders (their images, not recursive) and globs ('photos/**/*.jpg'), in order,
    each file once; and a message for each pattern that gave none. Files under `exclude` (the output folder)
    are skipped."""
    from .data.datasets import IMAGE_SUFFIXES
    found, unmatched = [], []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists() or not glob.has_magic(pattern):
            matches = [path]  # a missing plain path is reported when it is read
        else:
            matches = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))
                       if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES]
        kept = [p for p in matches if exclude is None or exclude.resolve() not in p.resolve().parents]
        if not kept:
            unmatched.append(f"{pattern}: no image found there" if not matches else
                             f"{pattern}: only files inside --output {exclude}, which are never read as inputs")
        found += kept
    unique = {p.resolve(): p for p in reversed(found)}  # one file named twice (relative, absolute) runs once
    return [p for p in found if unique.get(p.resolve()) is p], unmatched


def output_stems(paths: list[Path]) -> list[str]:
    """Output file stems, all distinct (ignoring letter case): each image's own stem, or, when two images share one
    (a/x.jpg, b/x.jpg), their paths relative to their common folder ('a__x', 'b__x'), numbered where even those
    are equal ('a__x', 'a__x-2' for a/x.jpg and a/x.png)."""
    stems = [p.stem for p in paths]
    if len({s.lower() for s in stems}) < len(stems):
        root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
        relative = [p.resolve().relative_to(root) for p in paths]
        stems = [str(r.with_suffix("")).replace(os.sep, "__") for r in relative]
    taken: set[str] = set()  # still equal (a/x.png beside a__x.png or a/x.jpg; letter case): numbered
    for i, stem in enumerate(stems):
        unique, n = stem, 1
        while unique.lower() in taken:
            n += 1
            unique = f"{stem}-{n}"
        taken.add(unique.lower())
        stems[i] = unique
    return stems


def cmd_segment(args) -> int:

    _check_model_options(args)
    vocabulary, out_dir, paths, failed = _inputs(args)
    if not paths:
        return 1
    predictor = _build_predictor(args)
    random = predictor.backbone.weights.startswith("random")
    note = RANDOM_NOTE.split(".")[0] if random else None

    def segment(path: Path, stem: str) -> str:
        summary = _segment_one(predictor, path, vocabulary, out_dir, stem, note)
        found = ", ".join(f"{s['label']} {100 * s['area']:.1f}%" for s in summary["segments"])
        return f"{path}: {found} -> {out_dir / stem}_overlay.png"
    return _each_image(paths, failed, out_dir, "segment", args.quiet, segment)


def _inputs(args) -> tuple:
    """segment / detect: (vocabulary, output folder, the input images, how many inputs matched none); each input
    that matched nothing is reported."""
    vocabulary = _vocabulary(args)
    return (vocabulary, *_images(args))


def _images(args) -> tuple:
    """(output folder, the input images, how many inputs matched none); each input that matched nothing is
    reported."""
    from .io import prepare_output_dir
    out_dir = prepare_output_dir(args.output)
    paths, unmatched = expand_inputs(args.images, exclude=out_dir)
    for message in unmatched:
        _error(message)
    return out_dir, paths, len(unmatched)


def _each_image(paths: list[Path], failed: int, out_dir: Path, desc: str, quiet: bool, work) -> int:
    """Run work(path, stem) -> a line to print over every input with a progress bar; an image that fails (bad input,
    out of memory) is reported and the others go on. failed: inputs that already failed. Returns the exit code."""
    import torch
    from tqdm import tqdm
    failures = failed
    for path, stem in tqdm(list(zip(paths, output_stems(paths))), desc=desc, unit="img",
                           disable=True if quiet or len(paths) < 2 else None):  # None: on a terminal only
        try:
            line = work(path, stem)
        except (InputError, MemoryError, torch.OutOfMemoryError) as error:  # this image fails; the others go on
            failures += 1
            reason = str(error) if isinstance(error, InputError) else f"{path}: out of memory ({error})"
            tqdm.write(f"error: {reason}", file=sys.stderr)
            continue
        tqdm.write(line)
    if failures and len(paths) + failed > 1:
        print(f"{failures} of {len(paths) + failed} inputs failed (see above); the others are in {out_dir}",
              file=sys.stderr)
    return 1 if failures else 0


def _add_detector_args(parser: argparse.ArgumentParser, methods=DETECTION_METHODS) -> None:
    group = parser.add_argument_group("detector")
    group.add_argument("--method", choices=methods, default=methods[0], help="the detection method")
    group.add_argument("--checkpoint", help="a trained detector (from `ovdense train regionclip|glip`)")
    group.add_argument("--weights", help="'synthetic': the detector shipped with ovdense; with --checkpoint: other "
                                         "CLIP weights for its text tower")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    group.add_argument("--no-cache", action="store_true", help="do not use the on-disk text-embedding cache")
    proto = parser.add_argument_group("protocol (each overrides the preset)")
    proto.add_argument("--preset", choices=DETECTION_PRESETS, help="published test settings (default: the one "
                                                                   "the detector recommends, else ov-coco for "
                                                                   "regionclip, glip for glip)")
    proto.add_argument("--nms", choices=NMS_KINDS, help="class-wise NMS, class-wise Gaussian soft-NMS, or none")
    proto.add_argument("--iou", type=float, dest="iou_threshold", help="the NMS IoU threshold")
    proto.add_argument("--top-k", type=int, dest="max_detections", help="most detections kept per image")


def _build_detection_predictor(args, score_threshold: float | None = None):
    """The detection predictor the options describe; returns (predictor, a dict describing it)."""
    from .detection.predictor import DetectionPredictor, GroundingPredictor
    from .device import check_device_name, resolve_device
    from .methods import DEFAULT_DETECTION_PRESETS, load_detector
    from .presets import get_detection_protocol
    from .text.cache import disable_disk_cache
    check_device_name(args.device)
    if getattr(args, "max_detections", None) is not None and args.max_detections < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.max_detections}")
    if args.no_cache:
        disable_disk_cache()
    detector, recommended = load_detector(args.method, args.checkpoint, args.weights, str(resolve_device(args.device)))
    protocol = get_detection_protocol(args.preset or recommended or DEFAULT_DETECTION_PRESETS[args.method]).updated(
        nms=getattr(args, "nms", None), iou_threshold=getattr(args, "iou_threshold", None),
        max_detections=getattr(args, "max_detections", None), score_threshold=score_threshold,
        per_prompt=False if getattr(args, "max_detections", None) else None)  # --top-k counts per image
    from dataclasses import asdict
    described = {"method": args.method, "model": detector.backbone.name, "weights": detector.backbone.weights,
                 "checkpoint": args.checkpoint, "protocol": asdict(protocol)}
    grounding = args.method == "glip"
    return (GroundingPredictor if grounding else DetectionPredictor)(detector, protocol), described


def cmd_detect(args) -> int:
    if not 0 <= args.threshold < 1:
        raise UsageError(f"--threshold must be in [0, 1), got {args.threshold}")
    vocabulary, out_dir, paths, failed = _inputs(args)
    if not paths:
        return 1
    # RegionCLIP's score threshold is the --threshold itself; GLIP keeps its pre-NMS one (on a phrase's score before
    # centerness) and --threshold filters the final scores
    predictor, described = _build_detection_predictor(
        args, score_threshold=args.threshold if args.method == "regionclip" else None)

    def detect(path: Path, stem: str) -> str:
        from .visualize import score_text
        result = predictor(path, vocabulary).above(args.threshold)  # soft-NMS may decay scores under it
        result.save(out_dir, stem, metadata={"image": str(path), **described, "threshold": args.threshold})
        found = ", ".join(f"{d['label']} {score_text(d['score'])}" for d in result.to_list()[:8])
        more = f" (+{len(result) - 8} more)" if len(result) > 8 else ""
        return f"{path}: {len(result)} boxes{': ' + found if found else ''}{more} -> {out_dir / stem}_boxes.png"
    return _each_image(paths, failed, out_dir, "detect", args.quiet, detect)


def cmd_ground(args) -> int:
    """Boxes for the phrases of a caption in each image: <stem>_boxes.png and <stem>.json (per phrase its character
    spans and its boxes)."""
    from .detection.grounding import split_phrases
    if not 0 <= args.threshold < 1:
        raise UsageError(f"--threshold must be in [0, 1), got {args.threshold}")
    if not args.caption.strip():
        raise UsageError("--caption is empty: give the sentence whose phrases to ground")
    phrases = None
    if args.phrases is not None:
        phrases = split_phrases(args.phrases)
        if not phrases:
            raise UsageError("--phrases is empty: give phrases of the caption separated by ';', or leave it out")
    out_dir, paths, failed = _images(args)
    if not paths:
        return 1
    predictor, described = _build_detection_predictor(args)  # GLIP's own pre-NMS threshold; --threshold after

    def ground(path: Path, stem: str) -> str:
        from .visualize import score_text
        predictor.set_image(path)
        result = predictor.ground(args.caption, phrases, args.chunker).above(args.threshold)
        result.save(out_dir, stem, metadata={"image": str(path), **described, "threshold": args.threshold})
        found = "; ".join(f"{p['phrase']}: {len(p['boxes'])} box{'es' if len(p['boxes']) != 1 else ''}"
                          + (f" (best {score_text(p['boxes'][0]['score'])})" if p["boxes"] else "")
                          for p in result.summary()["phrases"])
        return f"{path}: {found} -> {out_dir / stem}_boxes.png"
    return _each_image(paths, failed, out_dir, "ground", args.quiet, ground)


def cmd_pseudo_label(args) -> int:
    """A teacher GLIP grounds captions' phrases; its confident boxes become grounding data for a student."""
    from .engine.glip_train import pseudo_label
    from .io import check_output_file
    if not 0 <= args.threshold < 1:
        raise UsageError(f"--threshold must be in [0, 1), got {args.threshold}")
    check_output_file(args.output)
    predictor, _ = _build_detection_predictor(args)
    counts = pseudo_label(predictor, args.captions, args.output, args.threshold, args.skip_boxed, args.chunker,
                          progress=not args.quiet)
    print(f"{counts['kept']} of {counts['captions']} captions kept with {counts['boxes']} boxes above "
          f"{args.threshold} -> {args.output}")
    return 0


def cmd_export(args) -> int:
    """A training-free segmenter as ONNX (image encoder with dynamic batch, height and width) plus the vocabulary's
    text embeddings, for onnxruntime alone (`ovdense.onnx_runtime.OnnxSegmenter`)."""
    from .backbones import load_clip
    from .io import prepare_output_dir
    from .methods import recommended_preset
    from .onnx_export import export_onnx
    from .presets import get_protocol
    from .text import resolve_templates
    if args.format != "onnx":
        raise UsageError(f"--format {args.format}: only onnx is supported")
    vocabulary = _vocabulary(args)
    args.method, args.checkpoint = "maskclip", None
    _complete_model_flags(args)
    clip = load_clip(args.model, args.weights, device="cpu")
    mode = args.mode or "maskclip"
    if mode not in clip.supported_modes():
        raise UsageError(f"--mode {mode} is not available for {clip.name}; choose one of "
                         f"{', '.join(clip.supported_modes())}")
    protocol = get_protocol(recommended_preset("maskclip", args.model, args.weights) or "default")
    out_dir = prepare_output_dir(args.output)
    paths = export_onnx(clip, mode, vocabulary, resolve_templates(args.templates or protocol.templates), out_dir,
                        logit_scale=protocol.logit_scale, short_side=protocol.short_side)
    print(f"wrote {', '.join(str(p) for p in paths.values())}; segment with onnxruntime alone: "
          f"ovdense.onnx_runtime.OnnxSegmenter('{out_dir}')")
    return 0


def cmd_serve(args) -> int:
    """Serve segmentation over HTTP (see `ovdense.serve`); beyond loopback an --api-key is required."""
    import ipaddress
    import signal
    import threading
    if (args.port < 0 or args.port > 65535 or args.queue < 0 or args.timeout <= 0 or args.max_upload_mb <= 0
            or args.max_classes < 1 or args.max_megapixels <= 0):
        raise UsageError("--port must be 0-65535, --queue >= 0, --timeout, --max-upload-mb and --max-megapixels > 0, "
                         "--max-classes >= 1")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.api_key:
        raise UsageError(f"--host {args.host} is reachable beyond this machine: give --api-key KEY (clients send "
                         "'Authorization: Bearer KEY')")
    try:
        import uvicorn

        from .serve import ModelWorker, create_app
    except ImportError as error:
        raise UsageError("ovdense serve needs FastAPI and uvicorn: pip install 'ovdense[serve]'") from error
    _check_model_options(args)
    if args.method:  # a method named on the shipped tiny CLIP: its shipped checkpoint (default: maskclip, any words)
        _use_shipped_method(args)
    args.no_cache = True  # the text cache stays in memory: nothing a request sends reaches the disk
    predictor = _build_predictor(args)
    described = {**_describe(predictor), "preset": args.preset, "device": str(predictor.device)}
    detector = detector_described = None
    if args.detector != "none":
        detector, detector_described = _build_detection_predictor(argparse.Namespace(
            method=args.detector, checkpoint=args.detector_checkpoint,
            weights=args.detector_weights or (None if args.detector_checkpoint else "synthetic"), device=args.device,
            no_cache=args.no_cache, preset=None))
    for model in (predictor, detector):
        if model is not None:
            model.max_pixels = int(args.max_megapixels * 1e6)
    worker = ModelWorker(predictor, args.batch_size, own_thread=False)  # the models run here, where they loaded
    app = create_app(predictor, described, api_key=args.api_key, max_upload=int(args.max_upload_mb * 1024 * 1024),
                     queue=args.queue, timeout=args.timeout, max_classes=args.max_classes, detector=detector,
                     detector_described=detector_described, worker=worker)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn, off the main thread, leaves the signals to us
        signal.signal(sig, server.handle_exit)
    def serve() -> None:
        try:
            server.run()
        finally:  # also when the server could not start (the port taken): the worker must not wait forever
            worker.close()
    serving = threading.Thread(target=serve, name="ovdense-http")
    serving.start()
    try:
        print(f"serving {described['method']} on {described['model']} at http://{args.host}:{args.port} "
              "(docs at /docs)", flush=True)
        worker.run()  # until the server's shutdown closes the worker, after the requests in flight
    finally:  # the worker ended otherwise: the server must not go on without it
        server.should_exit = True
        serving.join()
    return 0 if server.started else 1


def _use_shipped_method(args):
    """On the shipped tiny CLIP (default model and weights, no checkpoint), set args to the best method that ships
    for it (or the shipped one `--method` names); returns that ShippedMethod, or None."""
    from . import demo
    if args.checkpoint or args.model not in (None, SHIPPED_MODEL) or args.weights not in (None, "synthetic"):
        return None
    shipped = demo.shipped_method(args.method)
    if shipped:
        args.method, args.checkpoint = shipped.method, shipped.checkpoint and str(shipped.checkpoint)
    return shipped


def cmd_demo(args) -> int:
    from . import demo
    from .data.synthetic import SyntheticWorld
    from .io import prepare_output_dir
    from .text import Vocabulary
    if args.scene < 0 or args.zoom < 1:
        raise UsageError("--scene must be >= 0 and --zoom >= 1")
    _check_model_options(args)
    shipped = _use_shipped_method(args)
    out_dir = prepare_output_dir(args.output)
    world = SyntheticWorld()  # the world the shipped models were trained on
    predictor = _build_predictor(args)
    backbone = predictor.backbone
    random = backbone.weights.startswith("random")
    print(f"ovdense demo: model {backbone.name}, weights {backbone.weights}, method {predictor.method.name}, "
          f"preset {predictor.protocol.name}")
    if shipped:
        best = shipped is demo.shipped_method()
        print(f"method: {shipped.title}, {'the best that ships' if best else 'as asked'}: {demo.why(shipped)}")
    print(RANDOM_NOTE if random else SYNTHETIC_NOTE if backbone.name.startswith("ovdense-tiny") else "")
    vocabulary = _vocabulary(args) if args.classes else Vocabulary.coerce(world.classes)
    check = demo.run_demo(predictor, world, args.scene, vocabulary, out_dir, args.zoom, metadata=_describe(predictor))
    print(f"val scene {args.scene}; its captions: " + " | ".join(check["captions"]))
    unknown = check["unknown_classes"]
    print(f"classes: {', '.join(vocabulary.names)} (novel things, never in any mask or box of the training data: "
          f"{', '.join(world.novel)})" + (f"; not in the world, so counted wrong: {', '.join(unknown)}" if unknown else ""))
    print("each thing, and the label most of its pixels got:")
    for thing in check["things"]:
        mark = "right" if thing["correct"] else "WRONG"
        print(f"  {thing['name']:<18}{' (novel)' if thing['novel'] else '':<9}-> {thing['predicted']:<12} "
              f"{100 * thing['share']:3.0f}% of its pixels  {mark}")
    right = sum(t["correct"] for t in check["things"])
    print(f"against the exact ground truth: pixel accuracy {check['pixel_accuracy']:.1f}%, "
          f"things right {right} of {len(check['things'])}")
    print(f"wrote {out_dir}/demo_scene_overlay.png (prediction), demo_scene_truth.png (ground truth), "
          "demo_scene_labels.png, demo_scene.json")
    if shipped:
        _demo_detection(args, world, out_dir)
        _demo_grounding(args, world, out_dir)
    return 0


def _demo_grounding(args, world, out_dir: Path) -> None:
    """The demo's third part: the shipped GLIP grounds the phrases of one of the scene's captions, each checked
    against its exact box."""
    from . import demo
    from .methods import PACKAGED_DETECTORS
    from .visualize import score_text
    if not PACKAGED_DETECTORS[("glip", "synthetic")][0].is_file():
        return
    grounding_args = argparse.Namespace(**{**vars(args), "method": "glip", "checkpoint": None, "weights": "synthetic",
                                           "preset": None})
    predictor, described = _build_detection_predictor(grounding_args)
    check = demo.run_grounding_demo(predictor, world, args.scene, out_dir, args.zoom, described)
    print(f"\ngrounding: glip (shipped checkpoint, model {predictor.detector.backbone.name}), caption "
          f"{check['caption']!r}; each phrase, and its best box against its exact box:")
    for phrase in check["phrases"]:
        found = phrase["found"]
        shown = (f"score {score_text(found['score'])}, IoU {found['iou']:.2f}  "
                 f"{'right' if found['correct'] else 'WRONG'}"
                 if found else "no box  MISSED")
        novel = " (novel)" if phrase["category"] in world.novel else ""
        print(f"  {phrase['phrase']:<22}{novel:<9}-> {shown}")
    right = sum(bool(p["found"] and p["found"]["correct"]) for p in check["phrases"])
    print(f"phrases grounded right {right} of {len(check['phrases'])}")
    print(f"wrote {out_dir}/demo_scene_grounding_boxes.png, demo_scene_grounding.json")


def _demo_detection(args, world, out_dir: Path) -> None:
    """The demo's second half: the shipped RegionCLIP detector on the same scene, checked against the exact boxes."""
    from . import demo
    from .methods import PACKAGED_DETECTORS
    from .text import Vocabulary
    from .visualize import score_text
    if not PACKAGED_DETECTORS[("regionclip", "synthetic")][0].is_file():
        return
    # a picture for people: hard class-wise NMS instead of the evaluation's soft-NMS
    detection_args = argparse.Namespace(**{**vars(args), "method": "regionclip", "checkpoint": None,
                                           "weights": "synthetic", "preset": None, "nms": "class"})
    predictor, described = _build_detection_predictor(detection_args)
    vocabulary = _vocabulary(args) if args.classes else Vocabulary.coerce(list(world.things))
    check = demo.run_detection_demo(predictor, world, args.scene, vocabulary, out_dir, args.zoom, described)
    print(f"\ndetection: regionclip (shipped checkpoint, model {predictor.detector.clip.name}), classes "
          f"{', '.join(vocabulary.names)}; each thing, and its best box scoring above {check['min_score']} "
          "with IoU >= 0.5 against its exact box:")
    for thing in check["things"]:
        found = thing["detection"]
        shown = (f"{found['label']:<12} score {score_text(found['score'])}, IoU {found['iou']:.2f}  "
                 f"{'right' if found['correct'] else 'WRONG'}") if found else "no box            MISSED"
        novel = " (novel)" if thing["category"] in world.novel else ""
        print(f"  {thing['name']:<18}{novel:<9}-> {shown}")
    right = sum(bool(t["detection"] and t["detection"]["correct"]) for t in check["things"])
    print(f"things found and named right {right} of {len(check['things'])}; boxes matching no thing: "
          f"{check['unmatched_detections']}")
    print(f"wrote {out_dir}/demo_scene_detection_boxes.png, demo_scene_detection.json")


def _finite(value):
    """JSON has no NaN (a class absent from the data has no IoU): null instead."""
    import math
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return [_finite(v) for v in value] if isinstance(value, (list, tuple)) else value


def cmd_eval_detection(args) -> int:
    import json

    from .io import check_output_file, write_text_atomic
    if args.method not in DETECTION_METHODS:
        raise UsageError(f"--annotations evaluates a detector: --method {' or '.join(DETECTION_METHODS)}, not "
                         f"{args.method}")
    if args.preset is not None and args.preset not in DETECTION_PRESETS:
        raise UsageError(f"--preset {args.preset} is a segmentation preset; detection has {', '.join(DETECTION_PRESETS)}")
    for option in ("output", "results"):
        if getattr(args, option):
            check_output_file(getattr(args, option), f"--{option}")
    from .data.detection import DetectionDataset
    from .eval.detection import check_protocol, default_protocol, evaluate_detection, format_detection_metrics
    dataset = DetectionDataset(args.annotations, args.images)
    protocol = args.protocol or default_protocol(dataset)
    check_protocol(dataset, protocol, args.fixed_ap)
    predictor, described = _build_detection_predictor(args)
    if protocol == "lvis" and args.preset is None:
        predictor.protocol = predictor.protocol.updated(max_detections=300)
    metrics = evaluate_detection(predictor, dataset, protocol, limit=args.limit, progress=not args.quiet,
                                 fixed_ap=args.fixed_ap, results_path=args.results)
    if not _reporting_rank():
        return 0
    print(format_detection_metrics(metrics, protocol))
    if args.output:
        report = {"annotations": str(args.annotations), "images": min(len(dataset), args.limit or len(dataset)),
                  **described, "metrics_protocol": protocol, "fixed_ap": args.fixed_ap, "metrics": metrics}
        write_text_atomic(args.output, json.dumps(_finite(report), indent=2, allow_nan=False))
        print(f"wrote {args.output}")
    return 0


def _reporting_rank() -> bool:
    """After an evaluation under torchrun (every rank holds the gathered metrics): the process group is closed, and
    True on rank 0, which reports; True without torchrun."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return True
    rank = dist.get_rank()
    dist.destroy_process_group()
    return rank == 0


def cmd_eval_grounding(args) -> int:
    import json

    from .io import check_output_file, write_text_atomic
    if args.method != "glip":
        raise UsageError(f"--grounding evaluates phrase grounding: --method glip, not {args.method}")
    if args.output:
        check_output_file(args.output)
    from .eval.grounding import evaluate_grounding, format_grounding_metrics, read_grounding
    read_grounding(args.grounding, check_images=True)  # a broken file or a missing image: an error before the model
    predictor, described = _build_detection_predictor(args)
    metrics = evaluate_grounding(predictor, args.grounding, limit=args.limit, progress=not args.quiet)
    if not _reporting_rank():
        return 0
    print(format_grounding_metrics(metrics))
    if args.output:
        report = {"grounding": str(args.grounding), **described, "metrics": metrics}
        write_text_atomic(args.output, json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return 0


def cmd_eval(args) -> int:
    import json

    from .io import check_output_file, write_text_atomic
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.annotations:
        return cmd_eval_detection(args)
    if args.grounding:
        return cmd_eval_grounding(args)
    if args.dataset is None or args.root is None:
        raise UsageError("give --dataset and --root (segmentation), --annotations (a COCO / LVIS JSON, detection) or "
                         "--grounding (a grounding JSONL)")
    if args.method in DETECTION_METHODS or args.preset in DETECTION_PRESETS:
        raise UsageError(f"{args.method if args.method in DETECTION_METHODS else args.preset} is for detection: "
                         "evaluate it with --annotations FILE")
    _check_model_options(args, args.dataset)
    if args.output:
        check_output_file(args.output)
    from .data import SegmentationDataset
    from .eval import evaluate_segmentation, format_table
    dataset = SegmentationDataset(args.dataset, args.root, args.split)
    predictor = _build_predictor(args, dataset=args.dataset)
    metrics = evaluate_segmentation(predictor, dataset, limit=args.limit, progress=not args.quiet)
    if not _reporting_rank():
        return 0
    print(format_table(metrics, dataset.vocabulary.names))
    if args.output:
        report = {"dataset": args.dataset, "split": args.split, "images": min(len(dataset), args.limit or len(dataset)),
                  **_describe(predictor), "metrics": metrics, "classes": dataset.vocabulary.names}
        write_text_atomic(args.output, json.dumps(_finite(report), indent=2, allow_nan=False))
        print(f"wrote {args.output}")
    return 0


def cmd_synth(args) -> int:
    from .data.export import export_world
    from .data.synthetic import SyntheticWorld
    from .io import prepare_output_dir
    for option, least in (("train", 0), ("val", 0), ("size", 32), ("max_objects", 1)):
        if getattr(args, option) < least:
            raise UsageError(f"--{option.replace('_', '-')} must be at least {least}, got {getattr(args, option)}")
    if args.train + args.val == 0:
        raise UsageError("--train and --val are both 0: nothing to export")
    prepare_output_dir(args.output)
    world = SyntheticWorld(size=args.size, seed=args.seed, max_objects=args.max_objects)
    out = export_world(world, args.output, {"train": args.train, "val": args.val}, progress=not args.quiet)
    print(f"wrote the synthetic world (seed {args.seed}, {args.size}px, {args.train} train / {args.val} val) to {out}")
    print(f"  evaluate on it: ovdense eval --dataset folder --root {out} ...")
    return 0


def _check_train_flags(args) -> None:
    """The train options that cannot work are UsageErrors, found before the recipe is read."""
    from .device import resolve_device
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps: must be a positive number of steps, got {args.max_steps}")
    for option in ("output", "export", "config"):
        if getattr(args, option) is not None and not str(getattr(args, option)).strip():
            raise UsageError(f"--{option}: must not be empty")
    args.device = str(resolve_device(args.device))


def cmd_train(args) -> int:
    import os

    from .engine.recipe import load_recipe
    _check_train_flags(args)
    output = Path(args.output or f"runs/{args.what}")
    if args.what == "clip":
        from .engine.clip_pretrain import PretrainConfig, pretrain_clip
        recipe_class, train = PretrainConfig, pretrain_clip
    elif args.what in ("rpn", "regionclip-pretrain", "regionclip"):
        from .engine.regionclip_train import RECIPES
        recipe_class, train = RECIPES[args.what]
    elif args.what == "glip":
        from .engine.glip_train import GLIPRecipe, train_glip
        recipe_class, train = GLIPRecipe, train_glip
    else:
        from .engine.denseclip_train import DenseCLIPRecipe, train_denseclip
        from .engine.tcl_train import TCLRecipe, train_tcl
        recipe_class, train = {"tcl": (TCLRecipe, train_tcl), "denseclip": (DenseCLIPRecipe, train_denseclip)}[args.what]
    recipe = load_recipe(recipe_class, args.config, args.set)
    if args.export:  # a path on the command line is relative to the current directory
        recipe.export = os.path.abspath(os.path.expanduser(args.export))
    try:
        result = train(recipe, output, device=args.device, resume=not args.restart, max_steps=args.max_steps)
    except KeyboardInterrupt:
        every = recipe.train_config().checkpoint_every
        _error(f"interrupted; the run resumes from its last checkpoint {output / 'last.pt'} (written every {every} "
               "steps) when the same command is run again")
        return 130
    export = result[-1]
    if args.what == "clip":
        scores = result[1]
        print("zero-shot shape accuracy on val object crops: "
              f"base {scores['zs_base_acc']:.1f}%, novel {scores['zs_novel_acc']:.1f}% "
              f"(chance {scores['chance_acc']:.1f}%, {scores['zs_crops']} crops); colour {scores['zs_colour_acc']:.1f}%")
    if export is None:
        steps = recipe.train_config().steps
        print(f"stopped by --max-steps before the recipe's {steps} steps: nothing exported. The run resumes from "
              f"{output / 'last.pt'}: run the same command again (without --restart) to continue.")
        return 0
    if args.what in ("clip", "rpn", "regionclip-pretrain"):
        print(f"wrote {export}")
    elif args.what in ("regionclip", "glip"):
        print(f"wrote {export}; detect with: ovdense detect IMAGE --method {args.what} --checkpoint {export} "
              "--classes '...'")
    else:
        print(f"wrote {export}; segment with: ovdense segment IMAGE --method {args.what} --checkpoint {export} "
              "--classes '...'")
    return 0


CONVERTED = ("tcl", "denseclip", "regionclip", "glip")  # the official repositories `ovdense convert` reads
CONVERT_OPTIONS = {"glip": ("ema", "text_source", "preset"), "regionclip": ("class_names", "text_weights", "model", "preset")}


def cmd_convert(args) -> int:
    """An official checkpoint (with its companions, e.g. RegionCLIP's offline RPN) -> one ovdense file recording the
    method, the model it needs and the preset of the paper's test protocol."""
    import importlib

    from .errors import CheckpointError
    from .io import check_output_file
    from .methods import read_trained
    output = check_output_file(args.output)
    if output.suffix != ".safetensors":
        raise UsageError(f"--output {output}: ovdense writes .safetensors files; name it e.g. {output.stem}.safetensors")
    given = {"ema": args.ema or None, "text_source": args.text_source, "class_names": args.classes,
             "text_weights": args.text_weights, "model": args.model, "preset": args.preset}
    wrong = [key for key, value in given.items() if value is not None and key not in CONVERT_OPTIONS.get(args.method, ())]
    if wrong:
        flag = "--classes" if wrong[0] == "class_names" else "--" + wrong[0].replace("_", "-")
        raise UsageError(f"{flag} does not apply to `convert {args.method}` (see `ovdense convert --help`)")
    missing = [path for path in args.files if not Path(path).is_file()]
    if missing:
        raise InputError(f"{missing[0]} does not exist; `ovdense models` says where each official file is published")
    converter = importlib.import_module(f".convert.{args.method}", __package__)
    written = converter.convert(args.files, output, **{k: v for k, v in given.items() if v is not None})
    try:
        method = read_trained(written, tensors=False)[0]["method"]
    except CheckpointError:  # RegionCLIP's pretrained backbones become CLIP weights, not a method
        print(f"wrote {written}: CLIP weights; use them as --weights {written} with --model RN50 or RN50x4 (the "
              "architecture of the file), or as a RegionCLIP recipe's init")
        return 0
    command = "detect" if method in DETECTION_METHODS else "segment"
    print(f"wrote {written}; run it with: ovdense {command} IMAGE --checkpoint {written} --classes '...'")
    return 0


def _dense_modes_of(name: str) -> str:
    """The dense modes an open_clip architecture supports, from its config (no model is built)."""
    import open_clip

    from .catalog import RESNET_DENSE_MODES
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return "none (timm image tower)"
    if isinstance(vision.get("layers"), (list, tuple)):
        return ", ".join(RESNET_DENSE_MODES)
    if vision.get("attentional_pool") or vision.get("attn_pooler_heads") and vision.get("attentional_pool"):
        return "none (attention-pooled ViT)"
    return ", ".join(DENSE_MODES)


def cmd_models(args) -> int:
    import open_clip

    from .backbones.loading import PACKAGED_WEIGHTS
    from .demo import SHIPPED_METHODS
    from .methods import PACKAGED_DETECTORS
    from .zoo import RELEASES
    print("Shipped with ovdense (offline, no download):")
    for (name, tag), packaged in PACKAGED_WEIGHTS.items():
        print(f"  {name} --weights {tag}  (preset {packaged.preset}; dense modes: {_dense_modes_of(name)})")
        print(f"      {packaged.description}")
    for shipped in SHIPPED_METHODS:
        if shipped.checkpoint:
            print(f"  segment --method {shipped.method} --weights synthetic  (on ovdense-tiny-vit; mIoU {shipped.miou} "
                  f"on 200 synthetic val scenes; made by {shipped.command})")
    for (method, tag), (_, command, preset) in PACKAGED_DETECTORS.items():
        print(f"  detect --method {method} --weights {tag}  (preset {preset}; made by {command})")
    print("\nThe authors' released models (download the files from the source, then convert once):")
    for release in RELEASES:
        print(f"  {release.name}: {release.method}, {release.backbone}; preset {release.preset}")
        print(f"      paper: {release.paper}")
        print(f"      files: {', '.join(release.files)} from {release.source}")
        print(f"      {release.command}")
    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    print("\nopen_clip architectures (tags download once where the internet is reachable; or --weights FILE):")
    print(f"  {'architecture':<34} {'dense modes':<40} pretrained tags")
    for name in open_clip.list_models():
        print(f"  {name:<34} {_dense_modes_of(name):<40} {', '.join(tags.get(name, [])) or '-'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ovdense", description="Open-vocabulary dense prediction with CLIP.")
    parser.add_argument("--version", action="version", version=f"ovdense {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages (-vv: also open_clip's); "
                                                                           "tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or warnings; results and errors remain")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", formatter_class=_Formatter,
                          help="segment a synthetic-world scene end to end; runs offline")
    _add_model_args(demo)
    demo.add_argument("--classes", help="free-text classes (default: the synthetic world's 20 class names)")
    demo.add_argument("--scene", type=int, default=0, help="index of the val scene to segment")
    demo.add_argument("--zoom", type=int, default=4, help="the 96 px scene is shown this many times larger")
    demo.add_argument("--output", default="outputs/demo", help="folder for the pictures and JSON")
    demo.set_defaults(func=cmd_demo)

    srv = sub.add_parser("serve", formatter_class=_Formatter, help="serve segmentation over HTTP (FastAPI)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (beyond loopback needs --api-key)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", help="bearer token required on /v1 requests")
    srv.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads get 413")
    srv.add_argument("--queue", type=int, default=16, help="requests that may wait for the model (more get 503)")
    srv.add_argument("--timeout", type=float, default=120.0, help="seconds a request may wait and run (then 504)")
    srv.add_argument("--max-classes", type=int, default=1500, help="names a request may give, synonyms included")
    srv.add_argument("--max-megapixels", type=float, default=80.0,
                     help="larger images get 400 (an 80 MP image takes about 4.6 GB at its peak)")
    srv.add_argument("--detector", choices=("none",) + DETECTION_METHODS, default="glip",
                     help="the detector behind /v1/detect (and, glip, /v1/ground)")
    srv.add_argument("--detector-checkpoint", help="its trained file (default: the one shipped, --detector-weights "
                                                   "synthetic)")
    srv.add_argument("--detector-weights", help="'synthetic' (shipped) or CLIP weights for a --detector-checkpoint")
    _add_model_args(srv)
    srv.set_defaults(func=cmd_serve)

    seg = sub.add_parser("segment", formatter_class=_Formatter, help="segment images with free-text classes")
    seg.add_argument("images", nargs="+", help="image files, folders (their images) or globs ('photos/**/*.jpg')")
    seg.add_argument("--classes", help="'cat, dog; puppy, grass': ',' separates classes, ';' synonyms")
    seg.add_argument("--classes-file", help="one class per line, synonyms separated by ';'")
    seg.add_argument("--output", default="outputs/segment", help="folder for <stem>_overlay.png, _labels.png, .json")
    _add_model_args(seg)
    seg.set_defaults(func=cmd_segment)

    det = sub.add_parser("detect", formatter_class=_Formatter, help="detect free-text classes in images (boxes)")
    det.add_argument("images", nargs="+", help="image files, folders (their images) or globs ('photos/**/*.jpg')")
    det.add_argument("--classes", help="'heart, red star; star': ',' separates classes, ';' synonyms")
    det.add_argument("--classes-file", help="one class per line, synonyms separated by ';'")
    det.add_argument("--threshold", type=float, default=0.3, help="keep boxes scoring above this")
    det.add_argument("--output", default="outputs/detect", help="folder for <stem>_boxes.png and <stem>.json")
    _add_detector_args(det)
    det.set_defaults(func=cmd_detect)

    gr = sub.add_parser("ground", formatter_class=_Formatter,
                        help="find the things a caption's phrases name (GLIP phrase grounding)")
    gr.add_argument("images", nargs="+", help="image files, folders (their images) or globs")
    gr.add_argument("--caption", required=True, help="a sentence, e.g. 'a red star left of a small blue circle'")
    gr.add_argument("--phrases", help="the caption's phrases to ground, separated by ';' (default: its noun "
                                      "phrases, by --chunker)")
    gr.add_argument("--chunker", choices=CHUNKERS, default="auto",
                    help="noun phrases by NLTK's tagger and GLIP's grammar (nltk, needs its data), ovdense's rules "
                         "(rules), or nltk when usable else rules (auto)")
    gr.add_argument("--threshold", type=float, default=0.3, help="keep boxes scoring above this")
    gr.add_argument("--output", default="outputs/ground", help="folder for <stem>_boxes.png and <stem>.json")
    _add_detector_args(gr, methods=("glip",))
    gr.set_defaults(func=cmd_ground)

    pl = sub.add_parser("pseudo-label", formatter_class=_Formatter,
                        help="ground captions with a teacher GLIP and write its boxes as grounding data (self-training)")
    pl.add_argument("captions", help="a grounding JSONL (its phrase spans are used) or a captions JSONL ({image, "
                                     "caption}: phrases by --chunker)")
    pl.add_argument("--output", required=True, help="the grounding JSONL to write (images relative to it)")
    pl.add_argument("--threshold", type=float, default=0.5, help="keep boxes scoring above this; a caption with "
                                                                 "none is dropped")
    pl.add_argument("--skip-boxed", action="store_true", help="leave out captions whose phrases all have boxes")
    pl.add_argument("--chunker", choices=CHUNKERS, default="auto", help="noun phrases of plain captions")
    _add_detector_args(pl, methods=("glip",))
    pl.set_defaults(func=cmd_pseudo_label)

    ex = sub.add_parser("export", formatter_class=_Formatter,
                        help="export a training-free segmenter for onnxruntime (image encoder + text embeddings)")
    ex.add_argument("--format", default="onnx", help="onnx (the only one)")
    ex.add_argument("--classes", help="the vocabulary whose text embeddings are stored ('sky, grass; lawn')")
    ex.add_argument("--classes-file", help="one class per line")
    ex.add_argument("--model", help="open_clip architecture (default: the shipped ovdense-tiny-vit)")
    ex.add_argument("--weights", help="CLIP weights (default: synthetic)")
    ex.add_argument("--mode", choices=DENSE_MODES, help="dense-feature mode (default: maskclip)")
    ex.add_argument("--templates", choices=TEMPLATE_SETS, help="prompt templates (default: the model's preset's; "
                                                               "its logit scale and short side are recorded too)")
    ex.add_argument("--output", default="outputs/onnx", help="the folder for the three files")
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", formatter_class=_Formatter,
                        help="mIoU of a segmenter on a standard dataset, or AP of a detector on COCO / LVIS JSON")
    ev.add_argument("--dataset", choices=DATASETS, help="segmentation: the dataset")
    ev.add_argument("--root", help="segmentation: dataset folder (see ovdense.data.datasets for layouts)")
    ev.add_argument("--annotations", help="detection: a COCO-format or LVIS v1 instances JSON")
    ev.add_argument("--images", help="detection: the image folder (default: the JSON's folder)")
    ev.add_argument("--grounding", help="grounding: a JSONL of captions with phrase spans and boxes (Recall@1/5/10, "
                                        "Flickr30k Entities' protocol)")
    ev.add_argument("--protocol", choices=DETECTION_PROTOCOLS, help="detection metrics (default: lvis for LVIS, "
                                                                    "ov-coco when the classes have a base/novel split)")
    ev.add_argument("--fixed-ap", action="store_true", help="LVIS: Fixed AP (10,000 per class, no per-image cap)")
    ev.add_argument("--results", help="detection: also write the COCO results JSON here")
    ev.add_argument("--split", default="val", help="the dataset's split (its list file, e.g. val.txt)")
    ev.add_argument("--limit", type=int, help="evaluate only the first N images")
    ev.add_argument("--output", help="write the metrics as JSON to this file")
    _add_model_args(ev, methods=METHODS + DETECTION_METHODS, presets=sorted(PRESETS) + list(DETECTION_PRESETS))
    ev.set_defaults(func=cmd_eval)

    synth = sub.add_parser("synth", formatter_class=_Formatter, help="export the synthetic world in the standard formats")
    synth.add_argument("--output", default="data/synthetic-96", help="folder for the exported dataset (where the "
                                                                      "synthetic recipes export it too)")
    synth.add_argument("--train", type=int, default=1000, help="train scenes")
    synth.add_argument("--val", type=int, default=100, help="val scenes")
    synth.add_argument("--size", type=int, default=96, help="scene size in pixels (at least 32)")
    synth.add_argument("--seed", type=int, default=0, help="the world's seed: same seed, same scenes")
    synth.add_argument("--max-objects", type=int, default=4, help="most things painted in one scene")
    synth.set_defaults(func=cmd_synth)

    train = sub.add_parser("train", formatter_class=_Formatter, help="train a model from a YAML recipe")
    kinds = ["clip", "tcl", "denseclip", "rpn", "regionclip-pretrain", "regionclip", "glip"]
    train.add_argument("what", metavar="{" + ",".join(kinds) + "}", choices=kinds,
                       help="clip: a tiny CLIP from scratch on synthetic captions; tcl: TCL from image-caption pairs; "
                            "denseclip: DenseCLIP (or its baseline) fine-tuned on a segmentation dataset; rpn: a "
                            "class-agnostic RPN on base boxes; regionclip-pretrain: RegionCLIP region-text pretraining; "
                            "regionclip: the RegionCLIP open-vocabulary detector")
    train.add_argument("--config", required=True, help="YAML recipe (see configs/)")
    train.add_argument("--output", help="the run folder: checkpoint (last.pt), metrics.csv and, by default, the "
                                        "exported weights (default: runs/clip, runs/tcl or runs/denseclip)")
    train.add_argument("--export", help="write the final weights to this file (default: the recipe's export, "
                                        "relative to --output, else a file in --output); never inside the "
                                        "installed ovdense package")
    train.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    train.add_argument("--restart", action="store_true",
                       help="start from step 0 instead of resuming; the old last.pt is replaced at the first checkpoint")
    train.add_argument("--max-steps", type=int, help="stop after this many more steps (resume later); a run "
                                                     "stopped before the recipe's steps exports nothing")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="change one recipe value (repeatable), e.g. --set train.seed=1 --set weights=FILE; "
                            "dotted keys reach nested values, list entries by number (data.sources.0.path)")
    train.set_defaults(func=cmd_train)

    conv = sub.add_parser("convert", formatter_class=_Formatter,
                          help="convert the authors' released checkpoints into ovdense files (`ovdense models` lists them)")
    conv.add_argument("method", choices=CONVERTED, help="the official repository the files come from")
    conv.add_argument("files", nargs="+", help="the released file(s), as `ovdense models` lists them (RegionCLIP: the "
                                               "detector, then its offline RPN)")
    conv.add_argument("--output", required=True, help="the .safetensors file to write")
    conv.add_argument("--ema", action="store_true", help="glip: take the EMA weights ('model_ema')")
    conv.add_argument("--text-source", help="glip: a folder with BERT's tokenizer and config (default: "
                                            "bert-base-uncased from the Hugging Face cache)")
    conv.add_argument("--classes", help="regionclip: the test classes in the order of the class embeddings: "
                                        "'a, b', a file with one per line, ov_coco65 or lvis1203 (default: the "
                                        "list of the RPN's protocol)")
    conv.add_argument("--text-weights", help="regionclip: CLIP weights (tag or file) whose text tower embeds names "
                                             "the file has no embedding for, loaded only then (default: openai)")
    conv.add_argument("--model", help="regionclip: the open_clip architecture (default: RN50 or RN50x4, read from "
                                      "the file)")
    conv.add_argument("--preset", choices=DETECTION_PRESETS, help="regionclip, glip: the preset the file records "
                                                                  "(default: ov-coco for a C4 RPN, lvis for FPN; glip, "
                                                                  "glip-lvis for an LVIS file)")
    conv.set_defaults(func=cmd_convert)

    models = sub.add_parser("models", help="list the authors' released models, the shipped ones and open_clip's "
                                           "architectures, tags and dense modes")
    models.set_defaults(func=cmd_models)
    for command in sub.choices.values():  # -q / -v also after the command; SUPPRESS keeps the top level's value
        command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="as before the command")
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="as before the command")
    return parser


def _error(message) -> None:
    """One `error:` line (continuation lines of a long message are indented under it)."""
    lines = str(message).strip().splitlines() or ["unknown error"]
    print("error: " + "\n  ".join(lines), file=sys.stderr)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tqdm and test harnesses replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


@contextmanager
def _logging(verbosity: int):
    """For one command: ovdense's messages at WARNING (-q: ERROR, -v: INFO) as 'LEVEL: message' lines; other
    libraries' logs and warnings only with -vv. The previous logging and warning settings come back after."""
    root, hub = logging.getLogger(), logging.getLogger("huggingface_hub")
    saved = (logger.handlers[:], logger.level, logger.propagate, root.level, hub.level)
    logger.handlers[:] = [_StderrHandler()]
    logger.handlers[0].setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger.setLevel(logging.ERROR if verbosity < 0 else logging.WARNING if verbosity == 0 else logging.INFO)
    logger.propagate = False
    root.setLevel(logging.INFO if verbosity > 1 else logging.CRITICAL)  # open_clip logs to the root logger
    hub.setLevel(logging.INFO if verbosity > 1 else logging.CRITICAL)  # download retries; our error says it all
    with warnings.catch_warnings():
        if verbosity < 2:
            warnings.filterwarnings("ignore", module=r"(open_clip|torch|torchvision|timm|huggingface_hub)(\.|$)")
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            logger.handlers[:], logger.level, logger.propagate = saved[:3]
            root.setLevel(saved[3])
            hub.setLevel(saved[4])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _logging(-1 if args.quiet else args.verbose):
            return args.func(args)
    except UsageError as error:
        _error(error)
        return 2
    except (InputError, ValueError, OSError) as error:  # bad data, files, settings; disk and permission errors
        if args.verbose:
            logger.exception("traceback")
        _error(error)
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as error:  # a bug: one line, the traceback with -v
        if args.verbose:
            logger.exception("traceback")
        _error(f"unexpected {type(error).__name__}: {error} (run with -v for the traceback, and please report it)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
