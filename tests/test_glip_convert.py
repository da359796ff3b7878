"""The GLIP-T converter on a state dict with the official key names and shapes (written here from GLIP's module
definitions, not from ovdense's), so that a missing, misnamed or misshapen key fails."""
import pytest
import torch

pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from ovdense.convert.glip import check_fits, convert_official, official_model, official_state  # noqa: E402
from ovdense.detection.predictor import GroundingPredictor  # noqa: E402
from ovdense.errors import CheckpointError  # noqa: E402
from ovdense.methods.glip import GLIPDetector  # noqa: E402

SWIN = {"t": ([(96, 2, 3), (192, 2, 6), (384, 6, 12), (768, 2, 24)], 7, 6),  # (channels, depth, heads) per stage,
        "l": ([(192, 2, 6), (384, 2, 12), (768, 18, 24), (1536, 2, 48)], 12, 8)}  # window, head layers


def _linear(shapes: dict, name: str, out: int, inp: int) -> None:
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)


def _norm(shapes: dict, name: str, width: int) -> None:
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (width,), (width,)


def _bert_layer(shapes: dict, prefix: str) -> None:
    for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
        _linear(shapes, f"{prefix}.{part}", 768, 768)
    _norm(shapes, f"{prefix}.attention.output.LayerNorm", 768)
    _linear(shapes, f"{prefix}.intermediate.dense", 3072, 768)
    _linear(shapes, f"{prefix}.output.dense", 768, 3072)
    _norm(shapes, f"{prefix}.output.LayerNorm", 768)


