"""The fast forms of the inference paths equal their straightforward forms (`ovdense.methods.straightforward`): GLIP's
folded bi-attention, the CPU deformable convolution, CLIP's folded global attention pool."""
import pytest
import torch
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

from ovdense.backbones import load_clip
from ovdense.methods import straightforward
from ovdense.methods.glip import BiAttention
from ovdense.ops.deform_conv import deform_conv2d


def bi_attention_inputs(seed=0):
    torch.manual_seed(seed)
    m = BiAttention(32, 48, 64, 4, dropout=0.0)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.2)  # non-zero biases: every folded bias term counts
    v, l = torch.randn(2, 300, 32), torch.randn(2, 7, 48)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    return m, v, l, mask


def test_folded_bi_attention_equals_glip_form():
    m, v, l, mask = bi_attention_inputs()
    with torch.no_grad():
        for fast, slow in zip(m.eval()(v, l, mask), straightforward.bi_attention(m, v, l, mask)):
            assert fast.shape == slow.shape
            assert (fast - slow).abs().max() <= 1e-4 * max(1.0, float(slow.abs().max()))


def test_folded_bi_attention_gradients_equal_glip_form():
    m, v, l, mask = bi_attention_inputs(1)
    m.train()  # dropout 0: training mode differs only in its dropout
    v.requires_grad_(True)
    l.requires_grad_(True)
    inputs = [v, l, *m.parameters()]
    fast = torch.autograd.grad(sum((o ** 2).sum() for o in m(v, l, mask)), inputs)
    slow = torch.autograd.grad(sum((o ** 2).sum() for o in straightforward.bi_attention(m, v, l, mask)), inputs)
    for a, b in zip(fast, slow):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("with_bias", [True, False])
def test_deform_conv_equals_torchvision(stride, with_bias):
    torch.manual_seed(stride)
    x = torch.randn(2, 6, 9, 11)
    out_h, out_w = (9 - 1) // stride + 1, (11 - 1) // stride + 1
    offset = torch.randn(2, 18, out_h, out_w) * 4  # many taps land outside the image
    offset[0, 0, 0, 0], offset[0, 1, 0, 1], offset[1, 2, 2, 2] = -1.0, 11.0, -0.5  # exactly on the sampling edges
    mask = torch.rand(2, 9, out_h, out_w)
    weight, bias = torch.randn(5, 6, 3, 3), torch.randn(5) if with_bias else None
    ours = deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    reference = torchvision_deform_conv2d(x, offset, weight, bias, stride=stride, padding=1, mask=mask)
    assert ours.shape == reference.shape == (2, 5, out_h, out_w)
    assert (ours - reference).abs().max() <= 1e-4


def test_deform_conv_gradients_equal_torchvision():
    torch.manual_seed(0)
    inputs = [torch.randn(1, 4, 6, 7), torch.randn(1, 18, 6, 7) * 2, torch.rand(1, 9, 6, 7), torch.randn(4, 4, 3, 3),
              torch.randn(4)]
    for t in inputs:
        t.requires_grad_(True)
    x, offset, mask, weight, bias = inputs
    fast = torch.autograd.grad(deform_conv2d(x, offset, weight, bias, padding=1, mask=mask).square().sum(), inputs)
    slow = torch.autograd.grad(
        torchvision_deform_conv2d(x, offset, weight, bias, padding=1, mask=mask).square().sum(), inputs)
    for a, b in zip(fast, slow):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max()))


def test_deform_conv_without_mask_and_with_dilation():
    torch.manual_seed(2)
    x, weight = torch.randn(1, 3, 8, 8), torch.randn(2, 3, 3, 3)
    offset = torch.randn(1, 18, 8, 8)
    ours = deform_conv2d(x, offset, weight, padding=2, dilation=2)
    reference = torchvision_deform_conv2d(x, offset, weight, padding=2, dilation=2)
    assert (ours - reference).abs().max() <= 1e-4


