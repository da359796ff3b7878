"""raoyongming/DenseCLIP segmentation checkpoints (mmseg .pth: {'meta', 'state_dict'}) -> an ovdense DenseCLIP file.

The released models (segmentation/README.md, Tsinghua Cloud links) are the RN50, RN101 and ViT-B/16 Semantic FPN
models trained on ADE20K. Their state dict, by module of the official `DenseCLIP` segmentor:

  backbone.*            CLIPResNetWithAttention: open_clip's ModifiedResNet names, the attention pool's positional
                        embedding already resized to the training grid (16 x 16 for 512 px); or CLIPVisionTransformer:
                        open_clip's VisionTransformer names (positional embedding at 40 x 40 for 640 px) plus
                        fpn1-fpn4 -> `pyramid.ops.0-3` (same inner layout)
  text_encoder.*        CLIPTextContextEncoder: CLIP's frozen text tower, its positional embedding cut to 13 rows
                        (8 context tokens + 5 name tokens) -> `backbone.model.*`, rows 13-76 set to 0 (never read:
                        DenseCLIP's prompts are 13 tokens long)
  context_decoder.*     ContextDecoder -> `context_decoder.*` (ovdense uses the same names)
  contexts, gamma       -> `prompt.contexts`, `gamma`
  neck.*                mmseg FPN: lateral_convs.i.conv / fpn_convs.i.conv -> torchvision's inner_blocks.i.0 /
                        layer_blocks.i.0 under `decoder.neck`
  decode_head.*         FPNHead: scale_heads.i.j.{conv,bn}, conv_seg -> `decoder.*` (same names)

The IdentityHead (the auxiliary loss on the score map) has no weights. Nothing else may be in the file.

The converted file is self-contained: the whole image tower is trained weights, the text tower is saved with them
(`text_tower_in_file`), and the CLIP it records is the OpenAI architecture (open_clip's '-quickgelu' name: OpenAI's
QuickGELU) with weights 'random:0', which loading builds without a download and then overwrites entirely.
"""
from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch

from ..backbones import load_clip
from ..errors import CheckpointError, UsageError
from ..methods.denseclip import TEXT_TOWER, DenseCLIP
from ..presets import PRESETS
from ..state import trained_state
from .regionclip import read_official

# mmseg's ADE20KDataset.CLASSES, which the official models tokenized (its 'bed ' has a trailing space, which the
# tokenizer drops). ovdense's data/classnames/ade150.txt is the same list in the same order with the spaces inside
# names dropped (SCLIP's cls_ade20k.txt); DenseCLIP's head finds those names too (methods.denseclip._name_lookup).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet", "sidewalk",
    "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa",
    "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator",
    "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier",
    "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag")
DECODER_HEADS = 4  # the context decoder's heads in every official config (not recoverable from the weights)
ATTNPOOL_HEADS = 32  # CLIPResNetWithAttention's attention pool: 32 heads, whatever the width
_FPN_NECK = {"lateral_convs": "inner_blocks", "fpn_convs": "layer_blocks"}


def official_name(key: str) -> str:
    """The ovdense DenseCLIP name of an official key; CheckpointError for a key DenseCLIP's segmentor does not have."""
    parts = key.split(".")
    if key in ("contexts", "gamma"):
        return "prompt.contexts" if key == "contexts" else "gamma"
    if parts[0] == "backbone" and parts[1] in ("fpn1", "fpn2", "fpn3", "fpn4"):
        return ".".join(["pyramid", "ops", str(int(parts[1][3]) - 1), *parts[2:]])
    if parts[0] == "backbone":
        return "backbone.model.visual." + ".".join(parts[1:])
    if parts[0] == "text_encoder" and key[len("text_encoder."):].startswith(TEXT_TOWER):
        return "backbone.model." + ".".join(parts[1:])
    if parts[0] == "context_decoder":
        return key
    if parts[0] == "neck" and len(parts) == 5 and parts[1] in _FPN_NECK and parts[3] == "conv":
        return f"decoder.neck.{_FPN_NECK[parts[1]]}.{parts[2]}.0.{parts[4]}"
    if parts[0] == "decode_head" and parts[1] in ("scale_heads", "conv_seg"):
        return "decoder." + ".".join(parts[1:])
    raise CheckpointError(f"unknown key {key!r}: not a part of DenseCLIP's segmentor (backbone, text_encoder, "
                          "context_decoder, contexts, gamma, neck, decode_head); is it a DenseCLIP checkpoint?")


