"""RegionCLIP's released pipeline from converted files: official-layout random state dicts (a detector on a tiny CLIP
ResNet, its offline detectron2 RPN on a narrow R-50: C4 as rpn_coco_48.pth, FPN with SyncBN and a two-conv head as
rpn_lvis_866_lsj.pth) -> `convert` -> the ovdense predictor, against an independent step-by-step re-computation of
detectron2 / RegionCLIP's test path written here from their code (`CLIPFastRCNN.inference`, `BottleneckBlock` with
stride_in_1x1, `FrozenBatchNorm2d`, `StandardRPNHead`, `DefaultAnchorGenerator`, `Box2BoxTransform.apply_deltas`,
`find_top_rpn_proposals`, `CLIPRes5ROIHeads`, RegionCLIP's `ModifiedResNet` / `AttentionPool2d`,
`FastRCNNOutputLayers.forward / inference`, `fast_rcnn_inference_single_image`, `_soft_nms`)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, roi_align

from ovdense.convert.regionclip import convert
from ovdense.detection.predictor import DetectionPredictor
from ovdense.errors import CheckpointError, InputError, UsageError
from ovdense.methods.regionclip import RegionCLIPDetector, region_logits
from ovdense.presets import DetectionProtocol, get_detection_protocol

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
D2_MEAN = (103.530, 116.280, 123.675)  # detectron2's default PIXEL_MEAN (BGR), PIXEL_STD 1
NAMES = ["person", "dog", "zebra", "cup", "sink"]
HEIGHT, WIDTH = 64, 96
TINY = {"width": 16, "layers": (1, 1, 1, 1), "embed": 32, "heads": 16, "grid": 2}  # conftest's tiny-rn
TOL = 1e-4


# ---------------------------------------------------------------------------------- official-layout state dicts
def _bn(shapes, name, channels):
    for part in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.{part}"] = (channels,)


def _d2_conv(shapes, name, cin, cout, k, norm=True, counters=False):
    """detectron2's `Conv2d(..., norm=get_norm(...))`: weight (+ bias without norm), norm.* (SyncBN adds a counter)."""
    shapes[f"{name}.weight"] = (cout, cin, k, k)
    if norm:
        _bn(shapes, f"{name}.norm", cout)
        if counters:
            shapes[f"{name}.norm.num_batches_tracked"] = ()
    else:
        shapes[f"{name}.bias"] = (cout,)


def d2_resnet(prefix, width, blocks, stages, counters=False):
    """`build_resnet_backbone`: BasicStem conv1 7x7; stage i: BottleneckBlock(conv1 1x1, conv2 3x3, conv3 1x1,
    shortcut 1x1 in block 0), bottleneck width * 2^i, output 4 * width * 2^i."""
    shapes = {}
    _d2_conv(shapes, f"{prefix}stem.conv1", 3, width, 7, counters=counters)
    cin = width
    for i in range(stages):
        out, mid = 4 * width * 2 ** i, width * 2 ** i
        for b in range(blocks[i]):
            name = f"{prefix}res{i + 2}.{b}"
            if b == 0:
                _d2_conv(shapes, f"{name}.shortcut", cin, out, 1, counters=counters)
            _d2_conv(shapes, f"{name}.conv1", cin, mid, 1, counters=counters)
            _d2_conv(shapes, f"{name}.conv2", mid, mid, 3, counters=counters)
            _d2_conv(shapes, f"{name}.conv3", mid, out, 1, counters=counters)
            cin = out
    return shapes


def rpn_c4_shapes(width=8, blocks=(3, 4, 6)):
    """rpn_coco_48.pth (Mask R-CNN R-50-C4): backbone res2-res4, a one-conv StandardRPNHead with 15 anchors, and
    roi_heads that RegionCLIP does not load."""
    shapes = d2_resnet("backbone.", width, blocks, 3)
    c = 16 * width
    shapes.update({"proposal_generator.rpn_head.conv.weight": (c, c, 3, 3), "proposal_generator.rpn_head.conv.bias": (c,),
                   "proposal_generator.rpn_head.objectness_logits.weight": (15, c, 1, 1),
                   "proposal_generator.rpn_head.objectness_logits.bias": (15,),
                   "proposal_generator.rpn_head.anchor_deltas.weight": (60, c, 1, 1),
                   "proposal_generator.rpn_head.anchor_deltas.bias": (60,),
                   "roi_heads.res5.0.conv1.weight": (4, 4, 1, 1), "roi_heads.box_predictor.cls_score.weight": (49, 4)})
    return shapes