def test_global_attention_pool_equals_every_query_pool():
    torch.manual_seed(0)
    clip = load_clip("RN50", "random")
    for p in clip.visual.attnpool.parameters():
        torch.nn.init.normal_(p, 0, 0.05)
    x = torch.randn(3, 2048, 7, 7)
    with torch.no_grad():
        fast, slow = clip.global_attention_pool(x), straightforward.global_attention_pool(clip, x)
        every_query = clip._attention_pool(x)[:, 0]  # the dense pool's token 0 is the same query
    assert fast.shape == slow.shape == (3, clip.embed_dim)
    assert (fast - slow).abs().max() <= 1e-4 * max(1.0, float(slow.abs().max()))
    assert (every_query - slow).abs().max() <= 1e-4 * max(1.0, float(slow.abs().max()))


def test_straightforward_forms_swap_in_and_back(tiny_rn):
    from ovdense.methods import glip
    fast = glip.BiAttention.forward, glip.deform_conv2d, type(tiny_rn).global_attention_pool
    with straightforward.straightforward_forms():
        assert glip.BiAttention.forward is straightforward.bi_attention
        assert glip.deform_conv2d is torchvision_deform_conv2d
    assert (glip.BiAttention.forward, glip.deform_conv2d, type(tiny_rn).global_attention_pool) == fast


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
def test_soft_nms_on_shared_boxes_equals_the_per_round_form(method):
    from ovdense.detection.postprocess import soft_nms
    torch.manual_seed(0)
    corners = torch.rand(150, 2) * 80
    boxes = torch.cat([corners, corners + 10 + torch.rand(150, 2) * 40], dim=1)  # (150, 4), many overlaps
    scores = torch.rand(150, 6)  # 6 classes score every box: 900 candidates, 150 rounds (dead columns dropped)
    rows, labels = (scores > 0.02).nonzero(as_tuple=True)
    candidates = boxes[rows], scores[rows, labels], labels
    shared = soft_nms(*candidates[:2], 0.5, 0.3, 0.001, method, labels=labels, box_ids=rows)
    per_round = soft_nms(*candidates[:2], 0.5, 0.3, 0.001, method, labels=labels)
    assert len(shared[0]) > 100
    assert torch.equal(shared[0], per_round[0]) and torch.equal(shared[1], per_round[1])


def test_the_chunked_channels_last_roi_head_equals_one_pass(monkeypatch):
    from torchvision.ops import roi_align

    from ovdense.methods import regionclip
    torch.manual_seed(0)
    clip = load_clip("RN50", "random")
    encoder = regionclip.RegionEncoder(clip).eval()
    features = torch.randn(2, 1024, 12, 16)
    boxes = [torch.tensor([[0.0, 0, 100, 90], [30, 20, 250, 180], [5, 5, 40, 60]]), torch.tensor([[8.0, 9, 120, 70]])]
    monkeypatch.setattr(regionclip, "ROI_CHUNK", 2)  # 4 regions: two chunks
    with torch.no_grad():
        chunked = encoder.pool(features, 16, boxes)
        rois = roi_align(features, boxes, 14, 1 / 16, sampling_ratio=0, aligned=True)
        one_pass = straightforward.global_attention_pool(clip, clip.visual.layer4(rois))
        assert encoder.pool(features, 16, [torch.zeros(0, 4), torch.zeros(0, 4)]).shape == (0, clip.embed_dim)
    assert chunked.shape == one_pass.shape == (4, clip.embed_dim)
    assert (chunked - one_pass).abs().max() <= 1e-4 * max(1.0, float(one_pass.abs().max()))


def test_deform_conv_runs_under_cpu_autocast():
    torch.manual_seed(0)
    x, offset, mask = torch.randn(1, 16, 9, 9), torch.randn(1, 18, 9, 9), torch.rand(1, 9, 9, 9)
    weight, bias = torch.randn(16, 16, 3, 3) * 0.1, torch.randn(16)
    exact = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # torchvision's kernel has no autocast rule on a CPU
        low = deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)
    assert low.dtype == torch.bfloat16
    assert (low.float() - exact).abs().max() <= 0.05 * float(exact.abs().max())