def official_glip_shapes(variant: str = "t", fusion: bool = True) -> dict[str, tuple]:
    """Key -> shape of glip_tiny_model_o365_goldg.pth's (variant 't') or glip_large_model.pth's ('l') 'model'
    (maskrcnn-benchmark names, 'module.' prefixed)."""
    s: dict[str, tuple] = {}
    stages, window, layers = SWIN[variant]
    body = "backbone.body"
    embed = stages[0][0]
    s[f"{body}.patch_embed.proj.weight"], s[f"{body}.patch_embed.proj.bias"] = (embed, 3, 4, 4), (embed,)
    _norm(s, f"{body}.patch_embed.norm", embed)
    for i, (c, depth, heads) in enumerate(stages):
        for j in range(depth):
            block = f"{body}.layers.{i}.blocks.{j}"
            _norm(s, f"{block}.norm1", c)
            s[f"{block}.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads)
            s[f"{block}.attn.relative_position_index"] = (window ** 2, window ** 2)
            _linear(s, f"{block}.attn.qkv", 3 * c, c)
            _linear(s, f"{block}.attn.proj", c, c)
            _norm(s, f"{block}.norm2", c)
            _linear(s, f"{block}.mlp.fc1", 4 * c, c)
            _linear(s, f"{block}.mlp.fc2", c, 4 * c)
        if i < 3:
            s[f"{body}.layers.{i}.downsample.reduction.weight"] = (2 * c, 4 * c)
            _norm(s, f"{body}.layers.{i}.downsample.norm", 4 * c)
    widths = [c for c, _, _ in stages[1:]]
    for n, c in zip((1, 2, 3), widths):
        _norm(s, f"{body}.norm{n}", c)
    for n, c in zip((2, 3, 4), widths):
        s[f"backbone.fpn.fpn_inner{n}.weight"], s[f"backbone.fpn.fpn_inner{n}.bias"] = (256, c, 1, 1), (256,)
        s[f"backbone.fpn.fpn_layer{n}.weight"], s[f"backbone.fpn.fpn_layer{n}.bias"] = (256, 256, 3, 3), (256,)
    for p in ("p6", "p7"):
        s[f"backbone.fpn.top_blocks.{p}.weight"], s[f"backbone.fpn.top_blocks.{p}.bias"] = (256, 256, 3, 3), (256,)
    bert = "language_backbone.body.model"
    s[f"{bert}.embeddings.word_embeddings.weight"] = (30522, 768)
    s[f"{bert}.embeddings.position_embeddings.weight"] = (512, 768)
    s[f"{bert}.embeddings.token_type_embeddings.weight"] = (2, 768)
    _norm(s, f"{bert}.embeddings.LayerNorm", 768)
    for layer in range(12):
        _bert_layer(s, f"{bert}.encoder.layer.{layer}")
    head = "rpn.head"
    for i in range(layers):
        tower = f"{head}.dyhead_tower.{3 * i if fusion else i}"
        if fusion:
            s[f"{tower}.b_attn.gamma_v"], s[f"{tower}.b_attn.gamma_l"] = (256,), (768,)
            _norm(s, f"{tower}.b_attn.layer_norm_v", 256)
            _norm(s, f"{tower}.b_attn.layer_norm_l", 768)
            for name, out, inp in (("v_proj", 2048, 256), ("l_proj", 2048, 768), ("values_v_proj", 2048, 256),
                                   ("values_l_proj", 2048, 768), ("out_v_proj", 256, 2048),
                                   ("out_l_proj", 768, 2048)):
                _linear(s, f"{tower}.b_attn.attn.{name}", out, inp)
            _bert_layer(s, f"{head}.dyhead_tower.{3 * i + 1}")
            tower = f"{head}.dyhead_tower.{3 * i + 2}"
        for k in range(3):
            s[f"{tower}.DyConv.{k}.conv.weight"], s[f"{tower}.DyConv.{k}.conv.bias"] = (256, 256, 3, 3), (256,)
            _norm(s, f"{tower}.DyConv.{k}.bn", 256)
        s[f"{tower}.AttnConv.1.weight"], s[f"{tower}.AttnConv.1.bias"] = (1, 256, 1, 1), (1,)
        _linear(s, f"{tower}.relu.fc.0", 64, 256)
        _linear(s, f"{tower}.relu.fc.2", 1024, 64)
        s[f"{tower}.offset.weight"], s[f"{tower}.offset.bias"] = (27, 256, 3, 3), (27,)
    s[f"{head}.cls_logits.weight"], s[f"{head}.cls_logits.bias"] = (80, 256, 1, 1), (80,)
    s[f"{head}.bbox_pred.weight"], s[f"{head}.bbox_pred.bias"] = (4, 256, 1, 1), (4,)
    s[f"{head}.centerness.weight"], s[f"{head}.centerness.bias"] = (1, 256, 1, 1), (1,)
    for level in range(5):
        s[f"{head}.scales.{level}.scale"] = (1,)
        s[f"rpn.anchor_generator.cell_anchors.{level}"] = (1, 4)
    _linear(s, f"{head}.dot_product_projection_text", 256, 768)
    s[f"{head}.log_scale"], s[f"{head}.bias_lang"], s[f"{head}.bias0"] = (1,), (768,), (1,)
    return {f"module.{k}": v for k, v in s.items()}


def official_state_dict(fusion: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {k: torch.randn(shape, generator=generator) * 0.02
            for k, shape in official_glip_shapes("t", fusion).items()}


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """bert-base-uncased's config and a small vocabulary (offline: the tokenizer's files, not its weights)."""
    folder = tmp_path_factory.mktemp("bert")
    transformers.BertConfig().save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "star", "blue", "circle", "heart", "bar"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def test_every_official_key_finds_its_place_and_values_land_where_they_belong(bert_folder, tmp_path):
    official = official_state_dict()
    state, settings = official_state(official)
    assert settings == {"image": "swin-t", "layers": 6, "fusion": True, "fusion_dim": 2048, "prompt_tuning": False}
    out = convert_official_from(official, tmp_path, bert_folder)
    model = GLIPDetector.from_checkpoint(out)
    pairs = {  # ovdense parameter <- official key
        "bias0": "rpn.head.bias0",
        "text_projection.weight": "rpn.head.dot_product_projection_text.weight",
        "fusion_layers.5.attn.out_l_proj.weight": "rpn.head.dyhead_tower.15.b_attn.attn.out_l_proj.weight",
        "fusion_layers.0.gamma_v": "rpn.head.dyhead_tower.0.b_attn.gamma_v",
        "text_layers.2.attention_norm.weight": "rpn.head.dyhead_tower.7.attention.output.LayerNorm.weight",
        "conv_layers.0.convs.2.norm.weight": "rpn.head.dyhead_tower.2.DyConv.2.bn.weight",
        "conv_layers.5.relu.fc.2.weight": "rpn.head.dyhead_tower.17.relu.fc.2.weight",
        "conv_layers.3.scale_attention.weight": "rpn.head.dyhead_tower.11.AttnConv.1.weight",
        "image.swin.layers_1.downsample.reduction.weight": "backbone.body.layers.0.downsample.reduction.weight",
        "image.swin.layers_2.blocks.5.attn.qkv.weight": "backbone.body.layers.2.blocks.5.attn.qkv.weight",
        "image.norms.2.weight": "backbone.body.norm3.weight",
        "fpn.inner_blocks.0.0.weight": "backbone.fpn.fpn_inner2.weight",
        "fpn.extra_blocks.p7.weight": "backbone.fpn.top_blocks.p7.weight",
        "text.model.encoder.layer.11.output.dense.weight": "language_backbone.body.model.encoder.layer.11.output.dense.weight",
        "scales.4.scale": "rpn.head.scales.4.scale",
    }
    ours = model.state_dict()
    for name, key in pairs.items():
        assert torch.equal(ours[name], official[f"module.{key}"]), name
    assert torch.equal(ours["image.swin.patch_embed.proj.weight"],
                       official["module.backbone.body.patch_embed.proj.weight"][:, [2, 1, 0]])  # BGR -> RGB
    # the converted GLIP-T runs: a caption grounded on a small image
    predictor = GroundingPredictor(model, "glip")
    predictor.set_image(torch.randint(0, 255, (96, 128, 3), dtype=torch.uint8).numpy())
    result = predictor.ground("a red star", ["red star"], max_detections=5)
    assert len(result) <= 5 and result.class_names == ["red star"]


def convert_official_from(state, folder, bert_folder, **kwargs):
    path = folder / "glip_tiny.pth"
    torch.save({"model": state, "iteration": 0}, path)
    return convert_official(path, folder / "glip_tiny.safetensors", text_source=str(bert_folder), **kwargs)


def test_the_no_fusion_model_converts_too():
    state, settings = official_state(official_state_dict(fusion=False))
    assert settings == {"image": "swin-t", "layers": 6, "fusion": False, "prompt_tuning": False}
    assert "conv_layers.5.offset.weight" in state and not any(k.startswith("fusion_layers") for k in state)


def test_glip_l_keys_fit_a_swin_l_model_with_eight_layers(bert_folder):
    """GLIP-L's layout, checked on meta tensors (shapes only, no memory)."""
    official = {k: torch.empty(shape, device="meta") for k, shape in official_glip_shapes("l").items()}
    state, settings = official_state(official)
    assert settings == {"image": "swin-l", "layers": 8, "fusion": True, "fusion_dim": 2048, "prompt_tuning": False}
    with torch.device("meta"):
        model = GLIPDetector(None, text="bert", text_source=str(bert_folder), pretrained_text=False, **settings)
    check_fits(state, model.state_dict(), "glip_large_model.pth")


@pytest.mark.parametrize("change, message", [
    ("drop", "missing"), ("rename", "does not have"), ("reshape", "shapes")])
def test_a_missing_misnamed_or_misshapen_key_fails(change, message, bert_folder):
    official = official_state_dict()
    key = "module.rpn.head.dyhead_tower.4.intermediate.dense.weight"
    value = official.pop(key)
    if change == "rename":
        official[key.replace("intermediate", "intermediat")] = value
    elif change == "reshape":
        official[key] = value[:100]
    with pytest.raises(CheckpointError, match=message):
        official_model(official, str(bert_folder))
