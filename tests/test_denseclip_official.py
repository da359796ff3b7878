"""DenseCLIP equals the authors' code (raoyongming/DenseCLIP, segmentation/denseclip): official-layout checkpoints of
tiny random CLIPs (ResNet, ViT patch 16 and 8) are converted, loaded with `DenseCLIP.from_checkpoint` and compared
with a step-by-step re-computation of the official forward, written below from models.py (CLIPResNetWithAttention,
AttentionPool2d, CLIPVisionTransformer, CLIPTextContextEncoder, ContextDecoder), denseclip.py (after_extract_feat,
encode_decode, slide_inference) and mmseg 0.19's FPN and FPNHead, at the training size and at a non-square size."""
import copy
import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovdense.convert.denseclip import ADE20K_CLASSES, architecture, clip_name, convert
from ovdense.convert.denseclip import official_state as converted_state  # the converter's key mapping
from ovdense.data.datasets import builtin_vocabulary
from ovdense.errors import CheckpointError
from ovdense.methods.base import read_trained
from ovdense.methods.denseclip import DenseCLIP
from ovdense.predictor import SegmentationPredictor
from ovdense.presets import PRESETS, Protocol

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
# quick_gelu: OpenAI's activation, as the official blocks; the ResNet's head_width makes the attention pool 32-headed.
CONFIGS = {
    "dc-tiny-rn": {"embed_dim": 32, "quick_gelu": True, "text_cfg": TEXT,
                   "vision_cfg": {"image_size": 64, "layers": [1, 2, 1, 1], "width": 16, "head_width": 16}},
    "dc-tiny-vit16": {"embed_dim": 32, "quick_gelu": True, "text_cfg": TEXT,
                      "vision_cfg": {"image_size": 64, "layers": 12, "width": 32, "patch_size": 16, "head_width": 16}},
    "dc-tiny-vit8": {"embed_dim": 32, "quick_gelu": True, "text_cfg": TEXT,
                     "vision_cfg": {"image_size": 64, "layers": 12, "width": 32, "patch_size": 8, "head_width": 16}},
}
TRAIN_SIZE = 96  # the official models' input_resolution (512 / 640) in small: the positional grids are 3, 6 and 12
CONTEXTS, NAME_LENGTH, DECODER = 8, 5, {"width": 32, "heads": 4, "layers": 2}
FPN_CHANNELS = 16
SIZES = {"dc-tiny-rn": [(96, 96), (64, 160)], "dc-tiny-vit16": [(96, 96), (64, 112)],
         "dc-tiny-vit8": [(96, 96), (64, 96)]}
SCORE_LEVEL = {"dc-tiny-rn": 3, "dc-tiny-vit16": 2, "dc-tiny-vit8": 1}  # the config's score_concat_index
TAPS = [3, 5, 7, 11]  # CLIPVisionTransformer's out_indices


@pytest.fixture(scope="module", autouse=True)
def tiny_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("denseclip_configs")
    for name, config in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


# ------------------------------------------------------------------------- official-layout state dicts
class _Random:
    """Random tensors scaled so that activations stay near 1 through the network."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape, std=None):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        std = std if std is not None else fan_in ** -0.5
        return torch.randn(*shape, generator=self.generator) * std

    def uniform(self, *shape, low=0.5, high=1.5):
        return low + (high - low) * torch.rand(*shape, generator=self.generator)


class _Shapes:
    """_Random's interface, giving uninitialised tensors: only the shapes matter (use on the meta device)."""

    def normal(self, *shape, std=None):
        return torch.empty(*shape)

    uniform = normal


def _norm(state, r, prefix, width):  # LayerNorm / GroupNorm
    state[f"{prefix}.weight"], state[f"{prefix}.bias"] = r.uniform(width), r.normal(width, std=0.1)


def _bn(state, r, prefix, width):
    _norm(state, r, prefix, width)
    state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"] = r.normal(width, std=0.1), r.uniform(width)
    state[f"{prefix}.num_batches_tracked"] = torch.tensor(100)


def _linear(state, r, prefix, out, inp, bias=True):
    state[f"{prefix}.weight"] = r.normal(out, inp)
    if bias:
        state[f"{prefix}.bias"] = r.normal(out, std=0.1)


