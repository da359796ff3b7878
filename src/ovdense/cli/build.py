"""The models the options describe: the segmentation predictor (model, weights, method, protocol) and the detection
predictor, with the rule that fills the flags a user left out (MODEL_RULE) and the shipped models' defaults."""
from __future__ import annotations

import argparse

from ..catalog import TRAINED_METHODS
from ..errors import UsageError
from ..shipped import SHIPPED_CLIP, SHIPPED_TAG, ShippedModel, shipped
from .console import logger

REAL_MODEL = "ViT-B-16"  # the architecture real weights named alone (--weights openai) imply
RANDOM_NOTE = ("weights: RANDOM initialisation. No pretrained CLIP weights are available offline, so these masks "
               "show the pipeline working, not CLIP's knowledge. For real results pass --weights openai "
               "(downloaded once, then cached) or --weights /path/to/checkpoint.pt.")


def shipped_clip_note(clip: ShippedModel) -> str:
    """What a user of the shipped tiny CLIP `clip` should know: where it came from and what it knows."""
    return (f"weights: the tiny CLIP {clip.name} that ships with ovdense, trained from scratch on the synthetic "
            f"world's captions ({clip.recipe}); it knows only that world's words. For real images use real CLIP "
            "weights: ovdense demo --model ViT-B-16 --weights openai --preset default.")


def protocol_of(args, preset: str, dataset: str | None):
    """The preset's protocol for `dataset` with the protocol options applied (each checked by Protocol)."""
    from dataclasses import replace

    from ..presets import get_protocol
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


def check_model_options(args, dataset: str | None = None) -> None:
    """The model and protocol options, checked before torch is imported, so that a mistake is reported at once."""
    from ..device import check_device_name
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_device_name(args.device)
    protocol_of(args, args.preset or "default", dataset)


def build_predictor(args, dataset: str | None = None):
    """The predictor the options describe; the preset defaults to the one the weights or checkpoint recommend."""
    from ..device import half_precision, resolve_device
    from ..methods import read_trained, recommended_preset
    from ..predictor import build_predictor as build
    from ..text.cache import disable_disk_cache
    if args.checkpoint and not args.method:  # a trained checkpoint records its method
        args.method = read_trained(args.checkpoint, tensors=False)[0]["method"]
    args.method = args.method or "maskclip"
    complete_model_flags(args)
    if args.method in TRAINED_METHODS and args.mode:
        raise UsageError(f"--mode applies to the training-free method (maskclip); {args.method} has its own dense head")
    model, weights = args.model, args.weights
    recommended = recommended_preset(args.method, model, weights, args.checkpoint)
    args.preset = args.preset or recommended or "default"
    protocol = protocol_of(args, args.preset, dataset)
    device = resolve_device(args.device)
    if args.no_cache:
        disable_disk_cache()
    logger.info("preset %s (%s)", args.preset, "recommended by the weights" if args.preset == recommended else "chosen")
    return build(model, weights, args.method, args.mode, preset=protocol, device=str(device),
                 checkpoint=args.checkpoint, batch_size=args.batch_size,
                 autocast=half_precision(device) if args.half else None)


def complete_model_flags(args) -> None:
    """Fill --model / --weights by MODEL_RULE (a --checkpoint records its own), and give a trained --method on the
    shipped CLIP the checkpoint that ships for it."""
    import open_clip

    from ..backbones.loading import HF_CLIP, is_model_folder, recorded_architecture
    if getattr(args, "checkpoint", None):
        return
    if args.model is None and args.weights is not None:  # what a transformers folder or an ovdense file records
        args.model = HF_CLIP if is_model_folder(args.weights) else recorded_architecture(args.weights)
    if args.model is None:
        args.model = SHIPPED_CLIP if args.weights in (None, SHIPPED_TAG) else REAL_MODEL
    if args.weights is None:
        tags = [SHIPPED_TAG] if shipped("clip", args.model) else open_clip.list_pretrained_tags_by_model(args.model)
        if not tags:
            raise UsageError(f"--model {args.model}: no pretrained weights are known for it; give --weights (an open_clip "
                             "tag, a checkpoint file or 'random'); `ovdense models` lists architectures and their tags")
        args.weights = tags[0]
    if args.method in TRAINED_METHODS and (args.model, args.weights) == (SHIPPED_CLIP, SHIPPED_TAG):
        args.checkpoint = str(shipped("segmenter", args.method).path)


def use_shipped_method(args) -> ShippedModel | None:
    """On the shipped tiny CLIP (default model and weights, no checkpoint), set args to the best method that ships
    for it (or the shipped one `--method` names); returns that model, or None."""
    if args.checkpoint or args.model not in (None, SHIPPED_CLIP) or args.weights not in (None, SHIPPED_TAG):
        return None
    chosen = shipped("segmenter", args.method)
    if chosen:
        args.method, args.checkpoint = chosen.name, chosen.path and str(chosen.path)
    return chosen


def describe(predictor) -> dict:
    """What a segmentation predictor is, for the JSON next to its outputs."""
    from dataclasses import asdict
    backbone = predictor.backbone
    return {"model": backbone.name, "weights": backbone.weights, "method": predictor.method.name,
            "mode": getattr(predictor.method, "mode", None),
            "protocol": {k: v for k, v in asdict(predictor.protocol).items() if k != "dataset_overrides"}}


def build_detection_predictor(args, score_threshold: float | None = None):
    """The detection predictor the options describe; returns (predictor, a dict describing it)."""
    from dataclasses import asdict

    from ..detection.predictor import DetectionPredictor, GroundingPredictor
    from ..device import check_device_name, resolve_device
    from ..methods import DEFAULT_DETECTION_PRESETS, load_detector
    from ..presets import get_detection_protocol
    from ..text.cache import disable_disk_cache
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
    described = {"method": args.method, "model": detector.backbone.name, "weights": detector.backbone.weights,
                 "checkpoint": args.checkpoint, "protocol": asdict(protocol)}
    grounding = args.method == "glip"
    return (GroundingPredictor if grounding else DetectionPredictor)(detector, protocol), described


def detector_args(args, method: str, **changes) -> argparse.Namespace:
    """args with the detector `method` in place of the segmenter: by default the one shipped with ovdense."""
    return argparse.Namespace(**{**vars(args), "method": method, "checkpoint": None, "weights": SHIPPED_TAG,
                                 "preset": None, **changes})
