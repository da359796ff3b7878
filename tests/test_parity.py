"""Parity with the official implementations (SCLIP, NACLIP, ClearCLIP, MaskCLIP, TCL, mmcv / mmseg).

Each reference below re-derives one official computation from the logic of the authors' code, written
independently (the comments name the official file), and is compared with ovdense on random weights, at the
native input size and at sizes that need positional-embedding resizing.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdense.methods import TCL, MaskCLIP, refine_output
from ovdense.ops import short_side_size
from ovdense.ops.resize import resize_image
from ovdense.predictor import SegmentationPredictor
from ovdense.presets import Protocol
from ovdense.text import TextEmbeddingCache

# (height, width) in pixels for the tiny ViT (patch 16, native grid 4 x 4): native, square, wide, tall, and a
# grid with the native number of tokens (2 x 8), which SCLIP-style code does not resize.
SIZES = [(64, 64), (80, 80), (48, 112), (96, 64), (32, 128)]


# ------------------------------------------------------------------------------ official references
def sclip_interpolate_pos_encoding(pos: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """SCLIP / ClearCLIP / NACLIP `VisionTransformer.interpolate_pos_encoding` (clip/model.py): the caller resizes
    only when the token count differs; scale factors ((h // p + 0.1) / g, (w // p + 0.1) / g) drive the sampling."""
    npatch, n = (height // patch) * (width // patch), pos.shape[0] - 1
    if npatch == n:
        return pos
    g = int(math.sqrt(n))
    h0, w0 = height // patch + 0.1, width // patch + 0.1
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(h0 / g, w0 / g), mode="bicubic")
    assert grid.shape[-2:] == (int(h0), int(w0))
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])


def maskclip_resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """MaskCLIP `resize_pos_embed` (mmseg/models/backbones/vit.py) / TCL `interpolate_pos_emb`: bicubic to a size."""
    g = int(math.sqrt(pos.shape[0] - 1))
    if (g, g) == grid:
        return pos
    spatial = F.interpolate(pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2), size=grid, mode="bicubic",
                            align_corners=False)
    return torch.cat([pos[:1], spatial.permute(0, 2, 3, 1).reshape(-1, pos.shape[-1])])


def official_last_block_input(backbone, images: torch.Tensor, mode: str) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch embedding, class token, the method's positional embedding, ln_pre and all blocks but the last."""
    v = backbone.visual
    height, width = images.shape[-2:]
    x = v.conv1(images)
    grid = tuple(x.shape[-2:])
    x = torch.cat([v.class_embedding.expand(len(x), 1, -1), x.flatten(2).transpose(1, 2)], dim=1)
    if mode in ("sclip", "clearclip", "naclip"):
        pos = sclip_interpolate_pos_encoding(v.positional_embedding, height, width, v.patch_size[0])
    else:
        pos = maskclip_resize_pos_embed(v.positional_embedding, grid)
    x = v.ln_pre(x + pos)
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    return x, grid


