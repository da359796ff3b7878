"""kakaobrain/tcl's released checkpoint (tcl.pth) -> an ovdense TCL file (`--method tcl --checkpoint`).

tcl.pth is `{'model': state dict}` as `utils/checkpoint.py` saves it (optimizer and step may sit beside it), reduced
by the authors to the learned parameters: the frozen CLIP is not inside, ovdense loads ViT-B-16 / openai for it.
Its keys (models/tcl/masker.py, decoders.py, modules.py, encoders.py, mi.py; ViT-B/16 shapes):

  masker.image_encoder.backbone.transformer.resblocks.0.*   the trained copy of CLIP's last block -> block.*
  masker.image_encoder.decoder.decoder.net.{i}.conv{,2}.{norm,conv}.*, .gate.gate
                                                            GDecoder's ResConv i, its two gated convs
                                                            -> decoder.blocks.{i}.{0,1}.{norm,conv}.*, .gate
  masker.image_encoder.decoder.image_proj.ln.*, .proj       ln_post and proj copies -> proj_norm.*, proj
  masker.sim2mask.w, masker.sim2mask.b                      -> w, b
  tcli_loss.logit_scale, tclf_loss.logit_scale              InfoNCE temperatures (training only; the official
                                                            loader lets them be absent) -> image_logit_scale,
                                                            feature_logit_scale, else their initial ln(1 / 0.07)
The masker backbone has no ln_post (Identity) and no proj (None), so it has no keys of its own for them.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..backbones import load_clip
from ..backbones.loading import RANDOM_WEIGHTS
from ..errors import CheckpointError, UsageError
from ..methods.tcl import TCL
from .regionclip import read_official

# Official keys that have no place in the converted file, and why.
IGNORED = {
    "clip_image_encoder.": "the frozen CLIP image tower: ovdense loads it from open_clip",
    "clip_text_encoder.": "the frozen CLIP text tower: ovdense loads it from open_clip",
    "pamr.": "PAMR's fixed shift kernels (a buffer the official model adds once it has evaluated)",
}
_NAMES = {  # ovdense TCL name -> official key, besides the block and the decoder
    "proj_norm.weight": "masker.image_encoder.decoder.image_proj.ln.weight",
    "proj_norm.bias": "masker.image_encoder.decoder.image_proj.ln.bias",
    "proj": "masker.image_encoder.decoder.image_proj.proj",
    "w": "masker.sim2mask.w",
    "b": "masker.sim2mask.b",
    "image_logit_scale": "tcli_loss.logit_scale",
    "feature_logit_scale": "tclf_loss.logit_scale",
}
_OPTIONAL = ("tcli_loss.logit_scale", "tclf_loss.logit_scale")  # training only; the official loader allows them absent
_BLOCK = "masker.image_encoder.backbone.transformer.resblocks.0."
# configs/tcl.yml (GDecoder: 2 layers of 3x3 convs; Sim2Mask: w 10, b -2.5, tau 1) and its evaluation (kp_w 0.3;
# tcl.py kp_branch: sigmoid((cos - 0.25) * 10)).
OFFICIAL_CONFIG = {"decoder_layers": 2, "kernel_size": 3, "init_w": 10.0, "init_b": -2.5, "gumbel_tau": 1.0,
                   "kp_weight": 0.3, "kp_offset": 0.25, "kp_scale": 10.0}


def official_key(name: str) -> str:
    """The official key of an ovdense TCL weight (decoder.blocks.{i}.{j}: GDecoder's ResConv i, its conv (j = 0) or
    conv2 (j = 1), whose gate is a Gate module)."""
    if name in _NAMES:
        return _NAMES[name]
    if name.startswith("block."):
        return _BLOCK + name[len("block."):]
    match = re.fullmatch(r"decoder\.blocks\.(\d+)\.([01])\.(norm\.weight|norm\.bias|conv\.weight|conv\.bias|gate)",
                         name)
    if match:
        conv = "conv" if match[2] == "0" else "conv2"
        return f"masker.image_encoder.decoder.decoder.net.{match[1]}.{conv}.{match[3].replace('gate', 'gate.gate')}"
    raise KeyError(f"no official TCL key is known for {name}")


def official_model(state: dict[str, torch.Tensor], model: str = "ViT-B-16", weights: str = "openai",
                   source: str = "checkpoint") -> TCL:
    """The TCL grounder holding an official state dict, on `model` with random weights: the file records `weights`
    as the CLIP to run on (the frozen CLIP is not in tcl.pth). Every official key must find its place or be one of
    IGNORED, and every learned weight of TCL must come from the state dict with its shape (errors name the official
    keys)."""
    backbone = load_clip(model, RANDOM_WEIGHTS)  # only its shapes matter here
    backbone.weights = weights  # the CLIP that the converted file names
    tcl = TCL(backbone, **OFFICIAL_CONFIG)
    wanted = {official_key(k): (k, v) for k, v in tcl.state_dict().items() if not k.startswith("backbone.")}
    unknown = [key for key in state if key not in wanted and not key.startswith(tuple(IGNORED))]
    missing = [key for key in wanted if key not in state and key not in _OPTIONAL]
    shapes = [f"{key} {tuple(state[key].shape)} (expected {tuple(value.shape)})"
              for key, (_, value) in wanted.items() if key in state and state[key].shape != value.shape]
    if unknown or missing or shapes:
        raise CheckpointError(f"{source} does not fit TCL on {model}: unknown keys {unknown[:5]}, missing "
                              f"{missing[:5]}, wrong shapes {shapes[:3]}; kakaobrain/tcl's tcl.pth (ViT-B/16, "
                              "ie_freeze 11: one copied block, GDecoder of 2 double gated convs) is expected")
    tcl.load_state_dict({name: state[key].float() for key, (name, _) in wanted.items() if key in state}, strict=False)
    return tcl.eval()


def convert(paths: list[str | Path], output: str | Path, model: str = "ViT-B-16", weights: str = "openai") -> Path:
    """Convert the released tcl.pth into an ovdense TCL file recording `model` / `weights` (the frozen CLIP it runs
    on) and the preset of the paper's test protocol ('tcl'). Only tensors are unpickled."""
    if len(paths) != 1:
        raise UsageError(f"TCL's release is one file (tcl.pth); got {len(paths)}: {', '.join(map(str, paths))}")
    path = Path(paths[0])
    return official_model(read_official(path), model, weights, str(path)).save(output, preset="tcl")
