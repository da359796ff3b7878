"""The GLIP converter on state dicts with the official key names and shapes (written here from GLIP's module
definitions and its released configs, not from ovdense's), so that a missing, misnamed or misshapen key fails: every
released layout on meta tensors, value placement and the entry point on a tiny layout with real values."""
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ovdense.convert.glip import check_fits, convert, convert_official, official_model, official_state  # noqa: E402
from ovdense.errors import CheckpointError, InputError, UsageError  # noqa: E402
from ovdense.methods.base import read_trained  # noqa: E402
from ovdense.methods.glip import GLIPDetector  # noqa: E402

# MODEL.SWINT of configs/pretrain/glip_Swin_T_O365*.yaml (the defaults) and glip_Swin_L.yaml
SWIN_T = {"embed_dim": 96, "depths": [2, 2, 6, 2], "heads": [3, 6, 12, 24], "window": 7}
SWIN_L = {"embed_dim": 192, "depths": [2, 2, 18, 2], "heads": [6, 12, 24, 48], "window": 12}
BERT_BASE = {"hidden": 768, "layers": 12, "heads": 12, "vocab": 30522, "positions": 512}
# release file -> (Swin, MODEL.DYHEAD.NUM_CONVS, FUSE_CONFIG.EARLY_FUSE_ON), from the README's model zoo and configs
RELEASES = {
    "glip_a_tiny_o365.pth": (SWIN_T, 6, False),  # GLIP-T (A): glip_A_Swin_T_O365.yaml
    "glip_tiny_model_o365.pth": (SWIN_T, 6, True),  # GLIP-T (B): glip_Swin_T_O365.yaml
    "glip_tiny_model_o365_goldg.pth": (SWIN_T, 6, True),  # GLIP-T (C): glip_Swin_T_O365_GoldG.yaml
    "glip_tiny_model_o365_goldg_cc_sbu.pth": (SWIN_T, 6, True),  # GLIP-T: glip_Swin_T_O365_GoldG.yaml
    "glip_large_model.pth": (SWIN_L, 8, True),  # GLIP-L: glip_Swin_L.yaml
}
# a tiny GLIP of the same layout for tests that run it
TINY_SWIN = {"embed_dim": 8, "depths": [2, 2, 2, 2], "heads": [1, 2, 2, 4], "window": 7}
TINY_BERT = {"hidden": 32, "layers": 2, "heads": 2, "vocab": 0, "positions": 256}  # vocab: the test's words
TINY_HEAD = {"channels": 32, "fusion_dim": 64, "layers": 2}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "(", ")", "a", "the", "on", "of", "and", "left",
         "red", "star", "blue", "circle", "heart", "bar", "person", "traffic", "light", "hour", "##glass", "bow",
         "weapon", "small", "dog", "##s", "car", "bicycle"]


def _linear(shapes: dict, name: str, out: int, inp: int) -> None:
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)


def _norm(shapes: dict, name: str, width: int) -> None:
    shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (width,), (width,)


def _bert_layer(shapes: dict, prefix: str, width: int) -> None:
    for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
        _linear(shapes, f"{prefix}.{part}", width, width)
    _norm(shapes, f"{prefix}.attention.output.LayerNorm", width)
    _linear(shapes, f"{prefix}.intermediate.dense", 4 * width, width)
    _linear(shapes, f"{prefix}.output.dense", width, 4 * width)
    _norm(shapes, f"{prefix}.output.LayerNorm", width)


