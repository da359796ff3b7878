"""GLIP as released, against the authors' code re-computed step by step in this file (microsoft/GLIP at 9dda955):
Swin (`backbone/swint.py`), the FPN (`backbone/fpn.py`), the language backbone (`language_backbone/bert_model.py`,
`detector/generalized_vl_rcnn.py`: padding to 256, the mask), the query and its positive map
(`engine/inference.py`: `create_queries_and_maps`, `create_positive_dict`; `engine/predictor_glip.py`:
`create_positive_map`), the dot-product head (`rpn/vldyhead.py`), anchors (`rpn/anchor_generator.py`) and the
post-processing (`rpn/inference.py` `ATSSPostProcessor`, `structures/bounding_box.py` `clip_to_image` / `resize`,
`boxlist_ops.py` `remove_small_boxes`, `csrc/cuda/ml_nms.cu`: areas and overlaps with +1).

The head's fusion layer, BERT layer and DyConv are ovdense's modules (already compared with the official ones:
fuse_helper's BiAttentionBlock, modeling_bert's layer, vldyhead's DyConv with the CUDA deformable kernel), filled here
from the official keys by a mapping written in this file. The tiny official-layout checkpoints come from
tests/test_glip_convert.py.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import nms

transformers = pytest.importorskip("transformers")

from test_glip_convert import (TINY_SWIN, official_state_dict, save_official, tiny_bert_folder,  # noqa: E402,F401
                               tiny_layout)
from ovdense.convert.glip import convert, official_model, official_state  # noqa: E402
from ovdense.detection.grounding import class_prompt, positive_map  # noqa: E402
from ovdense.detection.images import prepare_image  # noqa: E402
from ovdense.detection.predictor import GroundingPredictor  # noqa: E402
from ovdense.errors import InputError  # noqa: E402
from ovdense.methods.glip import DyConv, FusionLayer, GLIPDetector, SwinPyramid, TextLayer  # noqa: E402
from ovdense.presets import get_detection_protocol  # noqa: E402
from ovdense.text.tokens import BertTokenText  # noqa: E402

PIXEL_MEAN = torch.tensor([103.530, 116.280, 123.675])  # INPUT.PIXEL_MEAN / PIXEL_STD of the GLIP configs (BGR)
PIXEL_STD = torch.tensor([57.375, 57.120, 58.395])
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MAX_QUERY_LEN = 256
NAMES = ["person", "traffic light", "hourglass", "bow_(weapon)", "zebra", "red star"]


def _plain(official: dict) -> dict:
    return {k[len("module."):]: v for k, v in official.items()}


def _bgr255(rgb: torch.Tensor) -> torch.Tensor:
    """GLIP's input: (B, 3, H, W) RGB in [0, 1] -> BGR x 255 normalised by PIXEL_MEAN / PIXEL_STD."""
    return (rgb[:, [2, 1, 0]] * 255 - PIXEL_MEAN[:, None, None]) / PIXEL_STD[:, None, None]


# ------------------------------------------------------------------------------------------ swint.py, step by step
def _window_partition(x, window):
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window, window, c)