def official_last_block(block, x: torch.Tensor, mode: str, grid: tuple[int, int], std: float = 5.0):
    """The last block of each method (per-head attention written out), and MaskCLIP's keys: out_proj of k."""
    attn, width = block.attn, x.shape[-1]
    y = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = y.split(width, dim=-1)
    keys = attn.out_proj(k)  # MaskCLIP vit.py: q, k and v all go through out_proj
    if mode == "maskclip":
        out = x + attn.out_proj(v)
        return out + block.mlp(block.ln_2(out)), keys
    heads = attn.num_heads
    q, k, v = (t.reshape(*t.shape[:2], heads, -1).transpose(1, 2) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    if mode == "sclip":  # softmax(q q^T) + softmax(k k^T), residual and FFN kept
        weights = (q @ q.transpose(-1, -2) * scale).softmax(-1) + (k @ k.transpose(-1, -2) * scale).softmax(-1)
    elif mode == "clearclip":  # softmax(q q^T), no residual, no FFN
        weights = (q @ q.transpose(-1, -2) * scale).softmax(-1)
    else:  # NACLIP: softmax(k k^T * scale + omega), omega an unnormalised Gaussian window, 0 for the class token
        ys, xs = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
        omega = np.exp(-((ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2) / (2 * std ** 2))
        omega = F.pad(torch.tensor(omega, dtype=x.dtype), (1, 0, 1, 0))
        weights = (k @ k.transpose(-1, -2) * scale + omega).softmax(-1)
    out = attn.out_proj((weights @ v).transpose(1, 2).flatten(2))
    if mode == "sclip":
        out = x + out
        out = out + block.mlp(block.ln_2(out))
    return out, keys


def official_dense(backbone, images, mode):
    """(B, D, h, w) features and (B, C, h, w) keys the way the official code computes them."""
    x, grid = official_last_block_input(backbone, images, mode)
    out, keys = official_last_block(backbone.visual.transformer.resblocks[-1], x, mode, grid)
    v = backbone.visual
    features = v.ln_post(out[:, 1:]) @ v.proj
    to_map = lambda t: t.transpose(1, 2).reshape(len(t), -1, *grid)  # noqa: E731
    return to_map(features), to_map(keys[:, 1:])


def maskclip_refine_output(output: torch.Tensor, k: torch.Tensor, pd_thresh: float, ks_thresh: float):
    """`refine_output` of MaskCLIP's maskclip_head.py: output (N, C, H, W) cosines, k (N, HW, C') keys."""
    n, c, h, w = output.shape
    output = output.clone()
    if pd_thresh > 0:
        max_cls_conf = F.softmax(output * 100, dim=1).view(n, c, -1).max(dim=-1)[0]
        selected_cls = (max_cls_conf < pd_thresh)[:, :, None, None].expand(n, c, h, w)
        output[selected_cls] = -100
    if ks_thresh > 0:
        output = F.softmax(output * 100, dim=1)
        output = output.view(n, c, -1).transpose(-2, -1)
        k = F.normalize(k, p=2)
        weight = k @ k.transpose(-2, -1)
        selected_pos = (output.max(dim=-1, keepdim=True)[0] < ks_thresh).expand(-1, -1, c)
        weighted_output = weight @ output
        output[selected_pos] = weighted_output[selected_pos]
        output = output.transpose(-2, -1).reshape(n, c, h, w)
    return output


def official_pamr(image: torch.Tensor, mask: torch.Tensor, iterations: int, dilations) -> torch.Tensor:
    """PAMR of SCLIP / NACLIP / TCL (pamr.py): 3x3 kernels applied as dilated convolutions on replicate-padded maps."""
    taps = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]

    def kernel(difference: bool, centre: bool) -> torch.Tensor:
        weight = torch.zeros(len(taps) + centre, 1, 3, 3)
        for i, (a, b) in enumerate(taps + [(1, 1)] * centre):
            weight[i, 0, a, b] = -1 if difference else 1
            if difference:
                weight[i, 0, 1, 1] = 1
        return weight

    def local(x, weight):
        b, k, h, w = x.shape
        x = x.reshape(b * k, 1, h, w)
        out = torch.cat([F.conv2d(F.pad(x, [d] * 4, mode="replicate"), weight, dilation=d) for d in dilations], 1)
        return out.view(b, k, -1, h, w)

    mask = F.interpolate(mask, size=image.shape[-2:], mode="bilinear", align_corners=True)
    x_std = local(image, kernel(False, True)).std(2, keepdim=True)
    x = -local(image, kernel(True, False)).abs() / (1e-8 + 0.1 * x_std)
    x = F.softmax(x.mean(1, keepdim=True), 2)
    for _ in range(iterations):
        mask = (local(mask, kernel(False, False)) * x).sum(2)
    return mask


def mmseg_slide(crop_logits, image: torch.Tensor, crop: int, stride: int, classes: int) -> torch.Tensor:
    """mmseg's `slide_inference`: (3, H, W) -> (K, H, W) averaged window logits (each upsampled to its crop)."""
    _, h_img, w_img = image.shape
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    preds = image.new_zeros((classes, h_img, w_img))
    count = image.new_zeros((1, h_img, w_img))
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y1, x1 = h_idx * stride, w_idx * stride
            y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            logit = crop_logits(image[None, :, y1:y2, x1:x2])[0]
            preds += F.pad(logit, (x1, w_img - x2, y1, h_img - y2))
            count[:, y1:y2, x1:x2] += 1
    return preds / count


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mode", ["maskclip", "sclip", "clearclip", "naclip"])
def test_dense_features_and_keys_match_the_official_code(tiny_vit, mode, size):
    if mode == "maskclip" and size == (32, 128):
        pytest.skip("MaskCLIP's vit.py skips the resize whenever the token count is unchanged; ovdense resizes")
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        features, keys = official_dense(tiny_vit, images, mode)
        dense = tiny_vit.dense_features(images, mode)
    torch.testing.assert_close(dense.features, features, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dense.keys, keys, atol=1e-5, rtol=1e-4)


def test_the_two_positional_resizes_differ_off_the_native_grid(tiny_vit):
    """Guards the test above: had ovdense used one resize for all modes, one of them would fail."""
    pos = tiny_vit.visual.positional_embedding.detach()
    scaled = sclip_interpolate_pos_encoding(pos, 80, 112, 16)
    sized = maskclip_resize_pos_embed(pos, (5, 7))
    assert (scaled - sized).abs().max() > 1e-2


@pytest.mark.parametrize("pd,ks", [(0.0, 0.5), (0.6, 0.0), (0.6, 0.8), (0.0, 1.0)])
def test_key_smoothing_and_prompt_denoising_match_maskclip(tiny_vit, pd, ks):
    images = torch.randn(2, 3, 80, 112)
    text = F.normalize(torch.randn(6, 32), dim=-1)
    method = MaskCLIP(tiny_vit, "maskclip")
    with torch.no_grad():
        features, keys = official_dense(tiny_vit, images, "maskclip")
        cosine = torch.einsum("bdhw,kd->bkhw", F.normalize(features, dim=1), text)
        expected = maskclip_refine_output(cosine, keys.flatten(2).transpose(1, 2), pd, ks)
        got = method.crop_logits(method.embed_crops(images), text, Protocol("t", prompt_denoising=pd, key_smoothing=ks))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert method.score_kind(Protocol("t", key_smoothing=ks)) == ("probability" if ks else "cosine")


def test_refine_output_normalises_keys_over_positions():
    """The official F.normalize(k) acts on dim 1 of (N, HW, C): over positions, not channels."""
    cosine = torch.rand(1, 3, 2, 3) * 0.1
    keys = torch.randn(1, 5, 2, 3)
    expected = maskclip_refine_output(cosine, keys.flatten(2).transpose(1, 2), 0.0, 1.0)
    torch.testing.assert_close(refine_output(cosine, keys, smooth=1.0), expected)
    per_channel = F.normalize(keys.flatten(2).transpose(1, 2), dim=-1)
    probs = (100 * cosine).softmax(1).flatten(2).transpose(1, 2)
    wrong = (per_channel @ per_channel.transpose(1, 2) @ probs).transpose(1, 2).reshape(1, 3, 2, 3)
    assert not torch.allclose(wrong, expected, atol=1e-3)


@pytest.mark.parametrize("height,width,short,expected", [
    (384, 444, 336, (336, 389)),  # 388.5 rounds up, as mmcv's int(x + 0.5) (Python's round gives 388)
    (375, 500, 336, (336, 448)),
    (100, 5000, 336, (41, 2048)),  # the long side is capped at 2048
    (1024, 2048, 560, (560, 1120)),
    (333, 500, 448, (448, 673)),  # 672.67
])
def test_short_side_resize_rounds_like_mmcv(height, width, short, expected):
    scale = min(2048 / max(height, width), short / min(height, width))  # mmcv rescale_size
    assert (int(height * scale + 0.5), int(width * scale + 0.5)) == expected
    assert short_side_size(height, width, short) == expected


def test_resize_is_cv2_bilinear_without_antialias():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    for size in [(56, 77), (210, 250)]:  # down and up
        expected = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR).astype(np.int16)
        got = resize_image(torch.from_numpy(image).permute(2, 0, 1).float(), size, antialias=False)
        diff = np.abs(got.permute(1, 2, 0).numpy().astype(np.int16) - expected)
        # cv2 uses 11-bit fixed-point weights: about 13% of the values differ by one grey level, none by more
        assert diff.max() <= 1 and diff.mean() < 0.2


