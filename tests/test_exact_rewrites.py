"""The fast forms of the inference paths equal their straightforward forms (issue 24): GLIP's folded bi-attention,
the CPU deformable convolution, CLIP's folded global attention pool, and soft-NMS."""
import pytest
import torch
from torchvision.ops import deform_conv2d as torchvision_deform_conv2d

from ovdense.backbones import load_clip
from ovdense.methods.glip import BiAttention, clamp
from ovdense.ops.deform_conv import deform_conv2d


def straightforward_bi_attention(m: BiAttention, v, l, text_mask):
    """microsoft/GLIP's BiMultiHeadAttention as written: both sides projected to the fusion width."""
    heads = lambda x: x.reshape(x.shape[0], x.shape[1], m.heads, -1).transpose(1, 2)  # noqa: E731
    q = heads(m.v_proj(v))
    logits = clamp(q * q.shape[-1] ** -0.5 @ heads(m.l_proj(l)).transpose(-1, -2))  # (B, H, N, T)
    text_side = logits.transpose(-1, -2)
    text_side = clamp(text_side - text_side.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    image_side = logits.masked_fill(~text_mask[:, None, None, :], -9e15).softmax(dim=-1)
    dv = (image_side @ heads(m.values_l_proj(l))).transpose(1, 2).flatten(2)
    dl = (text_side @ heads(m.values_v_proj(v))).transpose(1, 2).flatten(2)
    return m.out_v_proj(dv), m.out_l_proj(dl)


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
        for fast, slow in zip(m.eval()(v, l, mask), straightforward_bi_attention(m, v, l, mask)):
            assert fast.shape == slow.shape
            assert (fast - slow).abs().max() <= 1e-4 * max(1.0, float(slow.abs().max()))


def test_folded_bi_attention_gradients_equal_glip_form():
    m, v, l, mask = bi_attention_inputs(1)
    m.train()  # dropout 0: training mode differs only in its dropout
    v.requires_grad_(True)
    l.requires_grad_(True)
    inputs = [v, l, *m.parameters()]
    fast = torch.autograd.grad(sum((o ** 2).sum() for o in m(v, l, mask)), inputs)
    slow = torch.autograd.grad(sum((o ** 2).sum() for o in straightforward_bi_attention(m, v, l, mask)), inputs)
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
        fast, slow = clip.global_attention_pool(x), clip._attention_pool(x)[:, 0]
    assert fast.shape == slow.shape == (3, clip.embed_dim)
    assert (fast - slow).abs().max() <= 1e-4 * max(1.0, float(slow.abs().max()))
