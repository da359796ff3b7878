"""CLIP backbone: parity with open_clip, dense paths against direct computations from the weights, loading."""
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovdense.backbones import WeightsNotFoundError, load_clip
from ovdense.backbones.clip import resize_grid_embedding

torch.manual_seed(0)


def _last_block_input(backbone, images):
    """Run open_clip's own encode_image and capture the tokens entering the last ViT block."""
    captured = {}
    handle = backbone.visual.transformer.resblocks[-1].register_forward_pre_hook(
        lambda module, args: captured.setdefault("x", args[0]))
    backbone.model.encode_image(images)
    handle.remove()
    return captured["x"]


def _project(backbone, tokens, grid):
    """(B, N, width) last-block output -> (B, D, h, w) joint-space features, computed from the weights."""
    v = backbone.visual
    out = F.layer_norm(tokens[:, 1:], (tokens.shape[-1],), v.ln_post.weight, v.ln_post.bias) @ v.proj
    return out.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def _heads(t, heads):
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _reference_attention(block, x, kind, grid, std=5.0):
    """Explicit (non-fused) attention of the dense modes, from the block's weights."""
    attn = block.attn
    width = x.shape[-1]
    w, b = attn.in_proj_weight, attn.in_proj_bias
    y = block.ln_1(x)
    q, k, v = (y @ w[i * width:(i + 1) * width].T + b[i * width:(i + 1) * width] for i in range(3))
    q, k, v = (_heads(t, attn.num_heads) for t in (q, k, v))
    scale = 1 / math.sqrt(q.shape[-1])
    if kind == "sclip":
        weights = (q @ q.transpose(-1, -2) * scale).softmax(-1) + (k @ k.transpose(-1, -2) * scale).softmax(-1)
    elif kind == "clearclip":
        weights = (q @ q.transpose(-1, -2) * scale).softmax(-1)
    else:  # naclip: Gaussian neighbourhood bias between patch positions, nothing for the class token
        n = grid[0] * grid[1]
        bias = torch.zeros(n + 1, n + 1)
        for i in range(n):
            for j in range(n):
                dy, dx = i // grid[1] - j // grid[1], i % grid[1] - j % grid[1]
                bias[i + 1, j + 1] = math.exp(-(dy * dy + dx * dx) / (2 * std * std))
        weights = (k @ k.transpose(-1, -2) * scale + bias).softmax(-1)
    out = (weights @ v).transpose(1, 2).flatten(2)
    return attn.out_proj(out)


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn"])
def test_global_embedding_matches_open_clip(fixture, request):
    backbone = request.getfixturevalue(fixture)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(images), backbone.model.encode_image(images))


def test_text_embedding_matches_open_clip(tiny_vit):
    texts = ["a photo of a cat.", "grass"]
    with torch.no_grad():
        expected = tiny_vit.model.encode_text(open_clip.get_tokenizer("tiny-vit")(texts))
        torch.testing.assert_close(tiny_vit.encode_text(texts), expected)


def test_vit_maskclip_value_path(tiny_vit):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = _last_block_input(tiny_vit, images)
        block = tiny_vit.visual.transformer.resblocks[-1]
        width = x.shape[-1]
        value = block.ln_1(x) @ block.attn.in_proj_weight[2 * width:].T + block.attn.in_proj_bias[2 * width:]
        y = x + block.attn.out_proj(value)
        y = y + block.mlp(block.ln_2(y))
        expected = _project(tiny_vit, y, (4, 4))
        torch.testing.assert_close(tiny_vit.dense_features(images, "maskclip").features, expected)


@pytest.mark.parametrize("mode", ["sclip", "clearclip", "naclip"])
def test_vit_successor_modes(tiny_vit, mode):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        x = _last_block_input(tiny_vit, images)
        block = tiny_vit.visual.transformer.resblocks[-1]
        out = _reference_attention(block, x, mode, (4, 4))
        if mode == "sclip":  # SCLIP keeps the residual and the FFN, the others drop both
            out = x + out
            out = out + block.mlp(block.ln_2(out))
        expected = _project(tiny_vit, out, (4, 4))
        torch.testing.assert_close(tiny_vit.dense_features(images, mode).features, expected, atol=1e-5, rtol=1e-4)


