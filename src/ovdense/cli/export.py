"""`ovdense export`: a training-free segmenter as ONNX (image encoder with dynamic batch, height and width) plus the
vocabulary's text embeddings, for onnxruntime alone (`ovdense.onnx_runtime.OnnxSegmenter`)."""
from __future__ import annotations

from ..catalog import DENSE_MODES, TEMPLATE_SETS
from ..errors import UsageError
from .build import complete_model_flags
from .inputs import vocabulary
from .options import add_output_folder, command_parser


def add_parser(sub):
    parser = command_parser(sub, "export", "export a training-free segmenter for onnxruntime (image encoder + text "
                                           "embeddings)")
    parser.add_argument("--format", default="onnx", help="onnx (the only one)")
    parser.add_argument("--classes", help="the vocabulary whose text embeddings are stored ('sky, grass; lawn')")
    parser.add_argument("--classes-file", help="one class per line")
    parser.add_argument("--model", help="open_clip architecture (default: the shipped ovdense-tiny-vit)")
    parser.add_argument("--weights", help="CLIP weights (default: synthetic)")
    parser.add_argument("--mode", choices=DENSE_MODES, help="dense-feature mode (default: maskclip)")
    parser.add_argument("--templates", choices=TEMPLATE_SETS, help="prompt templates (default: the model's preset's; "
                                                                   "its logit scale and short side are recorded too)")
    add_output_folder(parser, "onnx", "the three files")
    return parser


def run(args) -> int:
    from ..backbones import load_clip
    from ..io import prepare_output_dir
    from ..methods import recommended_preset
    from ..onnx_export import export_onnx
    from ..presets import get_protocol
    from ..text import resolve_templates
    if args.format != "onnx":
        raise UsageError(f"--format {args.format}: only onnx is supported")
    words = vocabulary(args)
    args.method, args.checkpoint = "maskclip", None
    complete_model_flags(args)
    clip = load_clip(args.model, args.weights, device="cpu")
    mode = args.mode or "maskclip"
    if mode not in clip.supported_modes():
        raise UsageError(f"--mode {mode} is not available for {clip.name}; choose one of "
                         f"{', '.join(clip.supported_modes())}")
    protocol = get_protocol(recommended_preset("maskclip", args.model, args.weights) or "default")
    out_dir = prepare_output_dir(args.output)
    paths = export_onnx(clip, mode, words, resolve_templates(args.templates or protocol.templates), out_dir,
                        logit_scale=protocol.logit_scale, short_side=protocol.short_side)
    print(f"wrote {', '.join(str(p) for p in paths.values())}; segment with onnxruntime alone: "
          f"ovdense.onnx_runtime.OnnxSegmenter('{out_dir}')")
    return 0