def official_glip_shapes(swin: dict = SWIN_T, bert: dict = BERT_BASE, channels: int = 256, fusion_dim: int = 2048,
                         layers: int = 6, fusion: bool = True) -> dict[str, tuple]:
    """Key -> shape of a released GLIP's 'model' (maskrcnn-benchmark names, 'module.' prefixed): swint.py's
    SwinTransformer (norm0 is an Identity with SWINT-FPN-RETINANET), fpn.py's FPN + LastLevelP6P7, HF's BertModel
    (no pooler), vldyhead.py's VLDyHead (VLFuse / BertEncoderLayer / DyConv towers, DYReLU squeeze = C // 4)."""
    s: dict[str, tuple] = {}
    body, embed, window = "backbone.body", swin["embed_dim"], swin["window"]
    s[f"{body}.patch_embed.proj.weight"], s[f"{body}.patch_embed.proj.bias"] = (embed, 3, 4, 4), (embed,)
    _norm(s, f"{body}.patch_embed.norm", embed)
    for i, (depth, heads) in enumerate(zip(swin["depths"], swin["heads"])):
        c = embed * 2 ** i
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
    widths = [embed * 2 ** i for i in (1, 2, 3)]
    for n, c in zip((1, 2, 3), widths):
        _norm(s, f"{body}.norm{n}", c)
    for n, c in zip((2, 3, 4), widths):
        s[f"backbone.fpn.fpn_inner{n}.weight"], s[f"backbone.fpn.fpn_inner{n}.bias"] = (channels, c, 1, 1), (channels,)
        s[f"backbone.fpn.fpn_layer{n}.weight"] = (channels, channels, 3, 3)
        s[f"backbone.fpn.fpn_layer{n}.bias"] = (channels,)
    for p in ("p6", "p7"):
        s[f"backbone.fpn.top_blocks.{p}.weight"] = (channels, channels, 3, 3)
        s[f"backbone.fpn.top_blocks.{p}.bias"] = (channels,)
    lm, width = "language_backbone.body.model", bert["hidden"]
    s[f"{lm}.embeddings.word_embeddings.weight"] = (bert["vocab"], width)
    s[f"{lm}.embeddings.position_embeddings.weight"] = (bert["positions"], width)
    s[f"{lm}.embeddings.token_type_embeddings.weight"] = (2, width)
    s[f"{lm}.embeddings.position_ids"] = (1, bert["positions"])  # a persistent buffer in the transformers GLIP used
    _norm(s, f"{lm}.embeddings.LayerNorm", width)
    for layer in range(bert["layers"]):
        _bert_layer(s, f"{lm}.encoder.layer.{layer}", width)
    head = "rpn.head"
    for i in range(layers):
        tower = f"{head}.dyhead_tower.{3 * i if fusion else i}"
        if fusion:
            s[f"{tower}.b_attn.gamma_v"], s[f"{tower}.b_attn.gamma_l"] = (channels,), (width,)
            _norm(s, f"{tower}.b_attn.layer_norm_v", channels)
            _norm(s, f"{tower}.b_attn.layer_norm_l", width)
            for name, out, inp in (("v_proj", fusion_dim, channels), ("l_proj", fusion_dim, width),
                                   ("values_v_proj", fusion_dim, channels), ("values_l_proj", fusion_dim, width),
                                   ("out_v_proj", channels, fusion_dim), ("out_l_proj", width, fusion_dim)):
                _linear(s, f"{tower}.b_attn.attn.{name}", out, inp)
            _bert_layer(s, f"{head}.dyhead_tower.{3 * i + 1}", width)
            tower = f"{head}.dyhead_tower.{3 * i + 2}"
        for k in range(3):
            s[f"{tower}.DyConv.{k}.conv.weight"] = (channels, channels, 3, 3)
            s[f"{tower}.DyConv.{k}.conv.bias"] = (channels,)
            _norm(s, f"{tower}.DyConv.{k}.bn", channels)
        s[f"{tower}.AttnConv.1.weight"], s[f"{tower}.AttnConv.1.bias"] = (1, channels, 1, 1), (1,)
        _linear(s, f"{tower}.relu.fc.0", channels // 4, channels)
        _linear(s, f"{tower}.relu.fc.2", 4 * channels, channels // 4)
        s[f"{tower}.offset.weight"], s[f"{tower}.offset.bias"] = (27, channels, 3, 3), (27,)
    s[f"{head}.cls_logits.weight"], s[f"{head}.cls_logits.bias"] = (80, channels, 1, 1), (80,)
    s[f"{head}.bbox_pred.weight"], s[f"{head}.bbox_pred.bias"] = (4, channels, 1, 1), (4,)
    s[f"{head}.centerness.weight"], s[f"{head}.centerness.bias"] = (1, channels, 1, 1), (1,)
    for level in range(5):
        s[f"{head}.scales.{level}.scale"] = (1,)
        s[f"rpn.anchor_generator.cell_anchors.{level}"] = (1, 4)
    _linear(s, f"{head}.dot_product_projection_text", channels, width)
    s[f"{head}.log_scale"], s[f"{head}.bias_lang"], s[f"{head}.bias0"] = (1,), (width,), (1,)
    return {f"module.{k}": v for k, v in s.items()}


def _official_value(key: str, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """A plausible random value: norms and scales near 1, 1/sqrt(fan_in) weights, small biases, the layer-scale gates
    near 0.5, bias0 -1.5 (some phrases pass 0.05), the buffers as GLIP computes them."""
    if key.endswith("relative_position_index"):
        window = math.isqrt(shape[0])
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        return relative[..., 0] * (2 * window - 1) + relative[..., 1]
    if key.endswith("position_ids"):
        return torch.arange(shape[1])[None]
    if key.endswith("bias0"):
        return torch.full(shape, -1.5)
    noise = torch.randn(shape, generator=generator)
    norm = any(part in key for part in (".norm", "LayerNorm", "layer_norm", ".bn."))
    if key.endswith(("gamma_v", "gamma_l")):
        return 0.5 + 0.1 * noise
    if key.endswith(".scale") or (norm and key.endswith("weight")):
        return 1.0 + 0.1 * noise
    if key.endswith(("bias", "bias_lang", "log_scale")) or "cell_anchors" in key:
        return 0.1 * noise
    return noise / math.sqrt(math.prod(shape[1:])) * (0.1 if key.endswith("bbox_pred.weight") else 1.0)


def official_state_dict(seed: int = 0, **layout) -> dict[str, torch.Tensor]:
    """A random official-layout state dict (see `official_glip_shapes`)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: _official_value(k, shape, generator) for k, shape in official_glip_shapes(**layout).items()}


def tiny_layout(fusion: bool = True, swin: dict = TINY_SWIN) -> dict:
    return {"swin": swin, "bert": {**TINY_BERT, "vocab": len(WORDS)}, "fusion": fusion, **TINY_HEAD}


def write_bert_folder(folder: Path, bert: dict | None = None) -> Path:
    """A BERT config (bert-base-uncased's unless `bert` gives tiny sizes) and a WordPiece tokenizer of `WORDS`:
    what `text_source` must hold offline (the weights come from the GLIP checkpoint)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = transformers.BertConfig() if bert is None else transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=bert["hidden"], num_hidden_layers=bert["layers"],
        num_attention_heads=bert["heads"], intermediate_size=4 * bert["hidden"],
        max_position_embeddings=bert["positions"])
    config.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_base_folder(tmp_path_factory):
    return write_bert_folder(tmp_path_factory.mktemp("bert-base"))


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    return write_bert_folder(tmp_path_factory.mktemp("bert-tiny"), TINY_BERT)


def save_official(state: dict, path: Path, **extra) -> Path:
    torch.save({"model": state, "iteration": 0, **extra}, path)
    return path


# ----------------------------------------------------------------------------------------- every released layout
@pytest.mark.parametrize("release", list(RELEASES))
def test_every_released_layout_fits_its_model(release, bert_base_folder):
    """Each release's layout (meta tensors: shapes only) maps onto a GLIPDetector of the architecture its config
    names, read back from the shapes alone: nothing missing, nothing left over, every shape equal."""
    swin, layers, fusion = RELEASES[release]
    official = {k: torch.empty(shape, device="meta")
                for k, shape in official_glip_shapes(swin=swin, layers=layers, fusion=fusion).items()}
    state, settings = official_state(official, release)
    expected = {"image": "swin-l" if swin is SWIN_L else "swin-t", "swin": None, "channels": 256, "layers": layers,
                "fusion": fusion, "text_heads": None, "prompt_tuning": False}
    expected.update({"fusion_dim": 2048} if fusion else {})
    assert settings == expected
    with torch.device("meta"):
        model = GLIPDetector(None, text="bert", text_source=str(bert_base_folder), pretrained_text=False, **settings)
    assert model.config["text_heads"] == 12 and len(model.conv_layers) == layers
    check_fits(state, model.state_dict(), release)


# ------------------------------------------------------------------------------------- values on a tiny layout
def test_values_land_where_they_belong(tiny_bert_folder, tmp_path):
    official = official_state_dict(**tiny_layout())
    state, settings = official_state(official)
    assert settings["swin"] == {"embed_dim": 8, "depths": [2, 2, 2, 2], "heads": [1, 2, 2, 4]}
    assert settings["channels"] == 32 and settings["layers"] == 2 and settings["fusion_dim"] == 64
    out = convert([save_official(official, tmp_path / "glip_tiny.pth")], tmp_path / "glip_tiny.safetensors",
                  text_source=str(tiny_bert_folder))
    model = GLIPDetector.from_checkpoint(out)
    pairs = {  # ovdense parameter <- official key
        "bias0": "rpn.head.bias0",
        "text_projection.weight": "rpn.head.dot_product_projection_text.weight",
        "fusion_layers.1.attn.out_l_proj.weight": "rpn.head.dyhead_tower.3.b_attn.attn.out_l_proj.weight",
        "fusion_layers.0.gamma_v": "rpn.head.dyhead_tower.0.b_attn.gamma_v",
        "fusion_layers.1.norm_l.bias": "rpn.head.dyhead_tower.3.b_attn.layer_norm_l.bias",
        "text_layers.1.attention_norm.weight": "rpn.head.dyhead_tower.4.attention.output.LayerNorm.weight",
        "text_layers.0.value.bias": "rpn.head.dyhead_tower.1.attention.self.value.bias",
        "conv_layers.0.convs.2.norm.weight": "rpn.head.dyhead_tower.2.DyConv.2.bn.weight",
        "conv_layers.1.convs.0.weight": "rpn.head.dyhead_tower.5.DyConv.0.conv.weight",
        "conv_layers.1.relu.fc.2.weight": "rpn.head.dyhead_tower.5.relu.fc.2.weight",
        "conv_layers.1.scale_attention.weight": "rpn.head.dyhead_tower.5.AttnConv.1.weight",
        "conv_layers.0.offset.bias": "rpn.head.dyhead_tower.2.offset.bias",
        "image.swin.layers_1.downsample.reduction.weight": "backbone.body.layers.0.downsample.reduction.weight",
        "image.swin.layers_3.downsample.norm.bias": "backbone.body.layers.2.downsample.norm.bias",
        "image.swin.layers_2.blocks.1.attn.qkv.weight": "backbone.body.layers.2.blocks.1.attn.qkv.weight",
        "image.swin.layers_0.blocks.0.attn.relative_position_bias_table":
            "backbone.body.layers.0.blocks.0.attn.relative_position_bias_table",
        "image.norms.0.weight": "backbone.body.norm1.weight",
        "image.norms.2.bias": "backbone.body.norm3.bias",
        "fpn.inner_blocks.0.0.weight": "backbone.fpn.fpn_inner2.weight",
        "fpn.layer_blocks.2.0.bias": "backbone.fpn.fpn_layer4.bias",
        "fpn.extra_blocks.p7.weight": "backbone.fpn.top_blocks.p7.weight",
        "text.model.encoder.layer.1.output.dense.weight":
            "language_backbone.body.model.encoder.layer.1.output.dense.weight",
        "scales.4.scale": "rpn.head.scales.4.scale",
    }
    ours = model.state_dict()
    for name, key in pairs.items():
        assert torch.equal(ours[name], official[f"module.{key}"]), name
    assert torch.equal(ours["image.swin.patch_embed.proj.weight"],
                       official["module.backbone.body.patch_embed.proj.weight"][:, [2, 1, 0]])  # BGR -> RGB


def test_the_no_fusion_layout_has_no_fusion_layers():
    state, settings = official_state(official_state_dict(**tiny_layout(fusion=False)))
    assert settings["fusion"] is False and settings["layers"] == 2 and "fusion_dim" not in settings
    assert "conv_layers.1.offset.weight" in state and not any(k.startswith(("fusion_layers", "text_layers"))
                                                              for k in state)


@pytest.mark.parametrize("change, message", [
    ("drop", "missing"), ("rename", "does not have"), ("reshape", "shapes"), ("drop-stage", "lacks")])
def test_a_missing_misnamed_or_misshapen_key_fails(change, message, tiny_bert_folder):
    official = official_state_dict(**tiny_layout())
    key = "module.rpn.head.dyhead_tower.4.intermediate.dense.weight"
    value = official.pop(key)
    if change == "rename":
        official[key.replace("intermediate", "intermediat")] = value
    elif change == "reshape":
        official[key] = value[:100]
    elif change == "drop-stage":
        official[key] = value
        for name in [k for k in official if ".layers.3.blocks." in k]:
            del official[name]
    with pytest.raises(CheckpointError, match=message):
        official_model(official, str(tiny_bert_folder))


# ----------------------------------------------------------------------------------------------- the entry point
def test_convert_records_glip_without_clip_and_the_preset_of_the_release(tiny_bert_folder, tmp_path):
    official = official_state_dict(**tiny_layout())
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in official.items()}
    path = save_official(official, tmp_path / "glip_tiny_model_o365_goldg_lvisbest.pth", model_ema=ema)
    out = convert([path], tmp_path / "lvis.safetensors", text_source=str(tiny_bert_folder))
    metadata, state = read_trained(out)
    assert (metadata["method"], metadata["model"], metadata["preset"]) == ("glip", "none", "glip-lvis")
    assert metadata["config"]["text_source"] == str(tiny_bert_folder) and metadata["config"]["text_heads"] == 2
    assert torch.equal(state["bias0"], official["module.rpn.head.bias0"])
    coco = convert([path], tmp_path / "coco.safetensors", text_source=str(tiny_bert_folder), ema=True, preset="glip")
    metadata, state = read_trained(coco)
    assert metadata["preset"] == "glip" and torch.equal(state["bias0"], ema["module.rpn.head.bias0"])
    named = save_official(official, tmp_path / "glip_tiny_model_o365_goldg.pth")
    assert read_trained(convert_official(named, tmp_path / "t.safetensors", str(tiny_bert_folder)),
                        tensors=False)[0]["preset"] == "glip"
    with pytest.raises(UsageError, match="one checkpoint"):
        convert([path, named], tmp_path / "two.safetensors")
    with pytest.raises(UsageError, match="not bert"):
        convert([path], tmp_path / "x.safetensors", bert="x")
    with pytest.raises(UsageError, match="preset"):
        convert([path], tmp_path / "x.safetensors", text_source=str(tiny_bert_folder), preset="ov-coco")


def test_a_missing_tokenizer_says_how_to_get_it(tmp_path):
    path = save_official(official_state_dict(**tiny_layout()), tmp_path / "glip_tiny.pth")
    (tmp_path / "empty").mkdir()
    for source in (str(tmp_path / "empty"), "bert-base-uncased-not-cached"):
        with pytest.raises(InputError, match=r"huggingface-cli download .*vocab.txt"):
            convert([path], tmp_path / "out.safetensors", text_source=source)


class _Marker:
    """Unpickling this would create a file (it must never be unpickled)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_only_tensors_are_unpickled(tiny_bert_folder, tmp_path):
    marker = tmp_path / "unpickled"
    path = save_official(official_state_dict(**tiny_layout()), tmp_path / "glip_tiny.pth", extra=_Marker(marker))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        convert([path], tmp_path / "out.safetensors", text_source=str(tiny_bert_folder))
    assert not marker.exists()
