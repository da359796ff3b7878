"""microsoft/GLIP checkpoints (maskrcnn-benchmark .pth: {'model': state dict, 'model_ema'?}, keys prefixed 'module.')
-> an ovdense GLIP file (safetensors) for `--method glip --checkpoint`. GLIP-L is GLIP-T's layout with Swin-L
(window 12) and 8 layers.

GLIP-T (glip_tiny_model_o365_goldg.pth): Swin-T `backbone.body.*`, FPN `backbone.fpn.*`, BERT
`language_backbone.body.model.*`, and the head `rpn.head.*`, whose `dyhead_tower` holds, for each of its 6 layers i,
VLFuse at 3i, a BERT layer at 3i + 1 and DyConv at 3i + 2 (GLIP-T(A), without fusion: DyConv at i). Ignored: the
unused `cls_logits`, the anchor generator's cell anchors and Swin's relative-position index (both recomputed).
GLIP reads BGR in 0-255; the patch embedding's input channels are reversed so the converted model reads RGB
normalised with ImageNet's mean / std, which is the same input.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..errors import CheckpointError
from .regionclip import read_official

_IGNORED = ("rpn.head.cls_logits.", "rpn.anchor_generator.", "language_backbone.body.model.embeddings.position_ids")
_TEXT_LAYER = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
               "attention.output.dense": "attention_out", "attention.output.LayerNorm": "attention_norm",
               "intermediate.dense": "intermediate", "output.dense": "output", "output.LayerNorm": "output_norm"}
_FUSION = {"b_attn.gamma_v": "gamma_v", "b_attn.gamma_l": "gamma_l", "b_attn.layer_norm_v": "norm_v",
           "b_attn.layer_norm_l": "norm_l", "b_attn.attn": "attn"}
_HEAD = {"bbox_pred": "bbox_pred", "centerness": "centerness", "log_scale": "log_scale", "bias_lang": "bias_lang",
         "bias0": "bias0", "dot_product_projection_text": "text_projection"}


def _tower(index: int, rest: str, fusion: bool) -> str:
    """A `rpn.head.dyhead_tower.{index}.{rest}` key -> its ovdense name."""
    layer, part = divmod(index, 3) if fusion else (index, 2)
    if part == 0:
        for old, new in _FUSION.items():
            if rest == old or rest.startswith(old + "."):
                return f"fusion_layers.{layer}.{new}{rest[len(old):]}"
    elif part == 1:
        for old, new in _TEXT_LAYER.items():
            if rest.startswith(old + "."):
                return f"text_layers.{layer}.{new}{rest[len(old):]}"
    else:
        match = re.fullmatch(r"DyConv\.(\d)\.(conv|bn)\.(weight|bias)", rest)
        if match:
            kind = "" if match[2] == "conv" else "norm."
            return f"conv_layers.{layer}.convs.{match[1]}.{kind}{match[3]}"
        for old, new in (("AttnConv.1.", "scale_attention."), ("relu.fc.", "relu.fc."), ("offset.", "offset.")):
            if rest.startswith(old):
                return f"conv_layers.{layer}.{new}{rest[len(old):]}"
    raise KeyError(rest)


def official_name(key: str, fusion: bool) -> str | None:
    """The ovdense name of an official GLIP key ('module.' removed), None for what is ignored; KeyError if unknown."""
    if key.startswith(_IGNORED) or key.endswith("relative_position_index"):
        return None
    if key.startswith("backbone.body."):
        rest = key[len("backbone.body."):]
        match = re.fullmatch(r"layers\.(\d)\.downsample\.(.*)", rest)
        if match:  # Swin's patch merging ends stage i officially, starts stage i + 1 in timm
            return f"image.swin.layers_{int(match[1]) + 1}.downsample.{match[2]}"
        match = re.fullmatch(r"layers\.(\d)\.(blocks\..*)", rest)
        if match:
            return f"image.swin.layers_{match[1]}.{match[2]}"
        match = re.fullmatch(r"norm([123])\.(weight|bias)", rest)
        if match:
            return f"image.norms.{int(match[1]) - 1}.{match[2]}"
        if rest.startswith("patch_embed."):
            return f"image.swin.{rest}"
    elif key.startswith("backbone.fpn."):
        rest = key[len("backbone.fpn."):]
        match = re.fullmatch(r"fpn_(inner|layer)([234])\.(weight|bias)", rest)
        if match:
            kind = "inner_blocks" if match[1] == "inner" else "layer_blocks"
            return f"fpn.{kind}.{int(match[2]) - 2}.0.{match[3]}"
        match = re.fullmatch(r"top_blocks\.(p6|p7)\.(weight|bias)", rest)
        if match:
            return f"fpn.extra_blocks.{match[1]}.{match[2]}"
    elif key.startswith("language_backbone.body.model."):
        return "text.model." + key[len("language_backbone.body.model."):]
    elif key.startswith("rpn.head.dyhead_tower."):
        index, rest = key[len("rpn.head.dyhead_tower."):].split(".", 1)
        return _tower(int(index), rest, fusion)
    elif key.startswith("rpn.head.scales."):
        return "scales." + key[len("rpn.head.scales."):]
    elif key.startswith("rpn.head."):
        name, _, rest = key[len("rpn.head."):].partition(".")
        if name in _HEAD:
            return _HEAD[name] + ("." + rest if rest else "")
    elif key == "rpn.tunable_linear.weight":
        return "prompt_table"
    raise KeyError(key)


def official_state(state: dict[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict, dict]:
    """An official GLIP state dict -> (ovdense state dict, the GLIPDetector settings it implies: the Swin (T or L, by
    its patch embedding's width), layers, fusion and its width, prompt_tuning)."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    fusion = any(".b_attn." in k for k in state)
    towers = {int(k.split(".")[3]) for k in state if k.startswith("rpn.head.dyhead_tower.")}
    if not towers:
        raise CheckpointError(f"{source} has no rpn.head.dyhead_tower: is it a GLIP checkpoint?")
    layers = (max(towers) + 1) // 3 if fusion else max(towers) + 1
    out, unknown = {}, []
    for key, value in state.items():
        try:
            name = official_name(key, fusion)
        except KeyError:
            unknown.append(key)
            continue
        if name is not None:
            out[name] = value
    if unknown:
        raise CheckpointError(f"{source}: keys GLIP does not have: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if "image.swin.patch_embed.proj.weight" in out:  # BGR 0-255 input -> RGB with ImageNet normalisation
        out["image.swin.patch_embed.proj.weight"] = out["image.swin.patch_embed.proj.weight"].flip(1)
    patch = out.get("image.swin.patch_embed.proj.weight")
    settings = {"image": "swin-l" if patch is not None and patch.shape[0] == 192 else "swin-t", "layers": layers,
                "fusion": fusion, "prompt_tuning": "prompt_table" in out}
    if fusion:
        settings["fusion_dim"] = out["fusion_layers.0.attn.v_proj.weight"].shape[0]
    return out, settings


def check_fits(mapped: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source: str) -> None:
    """Every weight of `reference` (a model's state dict) is in `mapped` with its shape, and nothing else is; the
    buffers a model recomputes (Swin's relative-position index and masks, BERT's position ids) are not needed."""
    expected = {k: v for k, v in reference.items()
                if not k.endswith(("relative_position_index", "attn_mask", "position_ids", "token_type_ids"))}
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(reference))
    shapes = [f"{k} {tuple(mapped[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in mapped and mapped[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source} does not fit GLIP: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                              f"shapes {shapes[:3]}")


def official_model(state: dict[str, torch.Tensor], text_source: str = "bert-base-uncased", source: str = "checkpoint"):
    """An official GLIP-T / GLIP-L state dict -> the GLIPDetector holding it; every key must find its place and every
    weight of the model must come from the state dict."""
    from ..methods.glip import GLIPDetector
    mapped, settings = official_state(state, source)
    model = GLIPDetector(None, text="bert", text_source=text_source, pretrained_text=False, **settings)
    check_fits(mapped, model.state_dict(), source)
    model.load_state_dict(mapped, strict=False)
    return model.eval()


def convert_official(path: str | Path, out: str | Path, text_source: str = "bert-base-uncased", ema: bool = False
                     ) -> Path:
    """Convert a released GLIP-T or GLIP-L checkpoint into an ovdense GLIP file (preset 'glip'). text_source: where BERT's
    tokenizer and config come from (its weights come from the checkpoint). ema: use 'model_ema' instead of 'model'."""
    state = read_official(path, "model_ema" if ema else "model")
    return official_model(state, text_source, str(path)).save(out, preset="glip")
