"""The option groups the commands share, defined once: model and protocol (segmenters), detector and its protocol,
image inputs with their vocabulary, and the output folder."""
from __future__ import annotations

import argparse

from ..catalog import DENSE_MODES, DETECTION_METHODS, DETECTION_PRESETS, METHODS, NMS_KINDS, TEMPLATE_SETS, TRAINED_METHODS
from ..presets import PRESETS
from ..shipped import SHIPPED_CLIP


class Parser(argparse.ArgumentParser):
    """argparse's usage errors as one `error:` line (exit code 2), pointing at --help."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in --help (where it has one)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def command_parser(sub, name: str, help: str, formatter: bool = True) -> argparse.ArgumentParser:
    """One command's sub-parser, its options' defaults shown in --help."""
    return sub.add_parser(name, help=help, **({"formatter_class": Formatter} if formatter else {}))


MODEL_RULE = (f"Without --model and --weights every command runs the CLIP that ships with ovdense ({SHIPPED_CLIP}, "
              "weights 'synthetic': offline, but it knows only the synthetic world's words). For real images name "
              "real weights, e.g. --model ViT-B-16 --weights openai (one flag implies the other: --model alone takes "
              "its first open_clip tag, --weights alone takes ViT-B-16, the architecture a weights file records (as "
              "those of `ovdense train clip` do), or the tiny CLIP for 'synthetic').")


def add_model_options(parser: argparse.ArgumentParser, methods=METHODS, presets=None) -> None:
    """--model, --weights, --method, --checkpoint, --mode and how they run; then the protocol group."""
    group = parser.add_argument_group("model", MODEL_RULE)
    group.add_argument("--model", help="open_clip architecture (see `ovdense models`; default: the one --weights or a "
                                       f"--checkpoint implies, else {SHIPPED_CLIP})")
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
    _add_protocol_options(parser, presets)


def _add_protocol_options(parser: argparse.ArgumentParser, presets=None) -> None:
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


def add_detector_options(parser: argparse.ArgumentParser, methods=DETECTION_METHODS) -> None:
    """--method, --checkpoint, --weights of a detector, and the detection protocol group."""
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


def add_images(parser: argparse.ArgumentParser, glob_example: str = " ('photos/**/*.jpg')") -> None:
    parser.add_argument("images", nargs="+", help=f"image files, folders (their images) or globs{glob_example}")


def add_classes(parser: argparse.ArgumentParser, example: str) -> None:
    """--classes / --classes-file: the vocabulary (exactly one of them; see inputs.vocabulary)."""
    parser.add_argument("--classes", help=f"'{example}': ',' separates classes, ';' synonyms")
    parser.add_argument("--classes-file", help="one class per line, synonyms separated by ';'")


def add_output_folder(parser: argparse.ArgumentParser, command: str, contents: str) -> None:
    """--output: the folder a command writes into (default outputs/COMMAND), never one of its inputs."""
    parser.add_argument("--output", default=f"outputs/{command}", help=f"folder for {contents}")