def _window_reverse(windows, window, h, w):
    b = int(windows.shape[0] / (h * w / window / window))
    x = windows.view(b, h // window, w // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def _window_attention(w, p, x, window, heads, mask):
    b_, n, c = x.shape
    qkv = F.linear(x, w[p + "qkv.weight"], w[p + "qkv.bias"])
    qkv = qkv.reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * (c // heads) ** -0.5
    attn = q @ k.transpose(-2, -1)
    coords = torch.stack(torch.meshgrid([torch.arange(window), torch.arange(window)], indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += window - 1
    relative[:, :, 1] += window - 1
    relative[:, :, 0] *= 2 * window - 1
    index = relative.sum(-1)
    bias = w[p + "relative_position_bias_table"][index.view(-1)].view(window * window, window * window, -1)
    attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(b_ // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
    return F.linear(x, w[p + "proj.weight"], w[p + "proj.bias"])


def _swin_block(w, p, x, h, wd, window, shift, heads, mask_matrix):
    b, length, c = x.shape
    shortcut = x
    x = F.layer_norm(x, (c,), w[p + "norm1.weight"], w[p + "norm1.bias"]).view(b, h, wd, c)
    pad_r = (window - wd % window) % window
    pad_b = (window - h % window) % window
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, hp, wp, _ = x.shape
    if shift > 0:
        shifted, mask = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2)), mask_matrix
    else:
        shifted, mask = x, None
    windows = _window_partition(shifted, window).view(-1, window * window, c)
    windows = _window_attention(w, p + "attn.", windows, window, heads, mask).view(-1, window, window, c)
    shifted = _window_reverse(windows, window, hp, wp)
    x = torch.roll(shifted, shifts=(shift, shift), dims=(1, 2)) if shift > 0 else shifted
    if pad_r > 0 or pad_b > 0:
        x = x[:, :h, :wd, :].contiguous()
    x = shortcut + x.view(b, h * wd, c)  # drop path: identity at test
    y = F.layer_norm(x, (c,), w[p + "norm2.weight"], w[p + "norm2.bias"])
    y = F.linear(F.gelu(F.linear(y, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])), w[p + "mlp.fc2.weight"],
                 w[p + "mlp.fc2.bias"])
    return x + y


def _patch_merging(w, p, x, h, wd):
    b, length, c = x.shape
    x = x.view(b, h, wd, c)
    if (h % 2 == 1) or (wd % 2 == 1):
        x = F.pad(x, (0, 0, 0, wd % 2, 0, h % 2))
    x0, x1, x2, x3 = x[:, 0::2, 0::2, :], x[:, 1::2, 0::2, :], x[:, 0::2, 1::2, :], x[:, 1::2, 1::2, :]
    x = torch.cat([x0, x1, x2, x3], -1).view(b, -1, 4 * c)
    x = F.layer_norm(x, (4 * c,), w[p + "norm.weight"], w[p + "norm.bias"])
    return F.linear(x, w[p + "reduction.weight"])


def _basic_layer(w, p, x, h, wd, depth, heads, window, downsample):
    shift = window // 2
    hp, wp = int(np.ceil(h / window)) * window, int(np.ceil(wd / window)) * window
    img_mask = torch.zeros((1, hp, wp, 1))
    slices = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    cnt = 0
    for hs in slices:
        for ws in slices:
            img_mask[:, hs, ws, :] = cnt
            cnt += 1
    mask_windows = _window_partition(img_mask, window).view(-1, window * window)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
    for i in range(depth):
        x = _swin_block(w, f"{p}blocks.{i}.", x, h, wd, window, 0 if i % 2 == 0 else shift, heads, attn_mask)
    if downsample:
        return x, h, wd, _patch_merging(w, p + "downsample.", x, h, wd), (h + 1) // 2, (wd + 1) // 2
    return x, h, wd, x, h, wd


def official_swin(w: dict, images: torch.Tensor, swin: dict) -> list[torch.Tensor]:
    """swint.py's SwinTransformer.forward (SWINT-FPN-RETINANET: norm0 is an Identity) on GLIP's input ->
    [(B, C_i, H_i, W_i)] for stages 2-5."""
    p = "backbone.body."
    _, _, h, wd = images.shape
    x = images
    if wd % 4 != 0:
        x = F.pad(x, (0, 4 - wd % 4))
    if h % 4 != 0:
        x = F.pad(x, (0, 0, 0, 4 - h % 4))
    x = F.conv2d(x, w[p + "patch_embed.proj.weight"], w[p + "patch_embed.proj.bias"], stride=4)
    wh, ww = x.size(2), x.size(3)
    x = x.flatten(2).transpose(1, 2)
    x = F.layer_norm(x, (x.shape[-1],), w[p + "patch_embed.norm.weight"], w[p + "patch_embed.norm.bias"])
    outs = []
    for i, (depth, heads) in enumerate(zip(swin["depths"], swin["heads"])):
        x_out, h, wd, x, wh, ww = _basic_layer(w, f"{p}layers.{i}.", x, wh, ww, depth, heads, swin["window"], i < 3)
        c = x_out.shape[-1]
        if i > 0:
            x_out = F.layer_norm(x_out, (c,), w[f"{p}norm{i}.weight"], w[f"{p}norm{i}.bias"])
        outs.append(x_out.view(-1, h, wd, c).permute(0, 3, 1, 2).contiguous())
    return outs


def official_fpn(w: dict, stages: list[torch.Tensor]) -> list[torch.Tensor]:
    """fpn.py's FPN over stages 3-5 (in_channels [0, C3, C4, C5]: stage 2 unused) + LastLevelP6P7 on P5."""
    def conv(x, name, **kwargs):
        return F.conv2d(x, w[f"backbone.fpn.{name}.weight"], w[f"backbone.fpn.{name}.bias"], **kwargs)

    last_inner = conv(stages[-1], "fpn_inner4")
    results = [conv(last_inner, "fpn_layer4", padding=1)]
    for feature, n in zip(stages[:-1][::-1], (3, 2)):
        lateral = conv(feature, f"fpn_inner{n}")
        last_inner = lateral + F.interpolate(last_inner, size=lateral.shape[-2:], mode="nearest")
        results.insert(0, conv(last_inner, f"fpn_layer{n}", padding=1))
    p6 = conv(results[-1], "top_blocks.p6", stride=2, padding=1)
    return results + [p6, conv(F.relu(p6), "top_blocks.p7", stride=2, padding=1)]


@pytest.mark.parametrize("window", [7, 12])  # GLIP-T's and GLIP-L's windows
def test_swin_equals_the_official_forward_on_sizes_that_need_padding(window):
    """200 x 152: patches 50 x 38, then 25 x 19, 13 x 10 (an odd merge), 7 x 5; no map is a whole number of windows,
    the last is smaller than one (GLIP still shifts there; timm would not)."""
    swin = {**TINY_SWIN, "window": window}
    official = official_state_dict(seed=1, **tiny_layout(swin=swin))
    state, settings = official_state(official)
    model = SwinPyramid("swin-t", arch=settings["swin"]).eval()
    model.load_state_dict({k[len("image."):]: v for k, v in state.items() if k.startswith("image.")})
    rgb = torch.rand(2, 3, 200, 152, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model((rgb - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])
        theirs = official_swin(_plain(official), _bgr255(rgb), swin)[1:]
    assert [tuple(m.shape[-2:]) for m in ours] == [(25, 19), (13, 10), (7, 5)]
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-4


def test_swin_drop_path_is_off_at_test_and_on_in_training():
    model = SwinPyramid("swin-t", arch={"embed_dim": 8, "depths": [2, 2, 2, 2], "heads": [1, 2, 2, 4]})
    images = torch.randn(2, 3, 64, 64)
    model.eval()
    assert all(torch.equal(a, b) for a, b in zip(model(images), model(images)))
    model.train()
    torch.manual_seed(0)
    assert not all(torch.equal(a, b) for a, b in zip(model(images), model(images)))  # stochastic depth up to 0.2


# -------------------------------------------------------------------------------- the language backbone and query
def official_language(w: dict, folder, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """generalized_vl_rcnn's tokenization (padding to MAX_QUERY_LEN, truncation) and bert_model.BertEncoder
    (N_LAYERS 1) -> (input ids, 'hidden', 'embedded', 'masks') of (B, 256[, D])."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    bert = transformers.BertModel(transformers.BertConfig.from_pretrained(str(folder)), add_pooling_layer=False)
    prefix = "language_backbone.body.model."
    missing, unexpected = bert.load_state_dict({k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)},
                                               strict=False)
    assert not missing and set(unexpected) <= {"embeddings.position_ids"}
    bert.eval()
    tokenized = tokenizer(captions, max_length=MAX_QUERY_LEN, padding="max_length",  # batch_encode_plus, gone in v5
                          return_special_tokens_mask=True, return_tensors="pt", truncation=True)
    mask = tokenized.attention_mask
    with torch.no_grad():
        outputs = bert(input_ids=tokenized.input_ids, attention_mask=mask, output_hidden_states=True)
    encoded = outputs.hidden_states[1:]
    features = torch.stack(encoded[-1:], 1).mean(1) / 1
    return tokenized.input_ids, encoded[-1], features * mask.unsqueeze(-1).float(), mask


def test_bert_features_are_glips_language_backbone(tiny_bert_folder):
    official = official_state_dict(seed=2, **tiny_layout())
    model = official_model(official, str(tiny_bert_folder))
    long = "a red star on the bar, " * 40  # 282 tokens: GLIP truncates to 256
    captions = ["person. traffic light. hourglass. bow . zebra", "a red star left of a small blue circle.", long]
    ids, hidden, embedded, mask = official_language(_plain(official), tiny_bert_folder, captions)
    with pytest.raises(InputError, match="tokens long"):
        model.tokenize(captions)
    text = model.tokenize(captions, truncate=True)
    with torch.no_grad():
        ours = model.text(text)
    for b in range(len(captions)):
        real = int(mask[b].sum())
        assert torch.equal(text.ids[b, :real], ids[b, :real]) and int(text.mask[b].sum()) == real
        assert (ours[b, :real] - hidden[b, :real]).abs().max() < 1e-5
        assert torch.equal(embedded[b, :real], hidden[b, :real])  # N_LAYERS 1: 'embedded' is 'hidden', masked
    assert int(mask[2].sum()) == MAX_QUERY_LEN and text.ids[2, -1] == ids[2, -1]  # [SEP] kept at the end


def official_positive_map(tokenized, tokens_positive: list[list[tuple[int, int]]]) -> torch.Tensor:
    """predictor_glip / modulated_coco `create_positive_map` (the same char_to_token fallbacks as
    `create_positive_dict`), made boolean: (P, 256)."""
    positive_map = torch.zeros((len(tokens_positive), MAX_QUERY_LEN), dtype=torch.float)
    for j, tok_list in enumerate(tokens_positive):
        for (beg, end) in tok_list:
            beg_pos = tokenized.char_to_token(beg)
            end_pos = tokenized.char_to_token(end - 1)
            if beg_pos is None:
                try:
                    beg_pos = tokenized.char_to_token(beg + 1)
                    if beg_pos is None:
                        beg_pos = tokenized.char_to_token(beg + 2)
                except Exception:  # noqa: BLE001 - the official `except:`
                    beg_pos = None
            if end_pos is None:
                try:
                    end_pos = tokenized.char_to_token(end - 2)
                    if end_pos is None:
                        end_pos = tokenized.char_to_token(end - 3)
                except Exception:  # noqa: BLE001
                    end_pos = None
            if beg_pos is None or end_pos is None:
                continue
            positive_map[j, beg_pos: end_pos + 1].fill_(1)
    return positive_map > 0


def official_query(names: list[str]) -> tuple[str, list[list[tuple[int, int]]]]:
    """engine/inference.py `create_queries_and_maps`: clean_name, SEPARATION_TOKENS '. ' between names."""
    import re
    clean = [re.sub(r"  ", " ", re.sub(r"_", " ", re.sub(r"\(.*\)", "", name))) for name in names]
    query, tokens_positive = "", []
    for i, label in enumerate(clean):
        start = len(query)
        query += label
        tokens_positive.append([(start, len(query))])
        if i != len(clean) - 1:
            query += ". "
    return query, tokens_positive


SPAN_CASES = [  # (caption, per phrase its character spans)
    official_query(NAMES),  # multi-token words (hour ##glass), '.', a span ending on a space ('bow '), [UNK]
    ("a red star   on a bar", [[(2, 13)], [(18, 21)]]),  # three trailing spaces: GLIP finds no end token
    ("a red star on a bar", [[(1, 10)], [(14, 21)], [(3, 4)]]),  # a leading space; past the end; mid-word
    ("heart , (red) star.", [[(0, 5), (14, 19)], [(6, 13)], [(8, 11)]]),  # two pieces; punctuation inside
    ("a small dogs", [[(8, 12)], [(11, 12)]]),  # dog ##s: a span on the last piece only
]


@pytest.mark.parametrize("caption, spans", SPAN_CASES)
def test_positive_maps_equal_glips_char_to_token_rule(caption, spans, tiny_bert_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_bert_folder))
    expected = official_positive_map(tokenizer(caption), spans)
    text = BertTokenText(str(tiny_bert_folder), pretrained=False).tokenize([caption])
    ours = positive_map(text.offsets[0], spans, text.ids.shape[1])
    assert torch.equal(ours, expected[:, :text.ids.shape[1]]) and not expected[:, text.ids.shape[1]:].any()


def test_class_prompts_are_glips_queries():
    caption, tokens_positive = official_query(NAMES)
    prompt = class_prompt(NAMES)
    assert prompt.caption == caption == "person. traffic light. hourglass. bow . zebra. red star"
    assert prompt.spans == [[tuple(s) for s in spans] for spans in tokens_positive]


# ----------------------------------------------------------------------------------------- post-processing
def official_ml_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> list[int]:
    """ml_nms.cu: boxes by descending score; a box suppresses the later ones of its label whose IoU (devIoU: areas and
    overlaps counted +1 pixel) is above `threshold`; the kept indices in index order."""
    order = torch.argsort(scores, descending=True)
    b = boxes[order]
    low, high = torch.maximum(b[:, None, :2], b[None, :, :2]), torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (high - low + 1).clamp(min=0).prod(dim=-1)
    area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    iou = torch.where(labels[order][:, None] == labels[order][None, :], iou, torch.zeros_like(iou))
    removed = torch.zeros(len(b), dtype=torch.bool)
    keep = []
    for i in range(len(b)):
        if not removed[i]:
            keep.append(int(order[i]))
            removed[i + 1:] |= iou[i, i + 1:] > threshold
    return sorted(keep)


def _to_original(boxes: torch.Tensor, resized: tuple[int, int], original: tuple[int, int]) -> torch.Tensor:
    """BoxList.resize((W, H)) of pixel-index boxes, then ovdense's continuous box (+1) kept inside the image."""
    (h, w), (height, width) = resized, original
    ratio = torch.tensor([width / w, height / h] * 2)
    limit = torch.tensor([width, height] * 2, dtype=torch.float32)
    return torch.minimum(boxes * ratio + torch.tensor([0.0, 0.0, 1.0, 1.0]), limit)


def test_nms_counts_the_plus_one_pixel(tiny_bert_folder, monkeypatch):
    """Pixel-index boxes [10, 10, 19, 19] and [10, 10, 19, 15.3] overlap by 63 / 100 with GLIP's +1 areas (> 0.6:
    suppressed) but 47.7 / 81 = 0.59 without (kept); the same box of another phrase stays."""
    model = official_model(official_state_dict(**tiny_layout()), str(tiny_bert_folder))
    boxes = torch.tensor([[10.0, 10.0, 19.0, 19.0], [10.0, 10.0, 19.0, 15.3], [10.0, 10.0, 19.0, 15.3],
                          [-5.0, 40.0, 30.0, 120.0]])
    scores, labels = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 0, 1, 0])
    assert nms(boxes[:2], scores[:2], 0.6).tolist() == [0, 1]  # without the +1 pixel both would stay
    monkeypatch.setattr(model, "predict", lambda *a, **k: [{"boxes": boxes, "scores": scores, "labels": labels}])
    predictor = GroundingPredictor(model, get_detection_protocol("glip").updated(short=64, max_size=64))
    predictor.set_image(np.zeros((128, 128, 3), dtype=np.uint8))  # resized to 64 x 64: ratio 2
    result = predictor.detect(["red star", "bar"])
    clipped = boxes.clamp(min=0, max=63)  # clip_to_image: [0, w - 1]
    keep = official_ml_nms(clipped, scores, labels, 0.6)
    assert keep == [0, 2, 3]
    expected = _to_original(clipped[keep], (64, 64), (128, 128))
    assert torch.allclose(result.boxes, expected) and result.labels.tolist() == labels[keep].tolist()
    assert result.boxes[0].tolist() == [20.0, 20.0, 39.0, 39.0]  # 10 * 2 and 19 * 2 + 1


def official_anchors(shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
    """anchor_generator.py: generate_anchors(stride, (8 * stride,), (1.0,)) shifted over the grid, row-major."""
    out = []
    for (h, w), stride in zip(shapes, (8, 16, 32, 64, 128)):
        size, scale = 8 * stride, 8.0
        base = np.array([1, 1, stride, stride], dtype=np.float64) - 1
        width, x_ctr = base[2] - base[0] + 1, base[0] + 0.5 * (base[2] - base[0])
        ws = np.round(np.sqrt(width * width / 1.0))  # _ratio_enum with ratio 1
        ws = ws * scale  # _scale_enum
        assert ws == size
        cell = torch.tensor([x_ctr - 0.5 * (ws - 1), x_ctr - 0.5 * (ws - 1), x_ctr + 0.5 * (ws - 1),
                             x_ctr + 0.5 * (ws - 1)], dtype=torch.float32)
        shift_y, shift_x = torch.meshgrid(torch.arange(0, h * stride, stride, dtype=torch.float32),
                                          torch.arange(0, w * stride, stride, dtype=torch.float32), indexing="ij")
        shifts = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1), shift_x.reshape(-1), shift_y.reshape(-1)), 1)
        out.append((shifts.view(-1, 1, 4) + cell.view(1, -1, 4)).reshape(-1, 4))
    return out


