"""TCL against kakaobrain/tcl: a state dict in the official layout (models/tcl/*.py names and shapes, random values)
goes through `ovdense.convert.tcl`, and the converted grounder must reproduce the official computations, written
here step by step from the official code (sclip/model.py, models/tcl/{encoders,masker,modules,decoders,gumbel,mi,
tcl}.py, segmentation/evaluation/tcl_seg.py): dense embeddings, masks with and without the kp mix, the six losses
under the same Gumbel noise, at the native and at non-native, non-square sizes."""
import copy
import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovdense.backbones import load_clip
from ovdense.convert.tcl import convert
from ovdense.errors import CheckpointError, UsageError
from ovdense.methods.base import read_trained
from ovdense.methods.tcl import TCL, TCLLossWeights
from ovdense.predictor import SegmentationPredictor
from ovdense.presets import Protocol
from ovdense.text import TEMPLATE_SETS

# A tiny OpenAI-style ViT (QuickGELU, as sclip's CLIP): 3 blocks, so the official ie_freeze is 2.
NAME = "tcl-official-tiny-vit"
CONFIG = {"embed_dim": 32, "quick_gelu": True,
          "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "patch_size": 16, "head_width": 32},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
WIDTH, DIM, HEADS, PATCH = 64, 32, 2, 16
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225]))
TEXTS = ["a red star on grass", "a blue circle", "the sky above a yellow square"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tcl_official_config")
    (folder / f"{NAME}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(folder)
    return load_clip(NAME, "random")


# ----------------------------------------------------------------------------------- official layout
BLOCK = "masker.image_encoder.backbone.transformer.resblocks.0."


def official_shapes() -> dict[str, tuple[int, ...]]:
    """Every key of the released tcl.pth's state dict with its shape (ViT-B/16: WIDTH 768, DIM 512)."""
    w = WIDTH
    shapes = {BLOCK + key: shape for key, shape in [
        ("ln_1.weight", (w,)), ("ln_1.bias", (w,)),
        ("attn.in_proj_weight", (3 * w, w)), ("attn.in_proj_bias", (3 * w,)),
        ("attn.out_proj.weight", (w, w)), ("attn.out_proj.bias", (w,)), ("ln_2.weight", (w,)), ("ln_2.bias", (w,)),
        ("mlp.c_fc.weight", (4 * w, w)), ("mlp.c_fc.bias", (4 * w,)), ("mlp.c_proj.weight", (w, 4 * w)),
        ("mlp.c_proj.bias", (w,))]}
    for i in range(2):  # GDecoder(n_layers=2): ResConv(double=True) -> conv, conv2, each a gated ConvBlock
        for conv in ("conv", "conv2"):
            prefix = f"masker.image_encoder.decoder.decoder.net.{i}.{conv}."
            shapes.update({prefix + "norm.weight": (w,), prefix + "norm.bias": (w,),
                           prefix + "conv.weight": (w, w, 3, 3), prefix + "conv.bias": (w,), prefix + "gate.gate": ()})
    shapes.update({"masker.image_encoder.decoder.image_proj.ln.weight": (w,),
                   "masker.image_encoder.decoder.image_proj.ln.bias": (w,),
                   "masker.image_encoder.decoder.image_proj.proj": (w, DIM),
                   "masker.sim2mask.w": (), "masker.sim2mask.b": (),
                   "tcli_loss.logit_scale": (), "tclf_loss.logit_scale": ()})
    return shapes


def official_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random values of plausible scale for every official key (gates far from 0, so the decoder matters)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in official_shapes().items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith(("norm.weight", "ln.weight", "ln_1.weight", "ln_2.weight")):
            value = 1 + 0.2 * noise
        elif key.endswith("gate.gate"):
            value = 0.3 + 0.3 * noise
        elif key == "masker.sim2mask.w":
            value = 8 + noise
        elif key == "masker.sim2mask.b":
            value = -1 + 0.3 * noise
        elif key.endswith("logit_scale"):
            value = math.log(1 / 0.07) + 0.3 * noise
        elif len(shape) >= 2:
            value = noise / math.sqrt(math.prod(shape[1:]))
        else:
            value = 0.1 * noise
        state[key] = value
    return state


@pytest.fixture(scope="module")
def official():
    return official_state()


@pytest.fixture(scope="module")
def converted(clip, official, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tcl_official")
    frozen = {"clip_text_encoder.positional_embedding": torch.randn(77, 64),  # what the authors left in or out
              "clip_image_encoder.clip_visual.conv1.weight": torch.randn(WIDTH, 3, PATCH, PATCH),
              "clip_image_encoder.clip_proj.proj": torch.randn(WIDTH, DIM),
              "pamr.aff_x.kernel": torch.randn(8, 1, 3, 3)}
    torch.save({"model": {**official, **frozen}, "step": 50000}, folder / "tcl.pth")
    return convert([folder / "tcl.pth"], folder / "tcl.safetensors", model=NAME, weights="random")


@pytest.fixture(scope="module")
def loaded(converted):
    return TCL.from_checkpoint(converted)


@pytest.fixture
def tcl(loaded):
    """The converted grounder, a copy of its own to change."""
    return copy.deepcopy(loaded)


# ------------------------------------------------------------------ the official computations
def layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"], eps=1e-5)


def residual_attention_block(x, state, prefix, attn_mask=None):
    """sclip ResidualAttentionBlock on (L, N, D); ignore_last_attn passes a mask that lets a token see itself only."""
    h = layer_norm(x, state, prefix + "ln_1.")
    attn = F.multi_head_attention_forward(
        h, h, h, WIDTH, HEADS, state[prefix + "attn.in_proj_weight"], state[prefix + "attn.in_proj_bias"], None, None,
        False, 0.0, state[prefix + "attn.out_proj.weight"], state[prefix + "attn.out_proj.bias"], training=False,
        need_weights=False, attn_mask=attn_mask)[0]
    x = x + attn
    h = layer_norm(x, state, prefix + "ln_2.")
    h = F.linear(h, state[prefix + "mlp.c_fc.weight"], state[prefix + "mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return x + F.linear(h, state[prefix + "mlp.c_proj.weight"], state[prefix + "mlp.c_proj.bias"])


def self_only_mask(length):
    mask = torch.empty(length, length).fill_(float("-inf"))
    return mask.fill_diagonal_(0)


def interpolate_pos_emb(pos_emb, height, width):
    """sclip/model.py: bicubic (align_corners=False) to the grid unless it is the native square."""
    n = pos_emb.shape[0] - 1
    if height * width == n and height == width:
        return pos_emb
    side = int(n ** 0.5)
    grid = pos_emb[1:].reshape(side, side, -1).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)[0]
    return torch.cat([pos_emb[:1], grid.permute(1, 2, 0).reshape(height * width, -1)])


def clip_visual(visual, image, ignore_last_attn):
    """sclip VisionTransformer.forward with CLIPImageFeatureEncoder's hooks: every block's output (L, B, width) and
    the grid (ln_post is Identity and proj None there: encoders.py moves them to clip_proj)."""
    x = F.conv2d(image, visual["conv1.weight"], stride=PATCH)
    h, w = x.shape[2:]
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual["class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1]), x], dim=1)
    x = layer_norm(x + interpolate_pos_emb(visual["positional_embedding"], h, w), visual, "ln_pre.")
    x = x.permute(1, 0, 2)
    layers = CONFIG["vision_cfg"]["layers"]
    outputs = []
    for i in range(layers):
        mask = self_only_mask(x.shape[0]) if ignore_last_attn and i == layers - 1 else None
        x = residual_attention_block(x, visual, f"transformer.resblocks.{i}.", mask)
        outputs.append(x)
    return outputs, (h, w)


def clip_proj(x, state, ln="ln.", proj="proj"):
    """LNProjLayer on (B, C, H, W) or (B, C): LayerNorm then @ proj."""
    if x.ndim == 2:
        return layer_norm(x, state, ln) @ state[proj]
    b, _, h, w = x.shape
    x = layer_norm(x.flatten(2).transpose(1, 2), state, ln) @ state[proj]
    return x.transpose(1, 2).reshape(b, -1, h, w)


def masker_image_encoder(state, image_feat, grid):
    """MaskerImageFeatureEncoder._encode: the copied block (MaskCLIP attention), no ln_post, GDecoder, image_proj."""
    x = residual_attention_block(image_feat, state, BLOCK, self_only_mask(image_feat.shape[0])).permute(1, 0, 2)
    x = x[:, 1:].transpose(1, 2).reshape(x.shape[0], WIDTH, *grid)
    for i in range(2):  # ResConv(upsample=True, double=True)
        x = F.interpolate(x, scale_factor=2)
        for conv in ("conv", "conv2"):
            p = f"masker.image_encoder.decoder.decoder.net.{i}.{conv}."
            y = F.layer_norm(x.permute(0, 2, 3, 1), (WIDTH,), state[p + "norm.weight"], state[p + "norm.bias"], 1e-5)
            y = F.conv2d(F.gelu(y.permute(0, 3, 1, 2)), state[p + "conv.weight"], state[p + "conv.bias"], padding=1)
            x = x + torch.tanh(state[p + "gate.gate"]) * y
    return clip_proj(x, state, "masker.image_encoder.decoder.image_proj.ln.",
                     "masker.image_encoder.decoder.image_proj.proj")


def normalize(x, dim):
    return F.normalize(x, dim=dim, eps=1e-6)  # us.normalize


def gumbel_sigmoid(logits, tau):
    logistic = torch.rand_like(logits)
    logistic = logistic.div_(1.0 - logistic).log_()
    y_soft = ((logits + logistic) / tau).sigmoid_()
    return y_soft.gt(0.5).type(y_soft.dtype) - y_soft.detach() + y_soft


def tv(x):
    return (x[:, :, :, :-1] - x[:, :, :, 1:]).abs().mean() + (x[:, :, :-1, :] - x[:, :, 1:, :]).abs().mean()


def info_nce(image_emb, text_emb, logit_scale):
    labels = torch.arange(len(image_emb))
    image_emb, text_emb = normalize(image_emb, -1), normalize(text_emb, -1)
    scale = torch.clamp(logit_scale.exp(), max=100)
    return 0.5 * (F.cross_entropy(image_emb @ text_emb.t() * scale, labels)
                  + F.cross_entropy(text_emb @ image_emb.t() * scale, labels))


def extended_info_nce(image_emb, text_emb, logit_scale):
    labels = torch.arange(len(image_emb))
    image_emb, text_emb = normalize(image_emb, -1), normalize(text_emb, -1)
    logits_per_img = torch.einsum("bnc,nc->bn", image_emb, text_emb)
    logits_per_text = torch.einsum("nbc,bc->bn", image_emb.chunk(1, dim=1)[0], text_emb)
    scale = torch.clamp(logit_scale.exp(), max=100)
    return 0.5 * (F.cross_entropy(logits_per_img * scale, labels) + F.cross_entropy(logits_per_text * scale, labels))


def official_losses(clip, state, image, text_emb):
    """TCL.forward (tcl.py) with Masker.forward: the six weighted losses (tcl_w 0.1, area_w 0.4, tv_w 1)."""
    visual = clip.visual.state_dict()
    with torch.no_grad():
        feats, grid = clip_visual(visual, image, ignore_last_attn=True)
    image_emb = masker_image_encoder(state, feats[-2], grid)
    simmap = torch.einsum("bchw,nc->bnhw", normalize(image_emb, 1), normalize(text_emb, -1))
    logits = simmap * state["masker.sim2mask.w"] + state["masker.sim2mask.b"]
    soft_mask, mask = torch.sigmoid(logits), gumbel_sigmoid(logits, tau=1.0)
    b, n, h, w = soft_mask.shape
    pos = torch.arange(b)
    offdiag = torch.ones(b, n, dtype=torch.bool)
    offdiag[pos, pos] = False
    soft_pos, soft_neg = soft_mask[pos, pos].unsqueeze(1), soft_mask.masked_select(offdiag[..., None, None])
    weight = soft_mask / (soft_mask.sum((2, 3), keepdim=True) + 1e-6)
    pooled = torch.einsum("bchw,bnhw->bnc", image_emb, weight)
    pos_mask = F.interpolate(mask[pos, pos].unsqueeze(1), size=image.shape[2:])
    masked, _ = clip_visual(visual, pos_mask * image, ignore_last_attn=False)
    masked_img_emb = clip_proj(masked[-1].permute(1, 0, 2)[:, 0], visual, "ln_post.", "proj")
    return {"area_loss": (soft_pos.mean() - 0.4).abs() * 0.4,
            "neg_area_loss": soft_neg.view(b, n - 1, h, w).mean().abs() * 0.4,
            "tclf_loss": extended_info_nce(pooled, text_emb, state["tclf_loss.logit_scale"]) * 0.1,
            "tv_img_loss": tv(image_emb), "tv_mask_loss": tv(soft_mask),
            "tcli_loss": info_nce(masked_img_emb, text_emb, state["tcli_loss.logit_scale"]) * 0.1}


def official_masks(clip, state, image, text_emb, kp_w):
    """TCL.generate_masks' model part (image a multiple of the patch size): the dense embeddings (B, D, H/4, W/4)
    (Masker.forward_seg) and the soft masks (B, N, H/4, W/4), mixed with kp_branch's when kp_w."""
    visual = clip.visual.state_dict()
    feats, grid = clip_visual(visual, image, ignore_last_attn=True)  # tcl_forward
    image_emb = masker_image_encoder(state, feats[-2], grid)
    simmap = torch.einsum("bchw,nc->bnhw", normalize(image_emb, 1), normalize(text_emb, -1))
    mask = torch.sigmoid(simmap * state["masker.sim2mask.w"] + state["masker.sim2mask.b"])
    if kp_w:
        clip_feat = feats[-1].permute(1, 0, 2)[:, 1:].transpose(1, 2).reshape(len(image), WIDTH, *grid)
        kp_emb = normalize(clip_proj(clip_feat, visual, "ln_post.", "proj"), 1)
        kp = torch.sigmoid((torch.einsum("bchw,nc->bnhw", kp_emb, normalize(text_emb, -1)) - 0.25) * 10.0)
        mask = kp_w * F.interpolate(kp, mask.shape[2:], mode="bilinear") + (1.0 - kp_w) * mask
    return image_emb, mask


def official_generate_masks(clip, state, image, text_emb, kp_w):
    """TCL.generate_masks without PAMR: zero padding to the patch size (compute_padsize), the masks, bilinear to the
    padded image, cut back: (B, N, H, W)."""
    height, width = image.shape[2:]
    lr, tb = -width % PATCH, -height % PATCH
    pad = (lr // 2, lr - lr // 2, tb // 2, tb - tb // 2)
    image = F.pad(image, pad)
    _, mask = official_masks(clip, state, image, text_emb, kp_w)
    mask = F.interpolate(mask, image.shape[2:], mode="bilinear")
    return mask[:, :, pad[2]:pad[2] + height, pad[0]:pad[0] + width]


def text_embeddings(clip, texts):
    return clip.model.encode_text(clip.tokenizer(texts))


# ---------------------------------------------------------------------------------------- tests
SIZES = [(64, 64), (48, 80), (80, 48)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_dense_embeddings_and_masks_match_the_official_masker(clip, official, tcl, size):
    torch.manual_seed(size[0])
    image = torch.randn(2, 3, *size)
    text = F.normalize(torch.randn(4, DIM), dim=-1)
    with torch.no_grad():
        image_emb, soft = official_masks(clip, official, image, text, kp_w=0)
        _, mixed = official_masks(clip, official, image, text, kp_w=0.3)
        tokens, grid = tcl.backbone.vit_tokens(image, depth=-1)
        torch.testing.assert_close(tcl.ground(tokens, grid), image_emb, atol=1e-4, rtol=1e-4)
        embedded = tcl.embed_crops(image)
        torch.testing.assert_close(embedded["dense"], normalize(image_emb, 1), atol=1e-4, rtol=1e-4)
        assert tcl.kp_weight == 0.3  # the released evaluation's kp_w, recorded by the converter
        torch.testing.assert_close(tcl.crop_logits(embedded, text), mixed, atol=1e-4, rtol=1e-4)
        tcl.kp_weight = 0.0
        torch.testing.assert_close(tcl.crop_logits(embedded, text), soft, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_six_losses_match_the_official_ones(clip, official, tcl, size):
    tcl.train()
    torch.manual_seed(size[1])
    images = torch.randn(3, 3, *size)
    with torch.no_grad():
        text_emb = text_embeddings(clip, TEXTS)
    torch.manual_seed(7)  # the same Gumbel noise on both sides: drawn for all (image, text) pairs, as officially
    expected = official_losses(clip, official, images, text_emb)
    torch.manual_seed(7)
    got = tcl.losses(images, TEXTS, TCLLossWeights())
    names = {"area_loss": "area_loss", "neg_area_loss": "neg_area_loss", "feature_tcl_loss": "tclf_loss",
             "tv_dense_loss": "tv_img_loss", "tv_mask_loss": "tv_mask_loss", "image_tcl_loss": "tcli_loss"}
    for ours, theirs in names.items():
        torch.testing.assert_close(got[ours], expected[theirs], atol=1e-4, rtol=1e-4, msg=f"{ours} vs {theirs}")
    assert expected["tcli_loss"] > 0 and expected["tv_img_loss"] > 0


@pytest.mark.parametrize("kp_weight", [0.0, 0.3])
@pytest.mark.parametrize("size", [(64, 64), (70, 90)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_the_predictor_gives_the_official_masks_and_labels(clip, official, tcl, kp_weight, size):
    """tcl_seg.py with one window: ImageNet normalisation, the 'custom' templates averaged raw, padding to the patch
    size, masks upsampled to the padded image and cut back, background = a constant 0.4 channel."""
    tcl.kp_weight = kp_weight
    rng = np.random.default_rng(size[1])
    scene = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    classes = ["red star", "blue circle", "grass"]
    templates = TEMPLATE_SETS["tcl"]
    protocol = Protocol("tcl-one-window", short_side=None, normalize="imagenet", crop=None, pad="centre",
                        templates="tcl", virtual_background=True, background_threshold=0.4)
    result = SegmentationPredictor(tcl, protocol)(scene, ", ".join(classes))
    with torch.no_grad():
        pixels = torch.from_numpy(scene).permute(2, 0, 1).float()[None] / 255
        image = (pixels - IMAGENET[0][:, None, None]) / IMAGENET[1][:, None, None]
        tokens = text_embeddings(clip, [t.format(c) for c in classes for t in templates])
        text = normalize(tokens.reshape(len(classes), len(templates), -1).mean(dim=1), -1)  # build_text_embedding
        masks = official_generate_masks(clip, official, image, text, kp_w=kp_weight)
    rows = [result.class_names.index(c) for c in classes]
    torch.testing.assert_close(result.scores[rows], masks[0], atol=1e-4, rtol=1e-4)
    with_bg = torch.cat([torch.full((1, *size), 0.4), masks[0]])
    names = np.array(["background"] + classes)[with_bg.argmax(0).numpy()]
    assert (np.array(result.class_names)[result.labels] == names).mean() > 0.999


def test_a_misplaced_weight_breaks_parity(clip, official, tmp_path):
    """Swapping two same-shaped official tensors (conv and conv2 of the first decoder block) changes the result."""
    swapped = dict(official)
    first, second = (f"masker.image_encoder.decoder.decoder.net.0.{c}.conv.weight" for c in ("conv", "conv2"))
    swapped[first], swapped[second] = official[second], official[first]
    torch.save({"model": swapped}, tmp_path / "tcl.pth")
    tcl = TCL.from_checkpoint(convert([tmp_path / "tcl.pth"], tmp_path / "tcl.safetensors", model=NAME,
                                      weights="random"))
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        image_emb, _ = official_masks(clip, official, image, torch.randn(2, DIM), kp_w=0)
        assert not torch.allclose(tcl.ground(*tcl.backbone.vit_tokens(image, depth=-1)), image_emb, atol=1e-2)


def test_the_converted_file_records_the_clip_preset_and_settings(converted):
    metadata, state = read_trained(converted)
    assert (metadata["method"], metadata["model"], metadata["weights"], metadata["preset"]) == (
        "tcl", NAME, "random", "tcl")
    assert metadata["config"] == {"decoder_layers": 2, "kernel_size": 3, "init_w": 10.0, "init_b": -2.5,
                                  "gumbel_tau": 1.0, "kp_weight": 0.3, "kp_offset": 0.25, "kp_scale": 10.0}
    assert not any(key.startswith("backbone.") for key in state)  # the frozen CLIP stays out


def _convert(tmp_path, state):
    torch.save({"model": state}, tmp_path / "tcl.pth")
    return convert([tmp_path / "tcl.pth"], tmp_path / "tcl.safetensors", model=NAME, weights="random")


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"masker.image_encoder.decoder.decoder.net.0.conv.scale": torch.zeros(())}),
     "masker.image_encoder.decoder.decoder.net.0.conv.scale"),
    (lambda s: s.update({"masker.image_encoder.backbone.transformer.resblocks.1.ln_1.weight": torch.ones(WIDTH)}),
     "resblocks.1.ln_1.weight"),
    (lambda s: s.pop("masker.image_encoder.decoder.decoder.net.1.conv2.gate.gate"),
     "masker.image_encoder.decoder.decoder.net.1.conv2.gate.gate"),
    (lambda s: s.pop(BLOCK + "attn.in_proj_bias"), BLOCK + "attn.in_proj_bias"),
    (lambda s: s.pop("masker.sim2mask.b"), "masker.sim2mask.b"),
    (lambda s: s.update({"masker.image_encoder.decoder.image_proj.proj": torch.zeros(WIDTH, DIM + 1)}),
     "masker.image_encoder.decoder.image_proj.proj"),
], ids=["unknown", "second-block", "missing-gate", "missing-block-bias", "missing-b", "shape"])
def test_a_key_that_does_not_fit_is_named(official, tmp_path, change, message):
    state = dict(official)
    change(state)
    with pytest.raises(CheckpointError, match=message.replace(".", r"\.")):
        _convert(tmp_path, state)


def test_the_training_only_temperatures_may_be_absent(official, tmp_path):
    """The official loader lets `*_loss.*` keys be missing; they keep their initial ln(1 / 0.07)."""
    state = {k: v for k, v in official.items() if not k.endswith("_loss.logit_scale")}
    tcl = TCL.from_checkpoint(_convert(tmp_path, state))
    assert tcl.image_logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert tcl.feature_logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_bad_files_and_arguments(tmp_path):
    with pytest.raises(UsageError, match="one file"):
        convert([tmp_path / "a.pth", tmp_path / "b.pth"], tmp_path / "out.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert([tmp_path / "tcl.pth"], tmp_path / "out.safetensors")
    (tmp_path / "tcl.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        convert([tmp_path / "tcl.pth"], tmp_path / "out.safetensors")
