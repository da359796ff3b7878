"""microsoft/GLIP checkpoints (maskrcnn-benchmark .pth: {'model': state dict, 'model_ema'?}, keys prefixed 'module.')
-> an ovdense GLIP file (safetensors) for `--method glip --checkpoint`; `convert` is the entry point.

The released models (https://github.com/microsoft/GLIP#model-zoo, weights on huggingface.co/GLIPModel/GLIP):
GLIP-T(A) `glip_a_tiny_o365.pth` (no deep fusion), GLIP-T(B) `glip_tiny_model_o365.pth`, GLIP-T(C)
`glip_tiny_model_o365_goldg.pth`, GLIP-T `glip_tiny_model_o365_goldg_cc_sbu.pth` and GLIP-L `glip_large_model.pth`,
plus the '*_lvisbest.pth' checkpoints picked on LVIS (preset 'glip-lvis').
Layout: Swin `backbone.body.*`, FPN `backbone.fpn.*`, BERT `language_backbone.body.model.*`, and the head
`rpn.head.*`, whose `dyhead_tower` holds, for each of its layers i (6 in GLIP-T, 8 in GLIP-L), VLFuse at 3i, a BERT
layer at 3i + 1 and DyConv at 3i + 2 (GLIP-T(A), without fusion: DyConv at i). GLIP-L is GLIP-T's layout with Swin-L
(embed 192, depths 2-2-18-2, window 12). The architecture is read from the weights' shapes. Ignored: the unused
`cls_logits`, and what ovdense recomputes: the anchor generator's cell anchors, Swin's relative-position index and
BERT's position ids.
GLIP reads BGR in 0-255; the patch embedding's input channels are reversed so the converted model reads RGB
normalised with ImageNet's mean / std, which is the same input.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, UsageError
from .regionclip import read_official

PRESETS = ("glip", "glip-lvis")  # COCO and the others; the '*_lvisbest' checkpoints

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


def _swin_arch(state: dict[str, torch.Tensor], source: str) -> dict:
    """The Swin's embed_dim, depths, heads per stage and window, from its (ovdense-named) weights' shapes."""
    patch = state.get("image.swin.patch_embed.proj.weight")
    if patch is None:
        return {}
    depths, heads = [], []
    for i in range(4):
        blocks = {int(k.split(".")[4]) for k in state if k.startswith(f"image.swin.layers_{i}.blocks.")}
        table = state.get(f"image.swin.layers_{i}.blocks.0.attn.relative_position_bias_table")
        if table is None:
            raise CheckpointError(f"{source} lacks backbone.body.layers.{i}.blocks.0.attn.relative_position_bias_table")
        depths.append(max(blocks) + 1)
        heads.append(table.shape[1])
    window = (math.isqrt(state["image.swin.layers_0.blocks.0.attn.relative_position_bias_table"].shape[0]) + 1) // 2
    return {"embed_dim": patch.shape[0], "depths": depths, "heads": heads, "window": window}


def official_state(state: dict[str, torch.Tensor], source: str = "checkpoint") -> tuple[dict, dict]:
    """An official GLIP state dict -> (ovdense state dict, the GLIPDetector settings it implies: the Swin (T or L,
    by its embedding width, with `swin` naming what differs from it), FPN channels, layers, fusion and its width,
    prompt_tuning; text_heads None: BERT's own)."""
    from ..methods.glip import SWIN
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
    arch = _swin_arch(out, source)
    image = "swin-l" if arch.get("embed_dim") == SWIN["swin-l"]["embed_dim"] else "swin-t"
    changed = {k: v for k, v in arch.items() if v != SWIN[image][k]}
    lateral = out.get("fpn.inner_blocks.0.0.weight")
    settings = {"image": image, "swin": changed or None, "channels": lateral.shape[0] if lateral is not None else 256,
                "layers": layers, "fusion": fusion, "text_heads": None, "prompt_tuning": "prompt_table" in out}
    if fusion:
        settings["fusion_dim"] = out["fusion_layers.0.attn.v_proj.weight"].shape[0]
    return out, settings


def check_fits(mapped: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source: str) -> None:
    """Every weight of `reference` (a model's state dict) is in `mapped` with its shape, and nothing else is; the
    buffers a model recomputes (Swin's relative-position index, BERT's position and token type ids) are not needed."""
    expected = {k: v for k, v in reference.items()
                if not k.endswith(("relative_position_index", "position_ids", "token_type_ids"))}
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(reference))
    shapes = [f"{k} {tuple(mapped[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in mapped and mapped[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source} does not fit GLIP: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                              f"shapes {shapes[:3]}")


def official_model(state: dict[str, torch.Tensor], text_source: str = "bert-base-uncased", source: str = "checkpoint"):
    """An official GLIP-T / GLIP-L state dict -> the GLIPDetector holding it; every key must find its place and every
    weight of the model must come from the state dict. text_source: where BERT's tokenizer and config come from."""
    from ..methods.glip import GLIPDetector
    mapped, settings = official_state(state, source)
    model = GLIPDetector(None, text="bert", text_source=text_source, pretrained_text=False, **settings)
    check_fits(mapped, model.state_dict(), source)
    model.load_state_dict(mapped, strict=False)
    return model.eval()


def convert_official(path: str | Path, out: str | Path, text_source: str = "bert-base-uncased", ema: bool = False,
                     preset: str | None = None) -> Path:
    """Convert a released GLIP-T or GLIP-L checkpoint into an ovdense GLIP file (method 'glip', model 'none').
    text_source: where BERT's tokenizer and config come from (its weights come from the checkpoint); ema: use
    'model_ema' instead of 'model'; preset: the file's inference preset (default 'glip-lvis' for a '*lvis*' file,
    else 'glip')."""
    preset = preset or ("glip-lvis" if "lvis" in Path(path).name.lower() else "glip")
    if preset not in PRESETS:
        raise UsageError(f"a GLIP file's preset is one of {', '.join(PRESETS)}, not {preset!r}")
    state = read_official(path, "model_ema" if ema else "model")
    return official_model(state, text_source, str(path)).save(out, preset=preset)


def convert(paths: list[str | Path], output: str | Path, **options) -> Path:
    """The converter's entry point: the one released .pth in `paths` -> `output` (see `convert_official` for the
    options ema, text_source and preset)."""
    if len(paths) != 1:
        raise UsageError(f"GLIP converts one checkpoint (e.g. glip_tiny_model_o365_goldg.pth), got {len(paths)}")
    unknown = set(options) - {"ema", "text_source", "preset"}
    if unknown:
        raise UsageError(f"GLIP's converter takes ema, text_source and preset, not {', '.join(sorted(unknown))}")
    return convert_official(paths[0], output, **options)