def official_decode(preds: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """vldyhead.BoxCoder.decode."""
    widths, heights = anchors[:, 2] - anchors[:, 0] + 1, anchors[:, 3] - anchors[:, 1] + 1
    ctr_x, ctr_y = (anchors[:, 2] + anchors[:, 0]) / 2, (anchors[:, 3] + anchors[:, 1]) / 2
    dx, dy = preds[:, 0::4] / 10.0, preds[:, 1::4] / 10.0
    dw = torch.clamp(preds[:, 2::4] / 5.0, max=math.log(1000.0 / 16))
    dh = torch.clamp(preds[:, 3::4] / 5.0, max=math.log(1000.0 / 16))
    pred_ctr_x, pred_ctr_y = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    pred_w, pred_h = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    out = torch.zeros_like(preds)
    out[:, 0::4], out[:, 1::4] = pred_ctr_x - 0.5 * (pred_w - 1), pred_ctr_y - 0.5 * (pred_h - 1)
    out[:, 2::4], out[:, 3::4] = pred_ctr_x + 0.5 * (pred_w - 1), pred_ctr_y + 0.5 * (pred_h - 1)
    return out


def official_postprocess(logits, regression, centerness, anchors, label_to_token, image_size, top_n,
                         pre_nms_thresh=0.05, pre_nms_top_n=1000, nms_thresh=0.6):
    """ATSSPostProcessor (one image): per level [(A_l, 256)], [(A_l, 4)], [(A_l,)], [(A_l, 4)] -> (boxes, scores,
    labels from 1) after clip_to_image, remove_small_boxes(0), ml_nms and the top `top_n` (kthvalue: ties kept)."""
    height, width = image_size
    all_boxes, all_scores, all_labels = [], [], []
    for token_logits, reg, ctr, anchor in zip(logits, regression, centerness, anchors):
        probs = token_logits.sigmoid()[None]
        scores = torch.zeros(1, probs.shape[1], len(label_to_token))
        for label_j in label_to_token:  # convert_grounding_to_od_logits, MEAN
            scores[:, :, label_j - 1] = probs[:, :, torch.LongTensor(label_to_token[label_j])].mean(-1)
        candidate_inds = scores > pre_nms_thresh
        top_n_here = int(candidate_inds.reshape(1, -1).sum(1).clamp(max=pre_nms_top_n))
        box_cls = (scores * ctr.sigmoid()[None, :, None])[0]
        per_box_cls, top_k = box_cls[candidate_inds[0]].topk(top_n_here, sorted=False)
        nonzeros = candidate_inds[0].nonzero()[top_k, :]
        detections = official_decode(reg[nonzeros[:, 0]].view(-1, 4), anchor[nonzeros[:, 0]].view(-1, 4))
        x1s, y1s = detections[:, 0].clamp(min=0, max=width - 1), detections[:, 1].clamp(min=0, max=height - 1)
        x2s, y2s = detections[:, 2].clamp(min=0, max=width - 1), detections[:, 3].clamp(min=0, max=height - 1)
        detections = torch.stack((x1s, y1s, x2s, y2s), dim=-1)
        ws, hs = detections[:, 2] - detections[:, 0] + 1, detections[:, 3] - detections[:, 1] + 1
        keep = ((ws >= 0) & (hs >= 0)).nonzero().squeeze(1)
        all_boxes.append(detections[keep])
        all_scores.append(torch.sqrt(per_box_cls)[keep])
        all_labels.append(nonzeros[:, 1][keep] + 1)
    boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
    keep = official_ml_nms(boxes, scores, labels, nms_thresh)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    if len(scores) > top_n > 0:
        threshold, _ = torch.kthvalue(scores.float(), len(scores) - top_n + 1)
        keep = torch.nonzero(scores >= threshold.item()).squeeze(1)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    return boxes, scores, labels


# ---------------------------------------------------------------------------------------------- the whole model
def _load(module: torch.nn.Module, w: dict, names: dict[str, str]) -> torch.nn.Module:
    """Fill an ovdense module from official keys: names maps its parameter prefixes to official prefixes."""
    state = {}
    for ours in module.state_dict():
        prefix = next(p for p in names if ours.startswith(p))
        state[ours] = w[names[prefix] + ours[len(prefix):]]
    module.load_state_dict(state)
    return module.eval()


def official_head_modules(w: dict, layout: dict, text_heads: int):
    """The tower's VLFuse / BertEncoderLayer / DyConv as ovdense modules filled from the official keys."""
    channels, width, fusion = layout["channels"], layout["bert"]["hidden"], layout["fusion"]
    tower = "rpn.head.dyhead_tower."
    layers = []
    for i in range(layout["layers"]):
        conv = _load(DyConv(channels, 16, True), w, {
            f"convs.{k}.norm.": f"{tower}{3 * i + 2 if fusion else i}.DyConv.{k}.bn." for k in range(3)} | {
            f"convs.{k}.": f"{tower}{3 * i + 2 if fusion else i}.DyConv.{k}.conv." for k in range(3)} | {
            "scale_attention.": f"{tower}{3 * i + 2 if fusion else i}.AttnConv.1.",
            "relu.fc.": f"{tower}{3 * i + 2 if fusion else i}.relu.fc.",
            "offset.": f"{tower}{3 * i + 2 if fusion else i}.offset."})
        if not fusion:
            layers.append((None, None, conv))
            continue
        fuse = _load(FusionLayer(channels, width, layout["fusion_dim"], 8, 1 / layout["layers"]), w, {
            "norm_v.": f"{tower}{3 * i}.b_attn.layer_norm_v.", "norm_l.": f"{tower}{3 * i}.b_attn.layer_norm_l.",
            "gamma_v": f"{tower}{3 * i}.b_attn.gamma_v", "gamma_l": f"{tower}{3 * i}.b_attn.gamma_l",
            "attn.": f"{tower}{3 * i}.b_attn.attn."})
        bert = f"{tower}{3 * i + 1}."
        text = _load(TextLayer(width, text_heads), w, {
            "query.": bert + "attention.self.query.", "key.": bert + "attention.self.key.",
            "value.": bert + "attention.self.value.", "attention_out.": bert + "attention.output.dense.",
            "attention_norm.": bert + "attention.output.LayerNorm.", "intermediate.": bert + "intermediate.dense.",
            "output_norm.": bert + "output.LayerNorm.", "output.": bert + "output.dense."})
        layers.append((fuse, text, conv))
    return layers


def official_glip(official: dict, folder, rgb: torch.Tensor, names: list[str], layout: dict, original, top_n):
    """GLIP's inference on one resized (3, h, w) RGB [0, 1] image and a class list -> (boxes in the original image
    (ovdense's continuous convention), scores, labels from 0), best first."""
    w = _plain(official)
    h, wd = rgb.shape[-2:]
    image = torch.zeros(1, 3, -(-h // 32) * 32, -(-wd // 32) * 32)  # to_image_list: SIZE_DIVISIBILITY 32
    image[:, :, :h, :wd] = _bgr255(rgb[None])
    with torch.no_grad():
        levels = official_fpn(w, official_swin(w, image, layout["swin"])[1:])
        query, tokens_positive = official_query(names)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        positive = official_positive_map(tokenizer(query), tokens_positive)
        label_to_token = {j + 1: positive[j].nonzero()[:, 0].tolist() for j in range(len(names))}
        _, hidden, embedded, mask = official_language(w, folder, [query])
        for fuse, text, conv in official_head_modules(w, layout, layout["bert"]["heads"]):
            if fuse is not None:
                levels, hidden = fuse(levels, hidden, mask.bool())
                hidden = text(hidden, mask.bool())
            levels = conv(levels)
        embedding = F.normalize(hidden if layout["fusion"] else embedded, p=2, dim=-1)
        proj = F.linear(embedding / 2.0, w["rpn.head.dot_product_projection_text.weight"],
                        w["rpn.head.dot_product_projection_text.bias"])
        bias = embedding @ w["rpn.head.bias_lang"] + w["rpn.head.bias0"]
        logits, regression, centerness = [], [], []
        for level, x in enumerate(levels):
            queries = x.flatten(2).transpose(1, 2)
            logits.append(torch.clamp(queries @ proj.transpose(-1, -2) / w["rpn.head.log_scale"].exp()
                                      + bias[:, None], min=-50000, max=50000)[0])
            reg = F.conv2d(x, w["rpn.head.bbox_pred.weight"], w["rpn.head.bbox_pred.bias"]) \
                * w[f"rpn.head.scales.{level}.scale"]
            regression.append(reg.permute(0, 2, 3, 1).reshape(-1, 4))
            centerness.append(F.conv2d(x, w["rpn.head.centerness.weight"], w["rpn.head.centerness.bias"]).reshape(-1))
        anchors = official_anchors([tuple(x.shape[-2:]) for x in levels])
        boxes, scores, labels = official_postprocess(logits, regression, centerness, anchors, label_to_token, (h, wd),
                                                     top_n)
    order = torch.argsort(scores, descending=True)
    return _to_original(boxes[order], (h, wd), original), scores[order], labels[order] - 1


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    """A (304, 400, 3) image with a few smooth blobs (resized by half to 152 x 200 by the test protocol)."""
    yy, xx = np.mgrid[0:304, 0:400]
    image = np.zeros((304, 400, 3))
    blobs = ((80, 100, 50, (220, 40, 40)), (200, 280, 70, (40, 60, 220)), (150, 330, 30, (40, 200, 60)))
    for cy, cx, r, colour in blobs:
        image += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))[..., None] * np.array(colour)
    noise = np.random.default_rng(0).integers(0, 30, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("fusion", [True, False])  # GLIP-T (B, C, T) and GLIP-L; GLIP-T (A)
def test_the_converted_model_detects_as_glip_does(fusion, scene, tiny_bert_folder, tmp_path):
    layout = tiny_layout(fusion=fusion)
    official = official_state_dict(seed=3, **layout)
    out = convert([save_official(official, tmp_path / "glip.pth")], tmp_path / "glip.safetensors",
                  text_source=str(tiny_bert_folder))
    protocol = get_detection_protocol("glip").updated(short=152, max_size=200)
    predictor = GroundingPredictor(GLIPDetector.from_checkpoint(out), protocol)
    predictor.set_image(scene)
    result = predictor.detect(NAMES, max_detections=12)
    rgb = prepare_image(scene, 152, 200, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the resize itself is ovdense's
    boxes, scores, labels = official_glip(official, tiny_bert_folder, rgb, NAMES, layout, scene.shape[:2], 12)
    assert len(scores) == 12 and len(set(labels.tolist())) > 1  # something to compare: several phrases, top-k cut
    assert result.labels.tolist() == labels.tolist()
    assert (result.scores - scores).abs().max() < 1e-4 and (result.boxes - boxes).abs().max() < 1e-4

    # a misplaced weight (two same-shaped tensors swapped) changes the detections: the comparison above can fail
    model = predictor.detector
    first, second = ("text_layers.0.query.weight", "text_layers.0.key.weight") if fusion else \
        ("conv_layers.0.convs.0.weight", "conv_layers.0.convs.1.weight")
    with torch.no_grad():
        a, b = model.get_parameter(first).clone(), model.get_parameter(second).clone()
        model.get_parameter(first).copy_(b)
        model.get_parameter(second).copy_(a)
    predictor.set_image(scene)
    wrong = predictor.detect(NAMES, max_detections=12)
    assert len(wrong) != len(result) or (wrong.scores - scores).abs().max() > 1e-3