def rpn_fpn_shapes(width=8, channels=16, blocks=(3, 4, 6, 3)):
    """rpn_lvis_866_lsj.pth (R-50-FPN, large-scale jitter): SyncBN everywhere (with counters), FPN.NORM SyncBN,
    RPN.CONV_DIMS [-1, -1] (rpn_head.conv.conv0 / conv1), 3 anchors per location."""
    shapes = d2_resnet("backbone.bottom_up.", width, blocks, 4, counters=True)
    for level in (2, 3, 4, 5):
        _d2_conv(shapes, f"backbone.fpn_lateral{level}", 4 * width * 2 ** (level - 2), channels, 1, counters=True)
        _d2_conv(shapes, f"backbone.fpn_output{level}", channels, channels, 3, counters=True)
    head = "proposal_generator.rpn_head."
    for k in (0, 1):
        shapes[f"{head}conv.conv{k}.weight"], shapes[f"{head}conv.conv{k}.bias"] = (channels, channels, 3, 3), (channels,)
    shapes.update({f"{head}objectness_logits.weight": (3, channels, 1, 1), f"{head}objectness_logits.bias": (3,),
                   f"{head}anchor_deltas.weight": (12, channels, 1, 1), f"{head}anchor_deltas.bias": (12,),
                   "roi_heads.box_head.fc1.weight": (8, 8)})
    return shapes