def _residual_blocks(state, r, prefix, width, layers):  # models.py Transformer / ResidualAttentionBlock
    for i in range(layers):
        p = f"{prefix}.resblocks.{i}"
        state[f"{p}.attn.in_proj_weight"], state[f"{p}.attn.in_proj_bias"] = r.normal(3 * width, width), \
            r.normal(3 * width, std=0.1)
        _linear(state, r, f"{p}.attn.out_proj", width, width)
        _norm(state, r, f"{p}.ln_1", width)
        _linear(state, r, f"{p}.mlp.c_fc", 4 * width, width)
        _linear(state, r, f"{p}.mlp.c_proj", width, 4 * width)
        _norm(state, r, f"{p}.ln_2", width)


def official_resnet(state, r, layers, width, output_dim, input_resolution):
    """CLIPResNetWithAttention's keys and shapes (`backbone.*`)."""
    state["backbone.conv1.weight"] = r.normal(width // 2, 3, 3, 3)
    for name, (out, inp) in {"conv2": (width // 2, width // 2), "conv3": (width, width // 2)}.items():
        state[f"backbone.{name}.weight"] = r.normal(out, inp, 3, 3)
    for name, channels in {"bn1": width // 2, "bn2": width // 2, "bn3": width}.items():
        _bn(state, r, f"backbone.{name}", channels)
    inplanes = width
    for stage, blocks in enumerate(layers, start=1):
        planes = width * 2 ** (stage - 1)
        for b in range(blocks):
            p = f"backbone.layer{stage}.{b}"
            state[f"{p}.conv1.weight"] = r.normal(planes, inplanes, 1, 1)
            state[f"{p}.conv2.weight"] = r.normal(planes, planes, 3, 3)
            state[f"{p}.conv3.weight"] = r.normal(planes * 4, planes, 1, 1)
            for i, channels in ((1, planes), (2, planes), (3, planes * 4)):
                _bn(state, r, f"{p}.bn{i}", channels)
            if b == 0 and (stage > 1 or inplanes != planes * 4):  # stride > 1 or a change of width
                state[f"{p}.downsample.0.weight"] = r.normal(planes * 4, inplanes, 1, 1)
                _bn(state, r, f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    embed = width * 32
    state["backbone.attnpool.positional_embedding"] = r.normal((input_resolution // 32) ** 2 + 1, embed, std=0.5)
    for name in ("k_proj", "q_proj", "v_proj"):
        _linear(state, r, f"backbone.attnpool.{name}", embed, embed)
    _linear(state, r, "backbone.attnpool.c_proj", output_dim, embed)


def official_vit(state, r, patch, width, layers, output_dim, input_resolution):
    """CLIPVisionTransformer(get_embeddings=True)'s keys and shapes (`backbone.*`), fpn1-fpn4 of patch 16 or 8."""
    state["backbone.conv1.weight"] = r.normal(width, 3, patch, patch)
    state["backbone.class_embedding"] = r.normal(width, std=0.5)
    state["backbone.positional_embedding"] = r.normal((input_resolution // patch) ** 2 + 1, width, std=0.5)
    _norm(state, r, "backbone.ln_pre", width)
    _residual_blocks(state, r, "backbone.transformer", width, layers)
    _norm(state, r, "backbone.ln_post", width)
    state["backbone.proj"] = r.normal(width, output_dim, std=width ** -0.5)

    def up(prefix):  # ConvTranspose2d(width, width, 2, 2)
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = r.normal(width, width, 2, 2), r.normal(width, std=0.1)
    if patch == 16:  # fpn1: GN, ConvT, SyncBN, GELU, ConvT; fpn2: GN, ConvT; fpn3: GN; fpn4: GN, MaxPool
        _norm(state, r, "backbone.fpn1.0", width), up("backbone.fpn1.1"), _bn(state, r, "backbone.fpn1.2", width)
        up("backbone.fpn1.4")
        _norm(state, r, "backbone.fpn2.0", width), up("backbone.fpn2.1")
        _norm(state, r, "backbone.fpn3", width)
        _norm(state, r, "backbone.fpn4.0", width)
    else:  # fpn1: GN, ConvT; fpn2: GN; fpn3: GN, MaxPool 2; fpn4: GN, MaxPool 4
        _norm(state, r, "backbone.fpn1.0", width), up("backbone.fpn1.1")
        _norm(state, r, "backbone.fpn2", width)
        _norm(state, r, "backbone.fpn3.0", width)
        _norm(state, r, "backbone.fpn4.0", width)


def random_official_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random DenseCLIP segmentor state dict with the official keys and shapes for the tiny config `name`."""
    config, r, state = CONFIGS[name], _Random(seed), {}
    vision, embed = config["vision_cfg"], config["embed_dim"]
    if "patch_size" in vision:
        official_vit(state, r, vision["patch_size"], vision["width"], vision["layers"], embed, TRAIN_SIZE)
        channels = [vision["width"]] * 4
    else:
        official_resnet(state, r, vision["layers"], vision["width"], embed, TRAIN_SIZE)
        channels = [vision["width"] * 4 * 2 ** i for i in range(4)]
    tw = TEXT["width"]  # CLIPTextContextEncoder(context_length=13)
    _residual_blocks(state, r, "text_encoder.transformer", tw, TEXT["layers"])
    state["text_encoder.token_embedding.weight"] = r.normal(TEXT["vocab_size"], tw, std=0.5)
    state["text_encoder.positional_embedding"] = r.normal(CONTEXTS + NAME_LENGTH, tw, std=0.1)
    _norm(state, r, "text_encoder.ln_final", tw)
    state["text_encoder.text_projection"] = r.normal(tw, embed, std=tw ** -0.5)
    cw = DECODER["width"]  # ContextDecoder(transformer_width, heads, layers, visual_dim)
    _norm(state, r, "context_decoder.memory_proj.0", embed)
    _linear(state, r, "context_decoder.memory_proj.1", cw, embed)
    _norm(state, r, "context_decoder.memory_proj.2", cw)
    _norm(state, r, "context_decoder.text_proj.0", embed)
    _linear(state, r, "context_decoder.text_proj.1", cw, embed)
    for i in range(DECODER["layers"]):
        p = f"context_decoder.decoder.{i}"
        for attention in ("self_attn", "cross_attn"):
            for proj in ("q_proj", "k_proj", "v_proj"):
                _linear(state, r, f"{p}.{attention}.{proj}", cw, cw, bias=False)
            _linear(state, r, f"{p}.{attention}.proj", cw, cw)
        for norm in ("norm1", "norm2", "norm3"):
            _norm(state, r, f"{p}.{norm}", cw)
        _linear(state, r, f"{p}.mlp.0", 4 * cw, cw)
        _linear(state, r, f"{p}.mlp.3", cw, 4 * cw)
    _norm(state, r, "context_decoder.out_proj.0", cw)
    _linear(state, r, "context_decoder.out_proj.1", embed, cw)
    state["contexts"] = r.normal(1, CONTEXTS, tw, std=1.0)
    state["gamma"] = r.uniform(embed, low=0.2, high=1.0)  # trained gammas; 1e-4 would hide the decoder
    classes = len(ADE20K_CLASSES)
    inputs = [c + (classes if i == SCORE_LEVEL[name] else 0) for i, c in enumerate(channels)]
    for i, c in enumerate(inputs):  # mmseg FPN: ConvModule(c, 256, 1) laterals and ConvModule(256, 256, 3) outputs
        state[f"neck.lateral_convs.{i}.conv.weight"] = r.normal(FPN_CHANNELS, c, 1, 1)
        state[f"neck.lateral_convs.{i}.conv.bias"] = r.normal(FPN_CHANNELS, std=0.1)
        state[f"neck.fpn_convs.{i}.conv.weight"] = r.normal(FPN_CHANNELS, FPN_CHANNELS, 3, 3)
        state[f"neck.fpn_convs.{i}.conv.bias"] = r.normal(FPN_CHANNELS, std=0.1)
    for i in range(4):  # FPNHead: max(1, log2(stride / 4)) ConvModules (conv + bn), Upsample between
        for k in range(max(1, i)):
            state[f"decode_head.scale_heads.{i}.{2 * k}.conv.weight"] = r.normal(FPN_CHANNELS, FPN_CHANNELS, 3, 3)
            _bn(state, r, f"decode_head.scale_heads.{i}.{2 * k}.bn", FPN_CHANNELS)
    state["decode_head.conv_seg.weight"] = r.normal(classes, FPN_CHANNELS, 1, 1)
    state["decode_head.conv_seg.bias"] = r.normal(classes, std=0.1)
    return state


# ------------------------------------------------------------------------------ the official forward
def _layer_norm(x, s, p):
    return F.layer_norm(x, x.shape[-1:], s[f"{p}.weight"], s[f"{p}.bias"])


def _batch_norm(x, s, p):
    return F.batch_norm(x, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"])


def _attention(q, k, v, heads, mask=None):
    """(B, N, C) queries, (B, M, C) keys / values -> (B, N, C): softmax(q k^T / sqrt(d) + mask) v per head."""
    split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
    weights = split[0] @ split[1].transpose(-1, -2) / math.sqrt(split[0].shape[-1])
    weights = (weights + mask if mask is not None else weights).softmax(dim=-1)
    return (weights @ split[2]).transpose(1, 2).flatten(2)


def _block(x, s, p, heads, mask=None):
    """ResidualAttentionBlock: x + attn(ln_1(x)), then + mlp(ln_2(x)) with QuickGELU; batch-first here."""
    y = _layer_norm(x, s, f"{p}.ln_1")
    q, k, v = F.linear(y, s[f"{p}.attn.in_proj_weight"], s[f"{p}.attn.in_proj_bias"]).chunk(3, dim=-1)
    x = x + F.linear(_attention(q, k, v, heads, mask), s[f"{p}.attn.out_proj.weight"], s[f"{p}.attn.out_proj.bias"])
    y = F.linear(_layer_norm(x, s, f"{p}.ln_2"), s[f"{p}.mlp.c_fc.weight"], s[f"{p}.mlp.c_fc.bias"])
    y = y * torch.sigmoid(1.702 * y)
    return x + F.linear(y, s[f"{p}.mlp.c_proj.weight"], s[f"{p}.mlp.c_proj.bias"])


def _resize_spatial(pos, height, width):
    """AttentionPool2d / CLIPVisionTransformer.forward: the spatial rows bilinearly from the training grid to (H, W)."""
    g = math.isqrt(pos.shape[0] - 1)
    spatial = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    spatial = F.interpolate(spatial, size=(height, width), mode="bilinear")
    return spatial.reshape(-1, height * width).permute(1, 0)


def official_resnet_forward(s, x):
    """CLIPResNetWithAttention.forward -> ([4 stages], global (B, D), dense (B, D, h, w))."""
    for i in (1, 2, 3):
        x = F.relu(_batch_norm(F.conv2d(x, s[f"backbone.conv{i}.weight"], stride=2 if i == 1 else 1, padding=1), s,
                               f"backbone.bn{i}"))
    x = F.avg_pool2d(x, 2)
    stages = []
    for stage in range(1, 5):
        for b in range(len({k.split(".")[2] for k in s if k.startswith(f"backbone.layer{stage}.")})):
            p, stride = f"backbone.layer{stage}.{b}", 2 if stage > 1 and b == 0 else 1
            out = F.relu(_batch_norm(F.conv2d(x, s[f"{p}.conv1.weight"]), s, f"{p}.bn1"))
            out = F.relu(_batch_norm(F.conv2d(out, s[f"{p}.conv2.weight"], padding=1), s, f"{p}.bn2"))
            out = F.avg_pool2d(out, stride) if stride > 1 else out
            out = _batch_norm(F.conv2d(out, s[f"{p}.conv3.weight"]), s, f"{p}.bn3")
            identity = x
            if f"{p}.downsample.0.weight" in s:
                identity = F.avg_pool2d(x, stride) if stride > 1 else x
                identity = _batch_norm(F.conv2d(identity, s[f"{p}.downsample.0.weight"]), s, f"{p}.downsample.1")
            x = F.relu(out + identity)
        stages.append(x)
    batch, channels, h, w = x.shape  # AttentionPool2d: every location (and the mean) queries all of them
    tokens = x.reshape(batch, channels, h * w).permute(0, 2, 1)
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
    pos = s["backbone.attnpool.positional_embedding"]
    tokens = tokens + torch.cat([pos[:1], _resize_spatial(pos, h, w)])
    q, k, v = (F.linear(tokens, s[f"backbone.attnpool.{n}.weight"], s[f"backbone.attnpool.{n}.bias"])
               for n in ("q_proj", "k_proj", "v_proj"))
    out = F.linear(_attention(q, k, v, 32), s["backbone.attnpool.c_proj.weight"], s["backbone.attnpool.c_proj.bias"])
    return stages, out[:, 0], out[:, 1:].permute(0, 2, 1).reshape(batch, -1, h, w)


def official_vit_forward(s, x, heads):
    """CLIPVisionTransformer.forward (get_embeddings=True) -> ([block maps at TAPS], [fpn1-4 outputs], global,
    dense)."""
    x = F.conv2d(x, s["backbone.conv1.weight"], stride=s["backbone.conv1.weight"].shape[-1])
    batch, channels, h, w = x.shape
    x = x.reshape(batch, channels, -1).permute(0, 2, 1)
    cls = s["backbone.class_embedding"]
    x = torch.cat([cls + torch.zeros(batch, 1, channels), x], dim=1)
    pos = s["backbone.positional_embedding"]
    x = x + torch.cat([(pos[0] + cls)[None], _resize_spatial(pos, h, w)])[None]  # class_embedding added twice
    x = _layer_norm(x, s, "backbone.ln_pre")
    maps = []
    for i in range(len({k.split(".")[3] for k in s if k.startswith("backbone.transformer.resblocks.")})):
        x = _block(x, s, f"backbone.transformer.resblocks.{i}", heads)
        if i in TAPS:
            maps.append(x[:, 1:].permute(0, 2, 1).reshape(batch, -1, h, w))

    def gn(t, p):
        return F.group_norm(t, 1, s[f"{p}.weight"], s[f"{p}.bias"])

    def up(t, p):
        return F.conv_transpose2d(t, s[f"{p}.weight"], s[f"{p}.bias"], stride=2)
    if s["backbone.conv1.weight"].shape[-1] == 16:
        levels = [up(F.gelu(_batch_norm(up(gn(maps[0], "backbone.fpn1.0"), "backbone.fpn1.1"), s, "backbone.fpn1.2")),
                     "backbone.fpn1.4"),
                  up(gn(maps[1], "backbone.fpn2.0"), "backbone.fpn2.1"), gn(maps[2], "backbone.fpn3"),
                  F.max_pool2d(gn(maps[3], "backbone.fpn4.0"), 2)]
    else:
        levels = [up(gn(maps[0], "backbone.fpn1.0"), "backbone.fpn1.1"), gn(maps[1], "backbone.fpn2"),
                  F.max_pool2d(gn(maps[2], "backbone.fpn3.0"), 2), F.max_pool2d(gn(maps[3], "backbone.fpn4.0"), 4)]
    x = _layer_norm(x, s, "backbone.ln_post") @ s["backbone.proj"]
    return maps, levels, x[:, 0], x[:, 1:].reshape(batch, h, w, -1).permute(0, 3, 1, 2)


def official_text(s, tokens, heads):
    """CLIPTextContextEncoder.forward(texts, contexts) -> (1, K, D): [SOT] + contexts + the name's other tokens."""
    words = F.embedding(tokens, s["text_encoder.token_embedding.weight"])
    contexts = s["contexts"].expand(len(tokens), -1, -1)
    x = torch.cat([words[:, :1], contexts, words[:, 1:]], dim=1) + s["text_encoder.positional_embedding"]
    length = x.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(TEXT["layers"]):
        x = _block(x, s, f"text_encoder.transformer.resblocks.{i}", heads, mask)
    x = _layer_norm(x, s, "text_encoder.ln_final")
    eot = x[torch.arange(len(x)), tokens.argmax(dim=-1) + contexts.shape[1]]
    return (eot @ s["text_encoder.text_projection"])[None]


def official_context_decoder(s, text, visual, heads):
    """ContextDecoder.forward(text (B, K, D), visual (B, N, D)) in eval mode (dropout off)."""
    def linear(t, p):
        return F.linear(t, s[f"{p}.weight"], s.get(f"{p}.bias"))

    def attention(p, q, kv):
        return linear(_attention(linear(q, f"{p}.q_proj"), linear(kv, f"{p}.k_proj"), linear(kv, f"{p}.v_proj"),
                                 heads), f"{p}.proj")
    memory = linear(_layer_norm(visual, s, "context_decoder.memory_proj.0"), "context_decoder.memory_proj.1")
    memory = _layer_norm(memory, s, "context_decoder.memory_proj.2")
    x = linear(_layer_norm(text, s, "context_decoder.text_proj.0"), "context_decoder.text_proj.1")
    for i in range(DECODER["layers"]):
        p = f"context_decoder.decoder.{i}"
        y = _layer_norm(x, s, f"{p}.norm1")
        x = x + attention(f"{p}.self_attn", y, y)
        x = x + attention(f"{p}.cross_attn", _layer_norm(x, s, f"{p}.norm2"), memory)
        x = x + linear(F.gelu(linear(_layer_norm(x, s, f"{p}.norm3"), f"{p}.mlp.0")), f"{p}.mlp.3")
    return linear(_layer_norm(x, s, "context_decoder.out_proj.0"), "context_decoder.out_proj.1")


def official_fpn(s, levels):
    """mmseg FPN (nearest top-down, no extra outputs) then FPNHead (align_corners=False) -> logits (B, K, h0, w0)."""
    laterals = [F.conv2d(x, s[f"neck.lateral_convs.{i}.conv.weight"], s[f"neck.lateral_convs.{i}.conv.bias"])
                for i, x in enumerate(levels)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [F.conv2d(x, s[f"neck.fpn_convs.{i}.conv.weight"], s[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
            for i, x in enumerate(laterals)]
    output = None
    for i, x in enumerate(outs):
        for k in range(max(1, i)):
            p = f"decode_head.scale_heads.{i}.{2 * k}"
            x = F.relu(_batch_norm(F.conv2d(x, s[f"{p}.conv.weight"], padding=1), s, f"{p}.bn"))
            if i > 0:  # mmseg Upsample: size = int(2 * side)
                x = F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=False)
        output = x if output is None else output + F.interpolate(x, size=output.shape[2:], mode="bilinear",
                                                                  align_corners=False)
    return F.conv2d(output, s["decode_head.conv_seg.weight"], s["decode_head.conv_seg.bias"])


def official_forward(name, s, images, tokens):
    """DenseCLIP.encode_decode's steps (before the final resize): every intermediate the comparison looks at."""
    vision, heads = CONFIGS[name]["vision_cfg"], TEXT["heads"]
    if "patch_size" in vision:
        maps, levels, global_feat, dense = official_vit_forward(s, images, vision["width"] // vision["head_width"])
    else:
        maps, global_feat, dense = official_resnet_forward(s, images)
        levels = list(maps)
    batch, channels, h, w = dense.shape  # after_extract_feat
    visual_context = torch.cat([global_feat.reshape(batch, channels, 1), dense.reshape(batch, channels, h * w)],
                               dim=2).permute(0, 2, 1)
    text = official_text(s, tokens, heads).expand(batch, -1, -1)
    text = text + s["gamma"] * official_context_decoder(s, text, visual_context, DECODER["heads"])
    score_map = torch.einsum("bchw,bkc->bkhw", F.normalize(dense, dim=1, p=2), F.normalize(text, dim=2, p=2))
    fpn_in = list(levels)
    fpn_in[SCORE_LEVEL[name]] = torch.cat([fpn_in[SCORE_LEVEL[name]], score_map], dim=1)
    return {"maps": maps, "levels": levels, "global": global_feat, "dense": dense, "text": text,
            "score_map": score_map, "logits": official_fpn(s, fpn_in)}


def official_slide(name, s, image, tokens, crop, stride, num_classes):
    """DenseCLIP.slide_inference (no rescale) then softmax: (1, 3, H, W) -> (K, H, W) probabilities."""
    _, _, h_img, w_img = image.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds, count = torch.zeros(1, num_classes, h_img, w_img), torch.zeros(1, 1, h_img, w_img)
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * stride + crop, h_img), min(w_idx * stride + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            crop_img = image[:, :, y1:y2, x1:x2]
            logits = official_forward(name, s, crop_img, tokens)["logits"]
            logits = F.interpolate(logits, size=crop_img.shape[2:], mode="bilinear", align_corners=False)
            preds += F.pad(logits, (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
    return (preds / count).softmax(dim=1)[0]


# ------------------------------------------------------------------------------------------- the tests
def _tokens():
    tokens = open_clip.tokenize(list(ADE20K_CLASSES))
    assert (tokens[:, NAME_LENGTH:] == 0).all()  # tokenize(c, context_length=5) of every name fits
    return tokens[:, :NAME_LENGTH]


def _official_file(tmp_path, name, state):
    path = tmp_path / f"{name}.pth"
    torch.save({"meta": {"CLASSES": ADE20K_CLASSES}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (official state dict, the DenseCLIP loaded from its converted file)."""
    folder, out = tmp_path_factory.mktemp("denseclip_official"), {}
    for name in CONFIGS:
        state = random_official_state(name)
        path = convert([_official_file(folder, name, state)], folder / f"{name}.safetensors", model=name)
        out[name] = state, DenseCLIP.from_checkpoint(path), path
    return out


def _compare(model, state, name, size):
    torch.manual_seed(1)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = official_forward(name, state, images, _tokens())
        image = model.encode_image(images)
        levels = model.pyramid([image[f"level{i}"] for i in range(4)])
        text = model.text_embeddings(model.class_tokens, image)
        got = {"maps": [image[f"level{i}"] for i in range(4)], "levels": levels, "global": image["global"],
               "dense": image["dense"], "text": text, "score_map": model.score_map(image, text),
               "logits": model(images)["logits"]}
    differences = {}
    for key, value in expected.items():
        pairs = list(zip(value, got[key])) if isinstance(value, list) else [(value, got[key])]
        assert all(a.shape == b.shape for a, b in pairs), key
        differences[key] = max(float((a - b).abs().max()) for a, b in pairs)
    return differences


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_model_computes_what_the_official_code_computes(converted, name):
    state, model, _ = converted[name]
    assert model.score_level == SCORE_LEVEL[name] and model.config["train_size"] == TRAIN_SIZE
    if "patch_size" in CONFIGS[name]["vision_cfg"]:
        assert model.levels == TAPS and model.class_embedding_twice
    for size in SIZES[name]:  # the training size, then a non-native, non-square one
        differences = _compare(model, state, name, size)
        assert max(differences.values()) < 1e-4, (size, differences)


def test_a_misplaced_tensor_changes_the_result(converted):
    """Two tensors of one shape swapped (as a converter mixing their names would place them): the comparison fails.
    ViT patch 16: fpn2's and fpn3's GroupNorm weights; the context decoder's self-attention q and k."""
    name = "dc-tiny-vit16"
    state, model = converted[name][0], copy.deepcopy(converted[name][1])
    for first, second in (("backbone.fpn2.0.weight", "backbone.fpn3.weight"),
                          ("context_decoder.decoder.0.self_attn.q_proj.weight",
                           "context_decoder.decoder.0.self_attn.k_proj.weight")):
        swapped = {**state, first: state[second], second: state[first]}
        model.load_state_dict(converted_state(swapped, model), strict=False)
        assert max(_compare(model, state, name, (96, 96)).values()) > 1e-3


def test_unknown_missing_and_misshapen_keys_are_named(converted, tmp_path):
    name = "dc-tiny-rn"
    state = converted[name][0]
    renamed = {("decode_head.scale_head.1.0.conv.weight" if k == "decode_head.scale_heads.1.0.conv.weight" else k): v
               for k, v in state.items()}
    with pytest.raises(CheckpointError, match="decode_head.scale_head.1.0.conv.weight"):
        convert([_official_file(tmp_path, name, renamed)], tmp_path / "x.safetensors", model=name)
    model = converted[name][1]
    missing = {k: v for k, v in state.items() if k != "neck.fpn_convs.2.conv.bias"}
    with pytest.raises(CheckpointError, match=r"decoder\.neck\.layer_blocks\.2\.0\.bias"):
        converted_state(missing, model)
    with pytest.raises(CheckpointError, match="gamma"):
        converted_state({**state, "gamma": torch.ones(7)}, model)
    with pytest.raises(CheckpointError, match="no state dict"):
        torch.save({"model": state}, tmp_path / "other.pth")
        convert([tmp_path / "other.pth"], tmp_path / "x.safetensors", model=name)


def test_the_converted_file_is_self_contained(converted):
    state, model, path = converted["dc-tiny-rn"]
    metadata, saved = read_trained(path)
    assert metadata["model"] == "dc-tiny-rn" and metadata["weights"].startswith("random")  # nothing to download
    assert metadata["config"]["class_names"] == list(ADE20K_CLASSES) and metadata["config"]["loss_average"] == "all"
    assert "preset" not in metadata  # no ADE20K preset for a 96 px model
    # the frozen text tower travels in the file: its 13 official rows, zeros after them
    pos = saved["backbone.model.positional_embedding"]
    torch.testing.assert_close(pos[:13], state["text_encoder.positional_embedding"])
    assert pos.shape[0] == TEXT["context_length"] and not pos[13:].any()
    torch.testing.assert_close(saved["backbone.model.token_embedding.weight"],
                               state["text_encoder.token_embedding.weight"])
    # the attention pool's positional embedding stays at the training grid (3 x 3 for 96 px)
    assert saved["backbone.model.visual.attnpool.positional_embedding"].shape[0] == 10


def test_end_to_end_sliding_window_prediction_equals_the_official_slide_inference(converted):
    """The converted file through the predictor (short side kept, windows 96 / 64, the head's logits averaged) gives
    the probabilities of the official slide_inference; the vocabulary is ovdense's ade150 list (no spaces)."""
    name = "dc-tiny-vit16"
    state, model, path = converted[name]
    rgb = np.random.default_rng(0).integers(0, 256, (96, 160, 3)).astype(np.uint8)
    protocol = Protocol("t", short_side=96, crop=96, stride=64, templates="none")
    result = SegmentationPredictor(model, protocol)(rgb, builtin_vocabulary("ade150").names)
    mean, std = torch.tensor(model.backbone.image_mean), torch.tensor(model.backbone.image_std)
    image = ((torch.from_numpy(rgb).permute(2, 0, 1).float() / 255 - mean[:, None, None]) / std[:, None, None])[None]
    with torch.no_grad():
        expected = official_slide(name, state, image, _tokens(), 96, 64, len(ADE20K_CLASSES))
    assert (result.scores - expected).abs().max() < 1e-4
    assert np.array_equal(result.labels, expected.argmax(dim=0).numpy())


def test_ade20k_names_and_presets():
    assert [n.replace(" ", "") for n in ADE20K_CLASSES] == builtin_vocabulary("ade150").names
    assert len(ADE20K_CLASSES) == 150
    ade = PRESETS["denseclip-ade-512"]
    assert (ade.short_side, ade.crop, ade.stride, ade.antialias, ade.normalize) == (512, 512, 341, False, "model")
    vit = PRESETS["denseclip-ade-640"]
    assert (vit.short_side, vit.crop, vit.stride) == (640, 640, 426)


@pytest.mark.parametrize("layers,width,patch,embed,clip,size,score_level", [
    ([3, 4, 6, 3], 64, None, 1024, "RN50-quickgelu", 512, 3),
    ([3, 4, 23, 3], 64, None, 512, "RN101-quickgelu", 512, 3),
    (12, 768, 16, 512, "ViT-B-16-quickgelu", 640, 2)])
def test_the_released_architectures_are_recognised(layers, width, patch, embed, clip, size, score_level):
    """The released files' shapes (random_official_state's layout at full size, as meta tensors: nothing allocated)."""
    state, r = {}, _Shapes()
    with torch.device("meta"):
        if patch:
            official_vit(state, r, patch, width, layers, embed, size)
            channels = [width] * 4
        else:
            official_resnet(state, r, layers, width, embed, size)
            channels = [width * 4 * 2 ** i for i in range(4)]
        state["text_encoder.text_projection"] = torch.empty(512, embed)
        state["text_encoder.positional_embedding"] = torch.empty(13, 512)
        for i in range(12):
            state[f"text_encoder.transformer.resblocks.{i}.ln_1.weight"] = torch.empty(512)
        state["contexts"], state["gamma"] = torch.empty(1, 8, 512), torch.empty(embed)
        state["context_decoder.memory_proj.1.weight"] = torch.empty(256, embed)
        for i in range(3):
            state[f"context_decoder.decoder.{i}.norm1.weight"] = torch.empty(256)
        for i, c in enumerate(channels):
            state[f"neck.lateral_convs.{i}.conv.weight"] = torch.empty(256, c + (150 if i == score_level else 0), 1, 1)
        state["decode_head.conv_seg.weight"] = torch.empty(150, 256, 1, 1)
    arch = architecture(state)
    assert clip_name(arch) == clip and arch["train_size"] == size
    assert arch["method"] == {"context_tokens": 8, "name_length": 5, "decoder_width": 256, "decoder_heads": 4,
                              "decoder_layers": 3, "fpn_channels": 256, "score_level": score_level, "train_size": size,
                              "class_embedding_twice": bool(patch), "loss_average": "all", "text_tower_in_file": True}


def test_head_finds_names_without_their_spaces(converted):
    model = converted["dc-tiny-rn"][1]
    text = model.embed_text(["chestofdrawers", "chest of drawers", "Sky", "unicorn"])
    assert text.head_index.tolist() == [44, 44, 2, -1]