def _pipeline(tiny_vit, scene, protocol, vocabulary):
    method = MaskCLIP(tiny_vit, protocol.mode)
    predictor = SegmentationPredictor(method, protocol, cache=TextEmbeddingCache(disk=False))
    result = predictor(scene, vocabulary)
    text = method.embed_text(vocabulary.split(", "), ("{}",), TextEmbeddingCache(disk=False))
    return method, result, text


def _official_input(scene: np.ndarray, short: int, backbone) -> torch.Tensor:
    """mmseg: keep-ratio resize (cv2 bilinear, uint8), then normalise with the CLIP mean / std."""
    height, width = scene.shape[:2]
    scale = min(2048 / max(height, width), short / min(height, width))
    size = (int(height * scale + 0.5), int(width * scale + 0.5))
    pixels = torch.from_numpy(scene).permute(2, 0, 1).float()[None]
    pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False).round().clamp(0, 255)[0]
    mean = torch.tensor(backbone.image_mean)[:, None, None] * 255
    std = torch.tensor(backbone.image_std)[:, None, None] * 255
    return (pixels - mean) / std


def _crop_logits_fn(method, text, pad_centre=False):
    """A crop -> its cosine logits upsampled to the crop (SCLIP / NACLIP), or to the centred padding to a multiple
    of 16 and cut back (ClearCLIP's clearclip_segmentor.py)."""
    def fn(crop):
        height, width = crop.shape[-2:]
        top = left = bottom = right = 0
        if pad_centre:
            ph, pw = -height % 16, -width % 16
            top, left = ph // 2, pw // 2
            bottom, right = ph - top, pw - left
            crop = F.pad(crop, (left, right, top, bottom))
        features = F.normalize(method.backbone.dense_features(crop, method.mode).features, dim=1)
        logits = torch.einsum("bdhw,kd->bkhw", features, text)
        logits = F.interpolate(logits, size=crop.shape[-2:], mode="bilinear", align_corners=False)
        return logits[..., top:top + height, left:left + width]
    return fn