def clip_resnet_shapes(prefix, width, layers, embed, grid):
    """RegionCLIP's ModifiedResNet (clip_backbone.py): 3-conv stem, Bottleneck (conv1, conv2, conv3, downsample
    '0' conv / '1' BN in block 0), FrozenBN, AttentionPool2d(grid^2 + 1 positions, 32 * width, heads, embed)."""
    shapes = {}
    for i, (cin, cout) in enumerate([(3, width // 2), (width // 2, width // 2), (width // 2, width)], 1):
        shapes[f"{prefix}conv{i}.weight"] = (cout, cin, 3, 3)
        _bn(shapes, f"{prefix}bn{i}", cout)
    inplanes = width
    for stage, blocks in enumerate(layers, 1):
        planes = width * 2 ** (stage - 1)
        for b in range(blocks):
            name = f"{prefix}layer{stage}.{b}"
            shapes[f"{name}.conv1.weight"] = (planes, inplanes, 1, 1)
            shapes[f"{name}.conv2.weight"] = (planes, planes, 3, 3)
            shapes[f"{name}.conv3.weight"] = (planes * 4, planes, 1, 1)
            for j, c in ((1, planes), (2, planes), (3, planes * 4)):
                _bn(shapes, f"{name}.bn{j}", c)
            if b == 0:
                shapes[f"{name}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                _bn(shapes, f"{name}.downsample.1", planes * 4)
            inplanes = planes * 4
    dim = width * 32
    shapes[f"{prefix}attnpool.positional_embedding"] = (grid * grid + 1, dim)
    for proj in ("q_proj", "k_proj", "v_proj"):
        shapes[f"{prefix}attnpool.{proj}.weight"], shapes[f"{prefix}attnpool.{proj}.bias"] = (dim, dim), (dim,)
    shapes[f"{prefix}attnpool.c_proj.weight"], shapes[f"{prefix}attnpool.c_proj.bias"] = (embed, dim), (embed,)
    return shapes


def detector_shapes(classes=len(NAMES), base=3):
    """regionclip_finetuned-*.pth: the CLIP image tower as `backbone.*`, FastRCNNOutputLayers with text-embedding
    classifiers (cls_score: the base classes, cls_bg_score: zero, test_cls_score: the test classes) and a
    class-agnostic bbox_pred."""
    shapes = clip_resnet_shapes("backbone.", TINY["width"], TINY["layers"], TINY["embed"], TINY["grid"])
    e = TINY["embed"]
    shapes.update({"roi_heads.box_predictor.cls_score.weight": (base, e), "roi_heads.box_predictor.cls_bg_score.weight": (1, e),
                   "roi_heads.box_predictor.test_cls_score.weight": (classes, e),
                   "roi_heads.box_predictor.bbox_pred.weight": (4, e), "roi_heads.box_predictor.bbox_pred.bias": (4,)})
    return shapes


def random_state(shapes, seed=0):
    """Values that keep a deep random trunk's activations near 1: He-scaled convs, BN scales around 0.5,
    positive running variances; the background classifier zero, as RegionCLIP initialises and freezes it."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("weight") and len(shape) == 1:  # the BatchNorm scales
            state[key] = 0.5 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 4:
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
        elif len(shape) == 2:
            state[key] = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            state[key] = 0.1 * torch.randn(shape, generator=g)
    for key in state:
        if "anchor_deltas" in key or "bbox_pred" in key:  # trained deltas are small: keep the boxes apart
            state[key] = state[key] * 0.1
    if "roi_heads.box_predictor.cls_bg_score.weight" in state:
        state["roi_heads.box_predictor.cls_bg_score.weight"].zero_()
    return state


# ------------------------------------------------------------------------------- the re-computation (detectron2)
def frozen_bn(x, state, name, eps=1e-5):
    """detectron2 / RegionCLIP FrozenBatchNorm2d: x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))."""
    scale = state[f"{name}.weight"] * (state[f"{name}.running_var"] + eps).rsqrt()
    bias = state[f"{name}.bias"] - state[f"{name}.running_mean"] * scale
    return x * scale[None, :, None, None] + bias[None, :, None, None]


def d2_conv(x, state, name, stride=1, norm=True):
    weight = state[f"{name}.weight"]
    x = F.conv2d(x, weight, state.get(f"{name}.bias"), stride=stride, padding=weight.shape[-1] // 2)
    return frozen_bn(x, state, f"{name}.norm") if norm else x


def d2_trunk(x, state, prefix, stages):
    """BasicStem then BottleneckBlocks, the stride of each stage's first block in its 1x1 conv1 (STRIDE_IN_1X1);
    returns every stage's output."""
    x = F.max_pool2d(F.relu(d2_conv(x, state, f"{prefix}stem.conv1", stride=2)), kernel_size=3, stride=2, padding=1)
    outputs = {}
    for i in range(stages):
        b = 0
        while f"{prefix}res{i + 2}.{b}.conv1.weight" in state:
            name, stride = f"{prefix}res{i + 2}.{b}", 2 if (i > 0 and b == 0) else 1
            out = F.relu(d2_conv(x, state, f"{name}.conv1", stride=stride))
            out = F.relu(d2_conv(out, state, f"{name}.conv2"))
            out = d2_conv(out, state, f"{name}.conv3")
            shortcut = d2_conv(x, state, f"{name}.shortcut", stride=stride) if f"{name}.shortcut.weight" in state else x
            x = F.relu(out + shortcut)
            b += 1
        outputs[f"res{i + 2}"] = x
    return outputs


def d2_fpn(x, state, norm):
    """FPN over res2-res5 (lateral 1x1, top-down nearest x2, output 3x3) + LastLevelMaxPool -> p2-p6."""
    res = d2_trunk(x, state, "backbone.bottom_up.", 4)
    prev = d2_conv(res["res5"], state, "backbone.fpn_lateral5", norm=norm)
    results = [d2_conv(prev, state, "backbone.fpn_output5", norm=norm)]
    for level in (4, 3, 2):
        prev = d2_conv(res[f"res{level}"], state, f"backbone.fpn_lateral{level}", norm=norm) + \
            F.interpolate(prev, scale_factor=2.0, mode="nearest")
        results.insert(0, d2_conv(prev, state, f"backbone.fpn_output{level}", norm=norm))
    return results + [F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0)]


def d2_cell_anchors(sizes, ratios=(0.5, 1, 2)):
    anchors = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size ** 2.0 / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors)


