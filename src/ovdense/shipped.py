"""The models that ship inside ovdense (offline, no download), in one registry: what torchvision's weight enums say
of a model (its file, the recipe and command that made it, the inference preset it wants, the figures measured
with it and the command that measured them). `load_clip`, `load_method`, `load_detector`, the demo, the service,
`ovdense models` and the error messages all read it. Importable without torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
KINDS = ("clip", "segmenter", "detector")
SHIPPED_CLIP = "ovdense-tiny-vit"  # the CLIP the shipped segmenters run on, and every command's default
SHIPPED_TAG = "synthetic"  # the --weights value that selects a shipped model

SEGMENTATION_BENCHMARK = ("python benchmarks/bench_synthetic_methods.py --scenes 200 "
                          "--tcl src/ovdense/weights/tcl-tiny-vit-synthetic.safetensors "
                          "--denseclip src/ovdense/weights/denseclip-tiny-vit-synthetic.safetensors")
CROPS_MEASURE = ("zero-shot shape accuracy (%) on the object crops of 200 val scenes, from the training run's "
                 "metrics.csv (`ovdense train clip` prints it at the end)")


@dataclass(frozen=True)
class ShippedModel:
    """One model in the package.

    name: the open_clip architecture (kind 'clip') or the method. file: its file in ovdense/weights/ (None: a
    training-free method, which runs on SHIPPED_CLIP). recipe: the configs/ YAML that trained it. preset: the
    inference protocol it wants. metrics: figures (%) on the synthetic world's val split, measured by `measured_by`.
    """

    name: str
    kind: str
    file: str | None
    recipe: str | None
    preset: str | None
    description: str
    metrics: dict[str, float] = field(compare=False)
    measured_by: str

    @property
    def path(self) -> Path | None:
        return WEIGHTS_DIR / self.file if self.file else None

    @property
    def command(self) -> str:
        """How it was made (a training command), or 'training-free'."""
        if self.recipe is None:
            return "training-free"
        return f"ovdense train {'clip' if self.kind == 'clip' else self.name} --config {self.recipe}"

    @property
    def title(self) -> str:
        return f"{self.name} ({'shipped checkpoint' if self.file else 'training-free'})"

    def scores(self) -> str:
        """Its figures in one phrase: 'mIoU 54.2, base things 32.6, ...'."""
        return ", ".join(f"{name} {value:.1f}" for name, value in self.metrics.items())


SHIPPED = (
    ShippedModel(
        "ovdense-tiny-vit", "clip", "ovdense-tiny-vit-synthetic.safetensors", "configs/tiny_clip_vit_synthetic.yaml",
        "synthetic", "a 4-layer ViT CLIP trained from scratch on the synthetic world's captions; offline, knows only "
        "that world's words", {"crops base": 50.6, "crops novel": 55.3}, CROPS_MEASURE),
    ShippedModel(
        "ovdense-tiny-rn", "clip", "ovdense-tiny-rn-synthetic.safetensors", "configs/tiny_clip_rn_synthetic.yaml",
        "synthetic", "a 4-stage ResNet CLIP (attention pool) trained from scratch on the synthetic world's captions; "
        "offline, the trunk of the synthetic RegionCLIP detector", {"crops base": 68.9, "crops novel": 78.0},
        CROPS_MEASURE),
    # segmenters, best first by mIoU (the demo runs the first)
    ShippedModel(
        "denseclip", "segmenter", "denseclip-tiny-vit-synthetic.safetensors", "configs/denseclip_tiny_synthetic.yaml",
        "synthetic", "DenseCLIP (post-model prompting, FPN head) fine-tuned on the synthetic world's base masks",
        {"mIoU": 54.2, "base things": 32.6, "novel things": 0.0}, SEGMENTATION_BENCHMARK),
    ShippedModel(
        "tcl", "segmenter", "tcl-tiny-vit-synthetic.safetensors", "configs/tcl_tiny_synthetic.yaml", "synthetic",
        "TCL's grounder learnt from the synthetic world's image-caption pairs alone",
        {"mIoU": 29.6, "base things": 1.2, "novel things": 0.8}, SEGMENTATION_BENCHMARK),
    ShippedModel(
        "maskclip", "segmenter", None, None, "synthetic", "MaskCLIP's training-free dense labels from the tiny CLIP",
        {"mIoU": 11.5, "base things": 3.9, "novel things": 1.5}, SEGMENTATION_BENCHMARK),
    ShippedModel(
        "regionclip", "detector", "regionclip-tiny-rn-synthetic.safetensors", "configs/regionclip_tiny_synthetic.yaml",
        "synthetic-detection", "a RegionCLIP detector (tiny ResNet CLIP after region-text pretraining, trained on the "
        "base things' boxes)", {"AP50 base": 22.1, "AP50 novel": 5.1},
        "python benchmarks/bench_regionclip_synthetic.py --detector regionclip=src/ovdense/weights/"
        "regionclip-tiny-rn-synthetic.safetensors"),
    ShippedModel(
        "glip", "detector", "glip-tiny-rn-synthetic.safetensors", "configs/glip_a_tiny_synthetic.yaml",
        "glip-synthetic", "GLIP-T(A), without deep fusion, on the tiny ResNet CLIP's towers (the better grounder of "
        "the two)", {"AP50 base": 44.7, "AP50 novel": 11.6, "R@1 base": 86.1, "R@1 novel": 72.9},
        "ovdense eval --annotations data/synthetic-96/instances_val.json --method glip --weights synthetic; "
        "ovdense eval --grounding data/synthetic-96/grounding_val.jsonl --method glip --weights synthetic"),
)


def shipped(kind: str, name: str | None = None, tag: str | None = SHIPPED_TAG) -> ShippedModel | None:
    """The shipped model of `kind` named `name` (None: the first, for segmenters the best) that --weights `tag`
    selects; None if none ships."""
    if tag != SHIPPED_TAG:
        return None
    return next((m for m in SHIPPED if m.kind == kind and name in (None, m.name)), None)


def of_kind(kind: str) -> tuple[ShippedModel, ...]:
    """The shipped models of `kind` ('clip', 'segmenter' or 'detector'), in the registry's order."""
    return tuple(m for m in SHIPPED if m.kind == kind)
