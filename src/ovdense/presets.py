"""Named inference protocols: the published evaluation settings, one flag each.

A `Protocol` fixes everything between an image and a label map that is not the network: resizing,
sliding window, prompt templates, logit scale, refinement and background rules. Presets carry
per-dataset overrides exactly where the public code of the paper has them.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field, replace

from .catalog import NMS_KINDS
from .errors import UsageError


@dataclass(frozen=True)
class Protocol:
    """Inference settings.

    short_side: resize so the image's short side has this many pixels (long side capped at 2048, sizes rounded
        as mmcv's `int(x + 0.5)`); None keeps the size.
    antialias: antialias when downscaling (better for large photos); the papers' mmseg pipelines resize with
        cv2 bilinear, without.
    normalize: 'model' (the CLIP's own mean / std) or 'imagenet' (TCL's and MaskCLIP's configs).
    crop, stride: sliding-window size and step in pixels; crop=None is whole-image inference.
    pad: 'centre' zero-pads each crop to a multiple of the patch size and crops the logits back (ClearCLIP,
        TCL); None lets the patch embedding drop the remainder and stretches the grid over the crop (SCLIP,
        NACLIP). Crops smaller than one patch are always padded.
    templates: a template-set name of `ovdense.text.TEMPLATE_SETS` ('imagenet80', 'single').
    logit_scale: multiplies cosine similarities before the softmax over classes.
    pamr_iterations, pamr_dilations: PAMR refinement of the logits (0 iterations: off).
    pamr_at: where PAMR runs: 'original' (the logits resized to the image's own size, at most 2048 on the long
        side; SCLIP, NACLIP), 'mask' (each crop's masks at the method's mask resolution, before anything else
        the method mixes in; TCL; other methods run it at the working size) or 'working' (the resized image;
        cheapest).
    background_threshold: pixels whose best class probability is below it become background.
    virtual_background: the background class gets no text query, only the threshold (TCL's constant background
        channel), even where the dataset's class list names it or gives it synonyms.
    area_threshold: non-background classes covering at most this fraction of the predicted
        foreground are dropped (SCLIP's VOC rule).
    prompt_denoising: MaskCLIP's: classes whose best confidence (softmax of 100 x cosine) anywhere in a crop is
        below it are dropped (0: off).
    key_smoothing: MaskCLIP's: positions whose confidence is below it take the key-affinity average of the
        confidences (0: off).
    mode: the dense-feature mode the paper uses (None: leave the method's choice).
    """

    name: str
    short_side: int | None = 448
    antialias: bool = False
    normalize: str = "model"
    crop: int | None = 224
    stride: int | None = 112
    pad: str | None = None
    templates: str = "imagenet80"
    logit_scale: float = 40.0
    pamr_iterations: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    pamr_at: str = "original"
    background_threshold: float | None = None
    virtual_background: bool = False
    area_threshold: float | None = None
    prompt_denoising: float = 0.0
    key_smoothing: float = 0.0
    mode: str | None = None
    dataset_overrides: dict[str, dict] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        positive = {"short_side": self.short_side, "crop": self.crop, "stride": self.stride}
        for key, value in positive.items():
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise UsageError(f"{key} (--{key.replace('_', '-')}) must be a positive number of pixels, got {value!r}")
        if self.crop is not None and self.stride is not None and self.stride > self.crop:
            raise UsageError(f"stride (--stride) {self.stride} is larger than the crop (--crop) {self.crop}: the "
                             "windows would leave parts of the image out")
        checks = {
            "logit_scale": math.isfinite(self.logit_scale) and self.logit_scale > 0,
            "pamr_iterations": isinstance(self.pamr_iterations, int) and self.pamr_iterations >= 0,
            "pamr_dilations": len(self.pamr_dilations) > 0 and all(int(d) > 0 for d in self.pamr_dilations),
            "pamr_at": self.pamr_at in ("original", "mask", "working"),
            "pad": self.pad in (None, "centre"),
            "normalize": self.normalize in ("model", "imagenet"),
            "background_threshold": self.background_threshold is None or 0 <= self.background_threshold <= 1,
            "area_threshold": self.area_threshold is None or 0 <= self.area_threshold <= 1,
            "prompt_denoising": 0 <= self.prompt_denoising <= 1,
            "key_smoothing": 0 <= self.key_smoothing <= 1,
        }
        for key, ok in checks.items():
            if not ok:
                flag = {"pamr_iterations": "--pamr"}.get(key, f"--{key.replace('_', '-')}")
                raise UsageError(f"{key} ({flag}) has an invalid value {getattr(self, key)!r}")

    def for_dataset(self, dataset: str | None) -> "Protocol":
        """This protocol with the paper's settings for `dataset` applied (unchanged for other names)."""
        return replace(self, **self.dataset_overrides.get(dataset or "", {}))

    def updated(self, **changes) -> "Protocol":
        """A copy with the given fields changed; None values are ignored."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_CITYSCAPES = {"short_side": 560}
PRESETS: dict[str, Protocol] = {
    # A general-purpose default for users' own images.
    "default": Protocol("default", short_side=448, antialias=True, crop=224, stride=112, pamr_at="working"),
    # The synthetic world with the shipped tiny CLIP, at the 96 px scale every synthetic model is trained at:
    # one whole-image window, bare class names (its captions never say "a photo of a grass").
    "synthetic": Protocol("synthetic", short_side=96, antialias=True, crop=96, stride=64, templates="none",
                          pamr_iterations=10, pamr_dilations=(1, 2, 4, 8), pamr_at="working", mode="maskclip"),
    # SCLIP (wangf3014/SCLIP configs): 336 short side, 224/112 windows, 80 templates, scale 40; PAMR off (when
    # turned on, at the original size).
    "sclip": Protocol(
        "sclip", short_side=336, crop=224, stride=112, logit_scale=40.0, mode="sclip",
        dataset_overrides={
            "cityscapes": _CITYSCAPES,
            "coco_stuff171": {"short_side": 448},
            "voc21": {"logit_scale": 65.0, "background_threshold": 0.1, "area_threshold": 0.1},
            "context60": {"logit_scale": 50.0, "background_threshold": 0.1},
            "coco_object": {"logit_scale": 50.0, "background_threshold": 0.1},
        }),
    # NACLIP (sinahmr/NACLIP configs): as SCLIP, plus PAMR (10 steps, dilations 8 and 16) at the original size.
    "naclip": Protocol(
        "naclip", short_side=336, crop=224, stride=112, logit_scale=40.0, mode="naclip",
        pamr_iterations=10, pamr_dilations=(8, 16),
        dataset_overrides={
            "cityscapes": _CITYSCAPES,
            "voc21": {"background_threshold": 0.1, "crop": None},
            "voc20": {"crop": None},
            "context60": {"background_threshold": 0.1},
            "coco_object": {"background_threshold": 0.1},
        }),
    # TCL (kakaobrain/tcl): 448 short side, ImageNet mean / std, 448/224 windows padded to the patch size, its
    # 'custom' templates, PAMR on each crop's masks at mask resolution, a background of threshold 0.4 only.
    "tcl": Protocol(
        "tcl", short_side=448, normalize="imagenet", crop=448, stride=224, pad="centre", templates="tcl",
        pamr_iterations=10, pamr_dilations=(1, 2, 4, 8, 12, 24), pamr_at="mask", virtual_background=True,
        dataset_overrides={name: {"background_threshold": 0.4} for name in ("voc21", "context60", "coco_object")}),
    # ClearCLIP (mc-lan/ClearCLIP configs): 448 short side, 448/224 windows padded to the patch size, scale 50.
    "clearclip": Protocol(
        "clearclip", short_side=448, crop=448, stride=224, pad="centre", logit_scale=50.0, mode="clearclip",
        dataset_overrides={"cityscapes": {"crop": 224, "stride": 224},
                           "voc21": {"background_threshold": 0.5},
                           "context60": {"background_threshold": 0.15},
                           "coco_object": {"background_threshold": 0.4}}),
    # DenseCLIP on ADE20K (raoyongming/DenseCLIP configs, single scale): short side 512 (long side at most 2048), cv2
    # bilinear, windows 512 / 341 whose head logits are averaged; CLIP's mean / std. The ViT-B/16 model: 640 / 426.
    "denseclip-ade-512": Protocol("denseclip-ade-512", short_side=512, crop=512, stride=341, templates="none"),
    "denseclip-ade-640": Protocol("denseclip-ade-640", short_side=640, crop=640, stride=426, templates="none"),
}


def get_protocol(protocol: "Protocol | str") -> Protocol:
    """A Protocol, or the preset of that name."""
    if isinstance(protocol, Protocol):
        return protocol
    if protocol not in PRESETS:
        raise UsageError(f"unknown preset {protocol!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[protocol]


@dataclass(frozen=True)
class DetectionProtocol:
    """Detection inference settings (detectron2's INPUT and ROI_HEADS test keys, as RegionCLIP's test scripts set them).

    short, max_size: ResizeShortestEdge (MIN_SIZE_TEST, MAX_SIZE_TEST).
    score_threshold: (box, class) pairs scoring at most this are dropped before NMS (SCORE_THRESH_TEST).
    nms: 'class' (class-wise NMS), 'soft' (class-wise Gaussian soft-NMS, sigma `soft_nms_sigma`, pruned at 0.001)
        or 'none'; iou_threshold: NMS_THRESH_TEST. max_detections: DETECTIONS_PER_IMAGE.
    multiply_objectness: class probability -> sqrt(p x the RPN's objectness) (RegionCLIP's LVIS MULTIPLY_RPN_SCORE,
        which multiplies the raw logits of its offline RPN; see RegionCLIPDetector.class_scores).
    chunk_size: classes per prompt for grounding detectors (GLIP's CHUNKED_EVALUATION: 40 on LVIS); a prompt
        also ends where the text encoder's token limit would be passed.
    per_prompt: max_detections holds for each prompt of a chunked vocabulary (GLIP's LVIS evaluation, scored with
        Fixed AP) instead of for the image.
    """

    name: str
    short: int = 800
    max_size: int = 1333
    score_threshold: float = 0.001
    nms: str = "soft"
    iou_threshold: float = 0.5
    soft_nms_sigma: float = 0.5
    max_detections: int = 100
    multiply_objectness: bool = False
    chunk_size: int = 40
    per_prompt: bool = False

    def __post_init__(self):
        checks = {"short": isinstance(self.short, int) and self.short > 0,
                  "max_size": isinstance(self.max_size, int) and self.max_size >= self.short,
                  "score_threshold": 0 <= self.score_threshold < 1, "nms": self.nms in NMS_KINDS,
                  "iou_threshold": 0 < self.iou_threshold <= 1, "soft_nms_sigma": self.soft_nms_sigma > 0,
                  "max_detections": isinstance(self.max_detections, int) and self.max_detections > 0,
                  "chunk_size": isinstance(self.chunk_size, int) and self.chunk_size > 0}
        for key, ok in checks.items():
            if not ok:
                raise UsageError(f"{key} (--{key.replace('_', '-')}) has an invalid value {getattr(self, key)!r}")

    def updated(self, **changes) -> "DetectionProtocol":
        """A copy with the given fields changed; None values are ignored."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


DETECTION_PRESETS: dict[str, DetectionProtocol] = {
    # RegionCLIP on OV-COCO (test_transfer_learning.sh): 800 / 1333, score 0.001, soft-NMS 0.5, 100 per image.
    "ov-coco": DetectionProtocol("ov-coco"),
    # RegionCLIP on LVIS (CLIP_fast_rcnn_R_50_C4.yaml + test_transfer_learning.sh): score 0.02, soft-NMS 0.5, 300 per
    # image, MULTIPLY_RPN_SCORE (sqrt of the class probability times the RPN's raw objectness logit, as its code does).
    "lvis": DetectionProtocol("lvis", score_threshold=0.02, max_detections=300, multiply_objectness=True),
    # The synthetic world at twice its 96 px scale (the tiny ResNet's res4 map is then 12x12), otherwise as OV-COCO.
    "synthetic-detection": DetectionProtocol("synthetic-detection", short=192, max_size=192),
    # GLIP (ATSSPostProcessor): a phrase's mean token probability above 0.05, class-wise NMS 0.6, 100 per image;
    # COCO's 80 names in one prompt.
    "glip": DetectionProtocol("glip", score_threshold=0.05, nms="class", iou_threshold=0.6, chunk_size=80),
    # GLIP on LVIS minival: 40 names per prompt, 300 detections per prompt.
    "glip-lvis": DetectionProtocol("glip-lvis", score_threshold=0.05, nms="class", iou_threshold=0.6,
                                   max_detections=300, chunk_size=40, per_prompt=True),
    # GLIP on the synthetic world at 192 px.
    "glip-synthetic": DetectionProtocol("glip-synthetic", short=192, max_size=192, score_threshold=0.05,
                                        nms="class", iou_threshold=0.6),
}


def get_detection_protocol(protocol: "DetectionProtocol | str") -> DetectionProtocol:
    """A DetectionProtocol, or the detection preset of that name."""
    if isinstance(protocol, DetectionProtocol):
        return protocol
    if protocol not in DETECTION_PRESETS:
        raise UsageError(f"unknown detection preset {protocol!r}; choose one of {', '.join(DETECTION_PRESETS)}")
    return DETECTION_PRESETS[protocol]