def d2_apply_deltas(deltas, boxes, weights, clamp=math.log(1000.0 / 16)):
    """Box2BoxTransform.apply_deltas."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw, dh = (deltas[:, 2::4] / ww).clamp(max=clamp), (deltas[:, 3::4] / wh).clamp(max=clamp)
    pred_ctr_x, pred_ctr_y = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
    pred_w, pred_h = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
    out = torch.zeros_like(deltas)
    out[:, 0::4], out[:, 1::4] = pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h
    out[:, 2::4], out[:, 3::4] = pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h
    return out


def d2_clip(boxes, h, w):
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                        boxes[:, 3].clamp(0, h)], dim=1)


def d2_offline_rpn(image, state, fpn, pre_topk, post_topk=1000, nms=0.7):
    """CLIPFastRCNN.offline_preprocess_image (RGB -> BGR, minus the pixel mean, padded to the size divisibility),
    the backbone, StandardRPNHead, DefaultAnchorGenerator (offset 0), apply_deltas (1, 1, 1, 1) and
    find_top_rpn_proposals at test time -> (boxes, objectness logits)."""
    h, w = image.shape[-2:]
    x = image[[2, 1, 0]] - torch.tensor(D2_MEAN)[:, None, None]
    if fpn:
        x = F.pad(x, (0, -(-w // 32) * 32 - w, 0, -(-h // 32) * 32 - h))
        maps, strides, sizes = d2_fpn(x[None], state, norm=True), (4, 8, 16, 32, 64), [[32], [64], [128], [256], [512]]
    else:
        maps, strides, sizes = [d2_trunk(x[None], state, "backbone.", 3)["res4"]], (16,), [[32, 64, 128, 256, 512]]
    head = "proposal_generator.rpn_head."
    convs = [f"{head}conv.conv0", f"{head}conv.conv1"] if fpn else [f"{head}conv"]
    top_boxes, top_logits, levels = [], [], []
    for level, (feature, stride, size) in enumerate(zip(maps, strides, sizes)):
        t = feature
        for conv in convs:
            t = F.relu(F.conv2d(t, state[f"{conv}.weight"], state[f"{conv}.bias"], padding=1))
        logits = F.conv2d(t, state[f"{head}objectness_logits.weight"], state[f"{head}objectness_logits.bias"])
        deltas = F.conv2d(t, state[f"{head}anchor_deltas.weight"], state[f"{head}anchor_deltas.bias"])
        a, fh, fw = logits.shape[1], logits.shape[2], logits.shape[3]
        logits = logits.permute(0, 2, 3, 1).flatten(1)[0]
        deltas = deltas.view(1, a, 4, fh, fw).permute(0, 3, 4, 1, 2).flatten(1, -2)[0]
        shift_y, shift_x = torch.meshgrid(torch.arange(0, fh * stride, stride, dtype=torch.float32),
                                          torch.arange(0, fw * stride, stride, dtype=torch.float32), indexing="ij")
        shifts = torch.stack((shift_x.reshape(-1), shift_y.reshape(-1), shift_x.reshape(-1), shift_y.reshape(-1)), 1)
        anchors = (shifts.view(-1, 1, 4) + d2_cell_anchors(size).view(1, -1, 4)).reshape(-1, 4)
        proposals = d2_apply_deltas(deltas, anchors, (1.0, 1.0, 1.0, 1.0))
        logits, idx = logits.sort(descending=True)
        k = min(len(logits), pre_topk)
        top_boxes.append(proposals[idx[:k]])
        top_logits.append(logits[:k])
        levels.append(torch.full((k,), level))
    boxes, logits, levels = d2_clip(torch.cat(top_boxes), h, w), torch.cat(top_logits), torch.cat(levels)
    keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
    boxes, logits, levels = boxes[keep], logits[keep], levels[keep]
    keep = batched_nms(boxes, logits, levels, nms)[:post_topk]
    return boxes[keep], logits[keep]


def clip_res4(images, state, prefix="backbone."):
    """RegionCLIP's ModifiedResNet to res4: stem (3 convs, avgpool 2), layer1-layer3 of anti-aliased Bottlenecks."""
    x = images
    for i, stride in ((1, 2), (2, 1), (3, 1)):
        x = F.relu(frozen_bn(F.conv2d(x, state[f"{prefix}conv{i}.weight"], stride=stride, padding=1), state, f"{prefix}bn{i}"))
    x = F.avg_pool2d(x, 2)
    for stage in (1, 2, 3):
        x = clip_layer(x, state, f"{prefix}layer{stage}", 1 if stage == 1 else 2)
    return x