def test_vit_plain_mode_equals_unchanged_network(tiny_vit):
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens = tiny_vit.visual.transformer(_vit_tokens(tiny_vit, images))
        torch.testing.assert_close(tiny_vit.dense_features(images, "plain").features, _project(tiny_vit, tokens, (4, 4)))


def _vit_tokens(backbone, images):
    return backbone.visual._embeds(images)


def test_resnet_maskclip_value_path(tiny_rn):
    images = torch.randn(2, 3, 64, 64)
    captured = {}
    pool = tiny_rn.visual.attnpool
    handle = pool.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        tiny_rn.model.encode_image(images)
        handle.remove()
        x = captured["x"]  # (B, C, 2, 2)
        value = F.conv2d(x, pool.v_proj.weight[:, :, None, None], pool.v_proj.bias)
        expected = F.conv2d(value, pool.c_proj.weight[:, :, None, None], pool.c_proj.bias)
        torch.testing.assert_close(tiny_rn.dense_features(images, "maskclip").features, expected)


def test_resnet_plain_global_token_is_the_image_embedding(tiny_rn):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        trunk = tiny_rn._resnet_trunk(images)[-1]
        torch.testing.assert_close(tiny_rn._attention_pool(trunk)[:, 0], tiny_rn.model.encode_image(images))


def test_resnet_rejects_vit_only_modes(tiny_rn):
    with pytest.raises(ValueError, match="not available"):
        tiny_rn.dense_features(torch.randn(1, 3, 64, 64), "sclip")


@pytest.mark.parametrize("fixture,stride", [("tiny_vit", 16), ("tiny_rn", 32)])
def test_any_input_size(fixture, stride, request):
    backbone = request.getfixturevalue(fixture)
    with torch.no_grad():
        dense = backbone.dense_features(torch.randn(1, 3, 96, 160), "maskclip")
        assert dense.features.shape == (1, 32, 96 // stride, 160 // stride)
        assert backbone.encode_image(torch.randn(1, 3, 96, 160)).shape == (1, 32)


def test_positional_embedding_resize_keeps_native_size_and_interpolates():
    pos = torch.randn(1 + 16, 8)
    assert resize_grid_embedding(pos, (4, 4)) is pos
    resized = resize_grid_embedding(pos, (8, 8))
    assert resized.shape == (65, 8)
    torch.testing.assert_close(resized[0], pos[0])
    # a constant grid stays constant under bicubic resizing
    flat = torch.cat([pos[:1], torch.ones(16, 8)])
    torch.testing.assert_close(resize_grid_embedding(flat, (3, 5))[1:], torch.ones(15, 8))


def test_feature_maps(tiny_vit, tiny_rn):
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        first, last = tiny_vit.feature_maps(images, [0, -1])
        assert first.shape == last.shape == (1, 64, 4, 6)
        stages = tiny_rn.feature_maps(images, [0, 1, 2, 3])
        assert [s.shape[-1] for s in stages] == [24, 12, 6, 3]


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_load_local_checkpoint(tiny_vit, tmp_path, suffix):
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in tiny_vit.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    loaded = load_clip("tiny-vit", str(path))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), tiny_vit.encode_image(images))
    assert loaded.identity == f"tiny-vit@{path}"


def test_load_openai_torchscript_checkpoint(tiny_vit, tmp_path):
    """OpenAI .pt files are TorchScript archives; they are read without unpickling Python objects."""
    path = tmp_path / "openai.pt"
    images, text = torch.randn(1, 3, 64, 64), open_clip.get_tokenizer("tiny-vit")(["a cat"])
    traced = torch.jit.trace(tiny_vit.model, (images, text), strict=False, check_trace=False)
    traced.save(str(path))
    loaded = load_clip("tiny-vit", str(path))
    assert loaded.model.visual.transformer.resblocks[0].mlp.gelu.__class__.__name__ == "QuickGELU"
    for key, value in tiny_vit.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)


def test_missing_weights_fail_fast_with_instructions(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="--weights"):
        load_clip("ViT-B-16", str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsNotFoundError, match="not in the local cache"):
        load_clip("ViT-B-16", "openai")
    with pytest.raises(ValueError, match="Did you mean"):
        load_clip("ViT-B-61", "openai")
    with pytest.raises(ValueError, match="known tags"):
        load_clip("ViT-B-16", "not-a-tag")