def test_naclip_pipeline_with_pamr_at_the_original_size(tiny_vit, scene):
    """NACLIP (naclip.py): whole image, logits resized to the original size, PAMR there on raw cosines, x40, softmax."""
    protocol = Protocol("naclip-like", short_side=80, crop=None, stride=None, templates="none", logit_scale=40.0,
                        pamr_iterations=10, pamr_dilations=(8, 16), pamr_at="original", mode="naclip")
    method, result, text = _pipeline(tiny_vit, scene, protocol, "red, blue, green")
    with torch.no_grad():
        image = _official_input(scene, 80, tiny_vit)
        logits = _crop_logits_fn(method, text)(image[None])
        logits = F.interpolate(logits, size=scene.shape[:2], mode="bilinear", align_corners=False)
        resized = F.interpolate(image[None], size=scene.shape[:2], mode="bilinear", align_corners=False)
        logits = official_pamr(resized, logits, 10, (8, 16))[0]
        probs = (logits * 40).softmax(dim=0)
    assert (result.labels == probs.argmax(0).numpy()).mean() > 0.999


def test_sclip_pipeline_with_windows_and_voc_thresholds(tiny_vit, scene):
    """SCLIP (clip_segmentor.py): slide inference, resize to the original size, x scale, softmax, area threshold over
    the foreground, argmax, probability threshold -> background (index 0)."""
    protocol = Protocol("sclip-like", short_side=72, crop=48, stride=24, templates="none", logit_scale=65.0,
                        background_threshold=0.4, area_threshold=0.1, mode="sclip")
    vocabulary = "background, red, blue, green"
    method, result, text = _pipeline(tiny_vit, scene, protocol, vocabulary)
    with torch.no_grad():
        image = _official_input(scene, 72, tiny_vit)
        logits = mmseg_slide(_crop_logits_fn(method, text), image, 48, 24, len(text))
        logits = F.interpolate(logits[None], size=scene.shape[:2], mode="bilinear")[0]
        probs = (logits * 65).softmax(dim=0)
        pred = F.one_hot(probs.argmax(0), len(text))
        area = pred[:, :, 1:].sum((0, 1))
        keep = (area > 0.1 * area.sum()).float()
        probs[1:] *= keep[:, None, None]
        expected = probs.argmax(0)
        expected[probs.max(0)[0] < 0.4] = 0
    assert (result.labels == expected.numpy()).mean() > 0.999


def test_clearclip_pads_crops_to_the_patch_size(tiny_vit, scene):
    protocol = Protocol("clearclip-like", short_side=72, crop=40, stride=20, pad="centre", templates="none",
                        logit_scale=50.0, mode="clearclip")
    method, result, text = _pipeline(tiny_vit, scene, protocol, "red, blue, green")
    with torch.no_grad():
        image = _official_input(scene, 72, tiny_vit)
        logits = mmseg_slide(_crop_logits_fn(method, text, pad_centre=True), image, 40, 20, len(text))
        probs = (logits * 50).softmax(dim=0)
    torch.testing.assert_close(result.scores, probs, atol=1e-4, rtol=1e-3)  # scores: at the working size


def test_tcl_refines_each_crops_masks_at_mask_resolution_before_the_kp_mix(tiny_vit):
    """TCL (tcl.py generate_masks): sigmoid masks at H/4, PAMR with the crop resized there (align_corners=True),
    then the mix with the frozen CLIP's masks."""
    torch.manual_seed(0)
    tcl = TCL(tiny_vit, kp_weight=0.3).eval()
    crops = torch.randn(2, 3, 64, 80)
    text = torch.randn(3, 32)
    protocol = Protocol("tcl-like", pamr_iterations=10, pamr_dilations=(1, 2, 4, 8, 12, 24), pamr_at="mask")
    with torch.no_grad():
        embedded = tcl.embed_crops(crops)
        got = tcl.crop_logits(embedded, text, protocol)
        masks = torch.sigmoid(tcl.mask_logits(embedded["dense"], text))
        image = F.interpolate(crops, size=masks.shape[-2:], mode="bilinear", align_corners=True)
        masks = official_pamr(image, masks, 10, (1, 2, 4, 8, 12, 24))
        cosine = torch.einsum("bdhw,qd->bqhw", embedded["clip"], F.normalize(text, dim=-1))
        kp = F.interpolate(torch.sigmoid((cosine - 0.25) * 10), size=masks.shape[-2:], mode="bilinear",
                           align_corners=False)
        expected = 0.3 * kp + 0.7 * masks
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