def clip_layer(x, state, name, stride):
    b = 0
    while f"{name}.{b}.conv1.weight" in state:
        block, s = f"{name}.{b}", stride if b == 0 else 1
        out = F.relu(frozen_bn(F.conv2d(x, state[f"{block}.conv1.weight"]), state, f"{block}.bn1"))
        out = F.relu(frozen_bn(F.conv2d(out, state[f"{block}.conv2.weight"], padding=1), state, f"{block}.bn2"))
        out = F.avg_pool2d(out, s) if s > 1 else out
        out = frozen_bn(F.conv2d(out, state[f"{block}.conv3.weight"]), state, f"{block}.bn3")
        if f"{block}.downsample.0.weight" in state:
            identity = F.avg_pool2d(x, s) if s > 1 else x
            identity = frozen_bn(F.conv2d(identity, state[f"{block}.downsample.0.weight"]), state, f"{block}.downsample.1")
        else:
            identity = x
        x = F.relu(out + identity)
        b += 1
    return x


def clip_attnpool(x, state, heads, prefix="backbone.attnpool."):
    """AttentionPool2d.forward: (N, C, H, W) -> (N, embed), the mean token attending over [mean, positions]."""
    x = x.flatten(start_dim=2).permute(2, 0, 1)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + state[f"{prefix}positional_embedding"][:, None]
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=heads,
        q_proj_weight=state[f"{prefix}q_proj.weight"], k_proj_weight=state[f"{prefix}k_proj.weight"],
        v_proj_weight=state[f"{prefix}v_proj.weight"], in_proj_weight=None,
        in_proj_bias=torch.cat([state[f"{prefix}{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0, out_proj_weight=state[f"{prefix}c_proj.weight"],
        out_proj_bias=state[f"{prefix}c_proj.bias"], use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0]


def d2_soft_nms(boxes, scores, labels, sigma=0.5, prune=0.001):
    """batched_soft_nms (gaussian): classes kept apart by coordinate offsets, then `_soft_nms`'s loop."""
    boxes = boxes + (labels.to(boxes) * (boxes.max() + 1))[:, None]
    idxs, kept, scores = torch.arange(len(scores)), [], scores.clone()
    out_scores = []
    while scores.numel() > 0:
        top = torch.argmax(scores)
        kept.append(int(idxs[top]))
        out_scores.append(float(scores[top]))
        b = boxes[top]
        inter = (torch.min(b[2], boxes[:, 2]) - torch.max(b[0], boxes[:, 0])).clamp(min=0) * \
            (torch.min(b[3], boxes[:, 3]) - torch.max(b[1], boxes[:, 1])).clamp(min=0)
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        iou = torch.where(inter > 0, inter / ((b[2] - b[0]) * (b[3] - b[1]) + area - inter), torch.zeros_like(inter))
        scores = scores * torch.exp(-iou ** 2 / sigma)
        keep = scores > prune
        keep[top] = False
        boxes, scores, idxs = boxes[keep], scores[keep], idxs[keep]
    return torch.tensor(kept, dtype=torch.long), torch.tensor(out_scores)


def regionclip_test(rgb, detector_dict, rpn_dict, fpn, score_thresh, topk, multiply, rpn_input=None):
    """CLIPFastRCNN.inference on one (H, W, 3) uint8 RGB image at its own size: offline proposals, the CLIP branch
    (RGB / 255, CLIP mean / std), CLIPRes5ROIHeads (ROIAlignV2 at 1/16, res5, attnpool), FastRCNNOutputLayers with
    the test classifier and soft-NMS. Returns the intermediate and final tensors.

    rpn_input: the (3, H, W) 0-255 RGB the offline RPN sees, when not the image itself."""
    image = torch.from_numpy(rgb).permute(2, 0, 1).float()
    h, w = image.shape[-2:]
    proposals, objectness = d2_offline_rpn(image if rpn_input is None else rpn_input, rpn_dict, fpn,
                                           1000 if fpn else 6000)
    x = (image / 255.0 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    res4 = clip_res4(x[None], detector_dict)
    pooled = roi_align(res4, [proposals], output_size=2 * TINY["grid"], spatial_scale=1 / 16, sampling_ratio=0,
                       aligned=True)
    features = clip_attnpool(clip_layer(pooled, detector_dict, "backbone.layer4", 2), detector_dict, TINY["heads"])
    p = "roi_heads.box_predictor."
    normalized = F.normalize(features, p=2.0, dim=1)
    cls = normalized @ F.normalize(detector_dict[f"{p}test_cls_score.weight"], p=2.0, dim=1).t()
    logits = torch.cat([cls, normalized @ detector_dict[f"{p}cls_bg_score.weight"].t()], dim=1) / 0.01
    deltas = features @ detector_dict[f"{p}bbox_pred.weight"].t() + detector_dict[f"{p}bbox_pred.bias"]
    boxes = d2_clip(d2_apply_deltas(deltas, proposals, (10.0, 10.0, 5.0, 5.0)), h, w)
    scores = F.softmax(logits, dim=-1)
    if multiply:
        scores = (scores * objectness[:, None]) ** 0.5
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    boxes, scores = boxes[valid], scores[valid][:, :-1]
    rows, labels = (scores > score_thresh).nonzero(as_tuple=True)
    keep, kept_scores = d2_soft_nms(boxes[rows], scores[rows, labels], labels)
    keep, kept_scores = keep[:topk], kept_scores[:topk]
    return {"proposals": proposals, "objectness": objectness, "logits": logits, "boxes": boxes[rows][keep],
            "scores": kept_scores, "labels": labels[keep]}


# ------------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    rgb = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    rgb[8:48, 16:56] = (200, 40, 40)
    rgb[24:60, 48:90] = (30, 160, 220)
    return np.clip(rgb + rng.integers(0, 40, rgb.shape), 0, 255).astype(np.uint8)


def _save(tmp_path, name, content):
    path = tmp_path / name
    torch.save(content, path)
    return str(path)


def _files(tmp_path, fpn):
    detector = random_state(detector_shapes(), seed=1)
    rpn = random_state(rpn_fpn_shapes() if fpn else rpn_c4_shapes(), seed=2)
    return detector, rpn, [_save(tmp_path, "det.pth", {"model": detector}), _save(tmp_path, "rpn.pth", {"model": rpn})]


def _protocol(preset):
    """The preset at the test image's own size (no resize: the re-computation starts from the same pixels)."""
    return DetectionProtocol(preset.name, short=HEIGHT, max_size=WIDTH, score_threshold=preset.score_threshold,
                             nms=preset.nms, iou_threshold=preset.iou_threshold, max_detections=preset.max_detections,
                             multiply_objectness=preset.multiply_objectness)


def _close(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    difference = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert difference < TOL, f"{what}: max abs difference {difference}"
    return difference


@pytest.mark.parametrize("fpn", [False, True], ids=["ov-coco-c4", "lvis-fpn-lsj"])
def test_released_pipeline_matches_detectron2_step_by_step(fpn, tmp_path, image, tiny_model_configs):
    detector_dict, rpn_dict, paths = _files(tmp_path, fpn)
    out = convert(paths, tmp_path / "det.safetensors", class_names=NAMES, model="tiny-rn", text_weights=None)
    detector = RegionCLIPDetector.from_checkpoint(out)
    preset = get_detection_protocol("lvis" if fpn else "ov-coco")
    assert detector.config["offline_rpn"]["trunk"] == ("fpn" if fpn else "c4")
    # the offline RPN alone, on the image in 0-255 units
    image_255 = torch.from_numpy(image).permute(2, 0, 1).float()
    reference = d2_offline_rpn(image_255, rpn_dict, fpn, 1000 if fpn else 6000)
    proposals, objectness = detector.offline_rpn(image_255[None], [(HEIGHT, WIDTH)])
    assert len(reference[0]) > 50 and (reference[1] < 0).any() and (reference[1] > 0).any()
    _close(proposals[0], reference[0], "proposals")
    _close(objectness[0], reference[1], "objectness logits")
    # the predictor: one CLIP-normalised float32 image, taken back to 0-255 for the RPN (to ~1e-5 of a grey level)
    predictor = DetectionPredictor(detector, _protocol(preset))
    predictor.set_image(image)
    embedded = predictor._image["embedded"]
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    rpn_input = ((image_255 / 255 - mean) / std * std + mean) * 255
    _close(rpn_input, image_255, "the RPN's input, back in 0-255 units")
    expected = regionclip_test(image, detector_dict, rpn_dict, fpn, preset.score_threshold, preset.max_detections,
                               preset.multiply_objectness, rpn_input)
    text = detector.embed_text(NAMES)
    _close(region_logits(embedded["embeddings"], text), expected["logits"], "region logits")
    result = predictor.detect(", ".join(NAMES))
    assert len(result) > 5
    _close(result.boxes, expected["boxes"], "final boxes")
    _close(result.scores, expected["scores"], "final scores")
    assert result.labels.tolist() == expected["labels"].tolist()
    if fpn:  # MULTIPLY_RPN_SCORE multiplies raw logits: scores pass 1, negative logits drop their regions
        assert result.scores.max() > 1


def test_a_misplaced_or_missing_key_fails(tmp_path, image, tiny_model_configs):
    detector_dict, rpn_dict, paths = _files(tmp_path, fpn=False)
    image_255 = torch.from_numpy(image).permute(2, 0, 1).float()
    expected, _ = d2_offline_rpn(image_255, rpn_dict, False, 6000)
    # two same-shaped tensors swapped (a converter placing a key wrongly does this): the parity breaks
    swapped = dict(rpn_dict)
    swapped["backbone.res4.1.conv2.weight"], swapped["backbone.res4.2.conv2.weight"] = \
        rpn_dict["backbone.res4.2.conv2.weight"], rpn_dict["backbone.res4.1.conv2.weight"]
    out = convert([paths[0], _save(tmp_path, "swapped.pth", {"model": swapped})], tmp_path / "s.safetensors",
                  class_names=NAMES, model="tiny-rn", text_weights=None)
    boxes = RegionCLIPDetector.from_checkpoint(out).offline_rpn(image_255[None], [(HEIGHT, WIDTH)])[0][0]
    assert boxes.shape != expected.shape or (boxes - expected).abs().max() > 1e-2
    # a key renamed or missing, in the RPN or the detector: a CheckpointError naming it
    for broken, which in ((lambda d: d.pop("backbone.res3.1.conv2.norm.running_var"), 1),
                          (lambda d: d.__setitem__("proposal_generator.rpn_head.extra.weight", torch.zeros(1)), 1),
                          (lambda d: d.pop("backbone.layer3.0.bn2.running_var"), 0),
                          (lambda d: d.__setitem__("roi_heads.box_predictor.cls_bg_score.weight",
                                                   torch.ones(1, TINY["embed"])), 0)):
        dicts = [dict(detector_dict), dict(rpn_dict)]
        broken(dicts[which])
        files = [_save(tmp_path, "d.pth", {"model": dicts[0]}), _save(tmp_path, "r.pth", {"model": dicts[1]})]
        with pytest.raises(CheckpointError):
            convert(files, tmp_path / "b.safetensors", class_names=NAMES, model="tiny-rn", text_weights=None)


def test_class_embeddings_come_from_the_detector_or_the_concept_file(tmp_path, tiny_model_configs, monkeypatch):
    detector_dict, rpn_dict, paths = _files(tmp_path, fpn=False)
    del detector_dict["roi_heads.box_predictor.test_cls_score.weight"]
    concept = torch.randn(len(NAMES), TINY["embed"]) * 3  # raw template means: not unit norm
    files = [_save(tmp_path, "d.pth", {"model": detector_dict}), paths[1], _save(tmp_path, "emb.pth", concept)]
    out = convert(files, tmp_path / "e.safetensors", class_names=", ".join(NAMES), model="tiny-rn",
                  text_weights="random")
    import ovdense.methods.regionclip as regionclip
    calls = []
    monkeypatch.setattr(regionclip, "load_clip", lambda *a, **k: calls.append(a) or pytest.fail("loaded a CLIP"))
    detector = RegionCLIPDetector.from_checkpoint(out)  # no CLIP is built or downloaded for the stored names
    assert detector.backbone.name == "none" and torch.allclose(detector.embed_text(NAMES[::-1]),
                                                               F.normalize(concept, dim=1).flip(0))
    monkeypatch.undo()
    mixed = detector.embed_text(["cup", "a red square"])  # another name: the recorded text tower, loaded then
    assert torch.allclose(mixed[0], F.normalize(concept, dim=1)[3]) and mixed.shape == (2, TINY["embed"])
    assert detector.text_clip().weights.startswith("random")
    with pytest.raises(UsageError, match="5 class embeddings but 4 class names"):
        convert(files, tmp_path / "f.safetensors", class_names=NAMES[:4], model="tiny-rn")
    silent = convert(paths, tmp_path / "g.safetensors", class_names=NAMES, model="tiny-rn", text_weights=None)
    with pytest.raises(InputError, match="5 classes"):
        RegionCLIPDetector.from_checkpoint(silent).embed_text(["a red square"])


def test_objectness_multiplies_as_regionclip_code_does():
    embedded = {"embeddings": torch.randn(3, 8), "objectness": torch.tensor([4.0, -1.0, 0.5])}
    text = torch.randn(2, 8)
    p = RegionCLIPDetector.class_scores(embedded, text)
    scores = RegionCLIPDetector.class_scores(embedded, text, multiply_objectness=True)
    assert torch.allclose(scores[0], (p[0] * 4.0).sqrt()) and torch.allclose(scores[2], (p[2] * 0.5).sqrt())
    assert torch.equal(scores[1], torch.zeros(2))  # the raw-logit product is NaN there: never a detection


def test_a_pretrained_file_becomes_clip_weights(tmp_path, tiny_model_configs):
    import open_clip
    from safetensors.torch import load_file
    reference = open_clip.create_model("tiny-rn")
    official = random_state(clip_resnet_shapes("backbone.", TINY["width"], TINY["layers"], TINY["embed"],
                                               TINY["grid"]), seed=3)
    official.update({f"lang_encoder.{k}": v + 1 for k, v in reference.state_dict().items()
                     if not k.startswith("visual.") and k not in ("logit_scale", "attn_mask")})
    out = convert([_save(tmp_path, "pre.pth", {"model": official})], tmp_path / "clip.safetensors", model="tiny-rn")
    reference.load_state_dict(load_file(out))  # strict: a complete open_clip CLIP
    assert torch.equal(reference.visual.attnpool.c_proj.weight, official["backbone.attnpool.c_proj.weight"])
    assert torch.equal(reference.ln_final.weight, official["lang_encoder.ln_final.weight"])
    with pytest.raises(UsageError):
        convert([_save(tmp_path, "pre.pth", {"model": official}), _save(tmp_path, "emb.pth", torch.zeros(2, 32))],
                tmp_path / "x.safetensors", model="tiny-rn")


def test_a_detector_on_a_clip_can_take_the_offline_rpn_and_saves_it(tiny_rn, tmp_path, image):
    """rpn_source='offline' with a CLIP (e.g. an ovdense-trained detector on the released RPN): the RPN travels in the
    file, the CLIP is recorded as usual, and the reloaded detector proposes the same boxes."""
    torch.manual_seed(0)
    rpn = {"width": 8, "post_nms_top_n": 40}
    detector = RegionCLIPDetector(tiny_rn, ["circle", "square"], templates="none", rpn_source="offline",
                                  offline_rpn=rpn).eval()
    assert not hasattr(detector, "proposals") and not any(p.requires_grad for p in detector.offline_rpn.parameters())
    path = detector.save(tmp_path / "d.safetensors", preset="ov-coco")
    loaded = RegionCLIPDetector.from_checkpoint(path)
    assert loaded.backbone.name == "tiny-rn"
    first = DetectionPredictor(detector, _protocol(DetectionProtocol("ov-coco")))(image, "circle, square")
    second = DetectionPredictor(loaded, _protocol(DetectionProtocol("ov-coco")))(image, "circle, square")
    assert len(first) and torch.equal(first.boxes, second.boxes) and torch.equal(first.scores, second.scores)
    losses = detector.train().losses(torch.randn(1, 3, 64, 64), [{"boxes": torch.tensor([[8, 8, 40, 40.]]),
                                                                  "labels": torch.tensor([1]), "size": torch.tensor([64, 64])}])
    assert torch.isfinite(losses["loss"]) and not detector.offline_rpn.training