def _blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many numbered modules `prefix`.N.* the state holds."""
    numbers = {int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)}
    return max(numbers) + 1 if numbers else 0


def _require(state: dict[str, torch.Tensor], keys: tuple[str, ...], source: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{source}: missing {missing}; a DenseCLIP segmentation checkpoint has them "
                              "(the CLIP + FPN baselines, without contexts, were not released and are not read)")


def architecture(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """What the official state dict says of its model: 'vit', the OpenAI CLIP architecture as open_clip names it
    ('RN50-quickgelu', ...), the training size, and the DenseCLIP constructor arguments the weights fix."""
    _require(state, ("contexts", "gamma", "backbone.conv1.weight", "text_encoder.positional_embedding",
                     "text_encoder.text_projection", "context_decoder.memory_proj.1.weight",
                     "neck.lateral_convs.0.conv.weight", "decode_head.conv_seg.weight"), source)
    vit = "backbone.class_embedding" in state
    conv1 = state["backbone.conv1.weight"]
    if vit:
        _require(state, ("backbone.positional_embedding",), source)
        width, patch = conv1.shape[0], conv1.shape[-1]
        vision = {"layers": _blocks(state, "backbone.transformer.resblocks."), "width": width, "patch_size": patch}
        grid, stride = state["backbone.positional_embedding"].shape[0] - 1, patch
        channels = [width] * 4
    else:
        _require(state, ("backbone.attnpool.positional_embedding",), source)
        width = 2 * conv1.shape[0]  # the 3-conv stem starts at half the width
        vision = {"layers": [_blocks(state, f"backbone.layer{i}.") for i in range(1, 5)], "width": width}
        grid, stride = state["backbone.attnpool.positional_embedding"].shape[0] - 1, 32
        channels = [width * 4 * 2**i for i in range(4)]
    side = math.isqrt(grid)
    if side * side != grid:
        raise CheckpointError(f"{source}: the backbone's positional embedding has {grid} positions, not a square grid")
    contexts, projection = state["contexts"], state["text_encoder.text_projection"]
    classes = state["decode_head.conv_seg.weight"].shape[0]
    lateral = [state[f"neck.lateral_convs.{i}.conv.weight"].shape[1]
               for i in range(_blocks(state, "neck.lateral_convs."))]
    score_levels = [i for i, (c, n) in enumerate(zip(channels, lateral)) if n == c + classes]
    if len(lateral) != 4 or len(score_levels) != 1:
        raise CheckpointError(f"{source}: the FPN's inputs {lateral} are not the backbone's levels {channels} with the "
                              f"{classes}-class score map concatenated to one of them")
    return {
        "vit": vit, "vision": vision, "embed_dim": projection.shape[1], "text_width": projection.shape[0],
        "text_layers": _blocks(state, "text_encoder.transformer.resblocks."), "train_size": side * stride,
        "classes": classes, "method": {
            "context_tokens": contexts.shape[1],
            "name_length": state["text_encoder.positional_embedding"].shape[0] - contexts.shape[1],
            "decoder_width": state["context_decoder.memory_proj.1.weight"].shape[0], "decoder_heads": DECODER_HEADS,
            "decoder_layers": _blocks(state, "context_decoder.decoder."),
            "fpn_channels": state["neck.lateral_convs.0.conv.weight"].shape[0], "score_level": score_levels[0],
            "train_size": side * stride, "class_embedding_twice": vit, "loss_average": "all",
            "text_tower_in_file": True}}


def clip_name(arch: dict, source: str = "checkpoint") -> str:
    """The open_clip name of the OpenAI CLIP with this architecture (its '-quickgelu' variant: OpenAI's activation)."""
    for name, tag in open_clip.list_pretrained():
        config = open_clip.get_model_config(name) if tag == "openai" and name.endswith("-quickgelu") else None
        if config is None:
            continue
        vision, text = config["vision_cfg"], config["text_cfg"]
        if (config["embed_dim"] == arch["embed_dim"] and text["width"] == arch["text_width"]
                and text["layers"] == arch["text_layers"]
                and all(vision.get(key) == value for key, value in arch["vision"].items())):
            return name
    raise CheckpointError(f"{source}: no OpenAI CLIP has this backbone ({arch['vision']}, embedding "
                          f"{arch['embed_dim']}); pass the open_clip architecture as `model`")


def official_state(state: dict[str, torch.Tensor], method: DenseCLIP, source: str = "checkpoint"
                   ) -> dict[str, torch.Tensor]:
    """The official state dict under ovdense names: exactly what `method.save` writes, every shape checked."""
    out = {official_name(key): value for key, value in state.items()}
    pos = "backbone.model.positional_embedding"
    reference = method.state_dict()
    if pos in out and pos in reference and out[pos].shape[1:] == reference[pos].shape[1:]:
        rows = out[pos].shape[0]
        if rows > reference[pos].shape[0]:
            raise CheckpointError(f"{source}: text_encoder.positional_embedding has {rows} rows, more than the CLIP's")
        out[pos] = torch.cat([out[pos], out[pos].new_zeros(reference[pos].shape[0] - rows, out[pos].shape[1])])
    saved = set(trained_state(method)) | {k for k in reference if k.startswith(method.saved_prefixes)}
    missing, unexpected = sorted(saved - set(out)), sorted(set(out) - saved)
    shapes = [f"{k} {tuple(out[k].shape)} != {tuple(reference[k].shape)}" for k in saved & set(out)
              if out[k].shape != reference[k].shape]
    if missing or unexpected or shapes:
        official = {official_name(k): k for k in state}
        raise CheckpointError(f"{source} does not fit DenseCLIP on {method.backbone.name}: missing {missing[:5]}, "
                              f"unexpected {[official.get(k, k) for k in unexpected][:5]}, shapes {shapes[:3]}")
    return out


def official_model(state: dict[str, torch.Tensor], class_names: list[str] | None = None, model: str | None = None,
                   source: str = "checkpoint") -> DenseCLIP:
    """A DenseCLIP holding an official state dict. class_names: the training classes in the head's order (default:
    ADE20K's 150); model: the open_clip architecture (default: the OpenAI CLIP the backbone's shapes name)."""
    arch = architecture(state, source)
    if class_names is None:
        if arch["classes"] != len(ADE20K_CLASSES):
            raise CheckpointError(f"{source} classifies {arch['classes']} classes, not ADE20K's 150: pass its "
                                  "class_names in the order it was trained with")
        class_names = list(ADE20K_CLASSES)
    if len(class_names) != arch["classes"]:
        raise UsageError(f"{len(class_names)} class names for a {arch['classes']}-class checkpoint ({source})")
    backbone = load_clip(model or clip_name(arch, source), "random")
    if not arch["vit"] and backbone.visual.attnpool.num_heads != ATTNPOOL_HEADS:
        raise CheckpointError(f"{source}: {backbone.name}'s attention pool has {backbone.visual.attnpool.num_heads} "
                              f"heads; DenseCLIP's has {ATTNPOOL_HEADS}")
    method = DenseCLIP(backbone, class_names, **arch["method"])
    method.load_state_dict(official_state(state, method, source), strict=False)
    return method.eval()


def convert(paths: list[str | Path], output: str | Path, class_names: list[str] | None = None,
            model: str | None = None) -> Path:
    """Convert one released DenseCLIP checkpoint (`paths` holds its file) into an ovdense DenseCLIP file at `output`,
    with the preset of its test protocol ('denseclip-ade-512' / 'denseclip-ade-640' for the ADE20K models).
    class_names, model: as in `official_model`."""
    if len(paths) != 1:
        raise UsageError(f"a DenseCLIP release is one file, got {len(paths)}: {', '.join(map(str, paths))}")
    path = Path(paths[0])
    method = official_model(read_official(path, "state_dict"), class_names, model, str(path))
    preset = f"denseclip-ade-{method.config['train_size']}"
    ade = method.class_names == list(ADE20K_CLASSES)
    return method.save(output, preset=preset if ade and preset in PRESETS else None)
