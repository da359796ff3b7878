"""A transformers CLIPModel folder as --weights: mapped onto open_clip, equal to transformers' own forward.

Each case saves a tiny random `transformers.CLIPModel` (every weight random, LayerNorms included, so a misplaced
key changes the outputs) and compares what ovdense computes with what transformers computes on the same inputs.
"""
import inspect
import json
import os
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from ovdense.backbones import HF_CLIP, load_clip
from ovdense.errors import CheckpointError, UsageError

transformers = pytest.importorskip("transformers")

TOL = 1e-4
HALF_MEAN_STD = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
# 'openai': transformers' defaults (quick_gelu, eps 1e-5, eos_token_id 49407); 'laion': gelu, another
# LayerNorm eps, the pre-4.31 eos_token_id 2 (argmax pooling), MLP ratios other than 4 and other head counts.
VARIANTS = {
    "openai": ({}, {}),
    "laion": ({"hidden_act": "gelu", "layer_norm_eps": 1e-3, "eos_token_id": 2, "intermediate_size": 80},
              {"hidden_act": "gelu", "layer_norm_eps": 1e-3, "intermediate_size": 48, "num_attention_heads": 4}),
}


def tiny_model(variant: str = "openai", seed: int = 0) -> "transformers.CLIPModel":
    """A CLIPModel with 2-layer towers of width 32 (vocabulary 49408 for CLIP's tokenizer); every weight random."""
    text, vision = VARIANTS[variant]
    config = transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, **text},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, **vision},
        projection_dim=16)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.normal_(1.0 if "norm" in name and name.endswith("weight") else 0.0, 0.3)
        model.logit_scale.fill_(2.0)
    return model


def save(model, folder, layout: str = "safetensors", preprocessor: dict | None = None):
    """Write `model` as transformers does: model.safetensors, sharded safetensors, or an old pytorch_model.bin,
    whole or in two shards with an index (with the position_ids buffers that old checkpoints carry)."""
    if layout in ("bin", "sharded bin"):
        model.config.save_pretrained(folder)
        state = {**model.state_dict(),
                 "text_model.embeddings.position_ids": torch.arange(77)[None],
                 "vision_model.embeddings.position_ids": torch.arange(17)[None]}
        if layout == "bin":
            torch.save(state, folder / "pytorch_model.bin")
        else:
            shards = {"pytorch_model-00001-of-00002.bin": {k: v for k, v in state.items() if k.startswith("text")},
                      "pytorch_model-00002-of-00002.bin": {k: v for k, v in state.items() if not k.startswith("text")}}
            for name, part in shards.items():
                torch.save(part, folder / name)
            index = {"weight_map": {key: name for name, part in shards.items() for key in part}}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    elif layout == "sharded":
        model.save_pretrained(folder, max_shard_size="2MB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:
        model.save_pretrained(folder)
    if preprocessor:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return folder


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    """(transformers model, its folder loaded by ovdense) for each variant."""
    model = tiny_model(request.param)
    folder = save(model, tmp_path_factory.mktemp(request.param), preprocessor=HALF_MEAN_STD)
    return model, load_clip(None, str(folder))


def pixels(height: int, width: int, mean, std, seed: int = 0) -> torch.Tensor:
    """A (2, 3, H, W) batch of random uint8 images normalised with mean / std."""
    rgb = np.random.default_rng(seed).integers(0, 256, (2, height, width, 3)).astype(np.float32) / 255
    return torch.from_numpy((rgb - np.array(mean, np.float32)) / np.array(std, np.float32)).permute(0, 3, 1, 2)


def pooled(output) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


TEXTS = ["a cat", "a photo of a small dog on the grass", "Ünïcode,  odd   SPACING & punctuation!"]


def transformers_text(model, backbone, texts) -> torch.Tensor:
    ids = backbone.tokenize(texts)  # open_clip's tokenizer: padding 0 after the end-of-text token
    return pooled(model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()))


@torch.no_grad()
def test_image_and_text_embeddings_match_transformers(pair):
    model, backbone = pair
    assert backbone.name == HF_CLIP and backbone.image_size == 32 and backbone.stride == 8
    images = pixels(32, 32, backbone.image_mean, backbone.image_std)
    expected = pooled(model.get_image_features(pixel_values=images))
    assert (backbone.encode_image(images) - expected).abs().max() < TOL
    assert (backbone.encode_text(TEXTS) - transformers_text(model, backbone, TEXTS)).abs().max() < TOL
    assert backbone.model.logit_scale.item() == pytest.approx(model.logit_scale.item())


def maskclip_reference(model, images: torch.Tensor, interpolate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MaskCLIP's dense features (and keys) from transformers' modules, after the official MaskCLIP ViT head:
    the last layer's input x; v = x + out_proj(v_proj(ln1(x))); v + mlp(ln2(v)); post-LayerNorm; projection.
    Keys: out_proj(k_proj(ln1(x))). Both (B, C, h, w)."""
    vision = model.vision_model
    hidden = vision(pixel_values=images, output_hidden_states=True, interpolate_pos_encoding=interpolate).hidden_states
    x = hidden[-2]  # (B, 1 + h*w, width): embeddings, then one entry per layer
    layer = vision.encoder.layers[-1]
    attn = layer.self_attn
    v = x + attn.out_proj(attn.v_proj(layer.layer_norm1(x)))
    v = v + layer.mlp(layer.layer_norm2(v))
    dense = model.visual_projection(vision.post_layernorm(v[:, 1:]))
    keys = attn.out_proj(attn.k_proj(layer.layer_norm1(x)))[:, 1:]
    h, w = images.shape[-2] // 8, images.shape[-1] // 8
    return (t.transpose(1, 2).reshape(len(t), -1, h, w) for t in (dense, keys))


def _interpolation_supported() -> bool:
    return "interpolate_pos_encoding" in inspect.signature(transformers.CLIPModel.get_image_features).parameters


@pytest.mark.parametrize("size", [(32, 32), (48, 40)], ids=["native", "resized"])
@torch.no_grad()
def test_maskclip_dense_features_match_transformers(pair, size):
    model, backbone = pair
    resized = size != (32, 32)
    if resized and not _interpolation_supported():
        pytest.skip("this transformers has no interpolate_pos_encoding")
    images = pixels(*size, backbone.image_mean, backbone.image_std, seed=1)
    dense = backbone.dense_features(images, "maskclip")
    features, keys = maskclip_reference(model, images, interpolate=resized)
    assert dense.features.shape == (2, 16, size[0] // 8, size[1] // 8)
    assert (dense.features - features).abs().max() < TOL
    assert (dense.keys - keys).abs().max() < TOL
    if resized:  # the positional embeddings are resized as transformers does (bicubic to the grid)
        expected = pooled(model.get_image_features(pixel_values=images, interpolate_pos_encoding=True))
        assert (backbone.encode_image(images) - expected).abs().max() < TOL


@pytest.mark.parametrize("layout", ["bin", "sharded", "sharded bin"])
@torch.no_grad()
def test_other_weight_layouts(tmp_path, layout):
    model = tiny_model(seed=1)
    backbone = load_clip(HF_CLIP, str(save(model, tmp_path, layout)))
    images = pixels(32, 32, backbone.image_mean, backbone.image_std)
    assert (backbone.encode_image(images) - pooled(model.get_image_features(pixel_values=images))).abs().max() < TOL
    assert (backbone.encode_text(TEXTS) - transformers_text(model, backbone, TEXTS)).abs().max() < TOL


def test_image_normalisation(pair, tmp_path):
    assert pair[1].image_mean == (0.5, 0.5, 0.5) and pair[1].image_std == (0.5, 0.5, 0.5)
    backbone = load_clip(None, str(save(tiny_model(), tmp_path)))  # no preprocessor_config.json: CLIP's
    assert backbone.image_mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert backbone.image_std == pytest.approx((0.26862954, 0.26130258, 0.27577711))


@torch.no_grad()
def test_precision(tmp_path):
    model = tiny_model()
    half = load_clip(None, str(save(model, tmp_path)), precision="pure_bf16")
    assert half.dtype == torch.bfloat16 and half.model.token_embedding.weight.dtype == torch.bfloat16
    images = pixels(32, 32, half.image_mean, half.image_std)
    full = pooled(model.get_image_features(pixel_values=images))
    assert (half.encode_image(images).float() - full).abs().max() < 0.05 * full.abs().max()


def test_open_clip_name_must_be_the_folders_architecture(tmp_path, tmp_path_factory):
    folder = str(save(tiny_model(), tmp_path / "clip"))
    same = {"embed_dim": 16, "quick_gelu": True,
            "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16,
                           "mlp_ratio": 2},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
                         "mlp_ratio": 2}}
    wider = {**same, "vision_cfg": {**same["vision_cfg"], "mlp_ratio": 4}}
    configs = tmp_path_factory.mktemp("hf_named_configs")
    for name, config in (("tiny-hf-same", same), ("tiny-hf-wider", wider)):
        (configs / f"{name}.json").write_text(json.dumps(config))
    import open_clip
    open_clip.add_model_config(configs)
    assert load_clip("tiny-hf-same", folder).name == "tiny-hf-same"
    with pytest.raises(UsageError, match=r"vision mlp_width 128 \(config.json: 64\)"):
        load_clip("tiny-hf-wider", folder)
    with pytest.raises(UsageError, match=r"--model ViT-B-16 is not the .*embed_dim 512 \(config.json: 16\)"):
        load_clip("ViT-B-16", folder)
    with pytest.raises(UsageError, match="brings its own weights"):
        load_clip("hf-hub:org/repo", folder)
    with pytest.raises(UsageError, match="not a folder"):
        load_clip(None, "openai")
    with pytest.raises(UsageError, match="not a folder"):
        load_clip(HF_CLIP, "random")


def _edit_weights(folder, change):
    path = folder / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def _edit_config(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


class Evil:
    pass


BROKEN = {  # how to spoil a good folder -> what the CheckpointError must say
    "missing key": (lambda f: _edit_weights(f, lambda s: s.pop("vision_model.encoder.layers.1.mlp.fc2.bias")),
                    "lack vision_model.encoder.layers.1.mlp.fc2.bias"),
    "extra key": (lambda f: _edit_weights(f, lambda s: s.update({"vision_model.head.weight": torch.zeros(2)})),
                  "have keys a CLIPModel does not have: vision_model.head.weight"),
    "shape": (lambda f: _edit_config(f, lambda c: c["vision_config"].update(intermediate_size=80)),
              r"vision_model.encoder.layers.0.mlp.fc1.weight .* has shape \(64, 32\), .* needs \(80, 32\)"),
    "siglip": (lambda f: _edit_config(f, lambda c: c.update(model_type="siglip", architectures=["SiglipModel"])),
               "describes a 'siglip' model, not a transformers CLIPModel"),
    "vision only": (lambda f: _edit_config(f, lambda c: c.update(model_type="clip_vision_model")),
                    "holds only CLIP's image tower"),
    "classifier": (lambda f: _edit_config(f, lambda c: c.update(architectures=["CLIPForImageClassification"])),
                   "describes CLIPForImageClassification, not a CLIPModel"),
    "other tokenizer": (lambda f: _edit_config(f, lambda c: c["text_config"].update(vocab_size=32000)),
                        "vocab_size 32000 .* CLIP's own BPE"),
    "other eos": (lambda f: _edit_config(f, lambda c: c["text_config"].update(eos_token_id=7)),
                  "eos_token_id 7"),
    "two activations": (lambda f: _edit_config(f, lambda c: c["vision_config"].update(hidden_act="gelu")),
                        "hidden_act 'quick_gelu' \\(text\\) and 'gelu' \\(vision\\)"),
    "bad sub-config": (lambda f: _edit_config(f, lambda c: c.update(text_config=[1])),
                       "text_config must be a JSON object"),
    "not json": (lambda f: (f / "config.json").write_text("{oops"), "cannot read .*config.json"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "has a CLIP config.json but no PyTorch weights"),
    "no config": (lambda f: (f / "config.json").unlink(), "is a folder without config.json"),
    "open_clip folder": (lambda f: ((f / "config.json").rename(f / "open_clip_config.json")),
                         "pass --model local-dir:"),
    "missing shard": (lambda f: ((f / "model.safetensors").unlink(), (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"logit_scale": "model-00002-of-00002.safetensors"}}))),
        "lists shards that are not in .*: model-00002-of-00002.safetensors"),
    "damaged": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
                "cannot load CLIP weights from .*model.safetensors: it is damaged"),
    "pickled code": (lambda f: ((f / "model.safetensors").unlink(),
                                torch.save({"logit_scale": Evil()}, f / "pytorch_model.bin")),
                     "pytorch_model.bin: it is damaged, or it holds pickled Python objects"),
    "bad preprocessor": (lambda f: (f / "preprocessor_config.json").write_text('{"image_mean": [0.5]}'),
                         "cannot read .*preprocessor_config.json: image_mean"),
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_bad_folders_are_clear_checkpoint_errors(tmp_path, broken):
    spoil, message = BROKEN[broken]
    folder = save(tiny_model(), tmp_path)
    spoil(folder)
    with pytest.raises(CheckpointError, match=message):
        load_clip(None, str(folder))


def test_nothing_is_downloaded(tmp_path, monkeypatch):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    folder = str(save(tiny_model(), tmp_path))

    def refuse(*args, **kwargs):
        raise AssertionError("load_clip opened a network connection")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert load_clip(None, folder).name == HF_CLIP


def _released(text: tuple, vision: tuple, projection: int, act: str = "quick_gelu", **extra) -> dict:
    """A config.json with the architecture numbers of a released CLIPModel: text and vision (hidden_size,
    intermediate_size, num_attention_heads, num_hidden_layers[, image_size, patch_size])."""
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size", "patch_size")
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": projection,
            "text_config": {**dict(zip(keys, text)), "hidden_act": act},
            "vision_config": {**dict(zip(keys, vision)), "hidden_act": act}, **extra}


RELEASED = {  # Hub folder -> (its config.json, the open_clip architecture it is)
    "openai/clip-vit-base-patch16": (_released((512, 2048, 8, 12), (768, 3072, 12, 12, 224, 16), 512), "ViT-B-16"),
    "openai/clip-vit-base-patch32": (_released((512, 2048, 8, 12), (768, 3072, 12, 12, 224, 32), 512), "ViT-B-32"),
    # in the old form where text_config_dict / vision_config_dict override text_config / vision_config
    "openai/clip-vit-large-patch14-336": (_released(
        (512, 2048, 8, 12), (768, 3072, 12, 12, 224, 32), 768,
        text_config_dict={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12},
        vision_config_dict={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                            "num_hidden_layers": 24, "image_size": 336, "patch_size": 14}), "ViT-L-14-336"),
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": (_released((1024, 4096, 16, 24), (1280, 5120, 16, 32, 224, 14), 1024,
                                                        "gelu"), "ViT-H-14"),
    "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k": (_released((1280, 5120, 20, 32), (1664, 8192, 16, 48, 224, 14), 1280,
                                                           "gelu"), "ViT-bigG-14"),
}


@pytest.mark.parametrize("release", list(RELEASED))
def test_released_configs_are_their_open_clip_architectures(tmp_path, release):
    from ovdense.backbones.hf_clip import check_architecture, open_clip_config, read_config
    config, name = RELEASED[release]
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = open_clip_config(read_config(tmp_path), tmp_path)
    check_architecture(name, cfg, tmp_path)  # raises UsageError on any difference
    assert cfg["quick_gelu"] == release.startswith("openai/")
    with pytest.raises(UsageError, match="is not the architecture"):
        check_architecture("ViT-B-16" if name != "ViT-B-16" else "ViT-B-32", cfg, tmp_path)


def test_a_folder_named_like_a_tag_does_not_hide_it(tmp_path, monkeypatch, tiny_model_configs):
    (tmp_path / "random").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_clip("tiny-vit", "random").weights == "random:0"
    with pytest.raises(CheckpointError, match="is a folder without config.json"):
        load_clip("tiny-vit", "./random")


def test_the_cli_segments_with_a_folder_given_as_weights_alone(tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from ovdense.cli import main
    folder = save(tiny_model(), tmp_path / "clip-folder")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    code = main(["segment", str(tmp_path / "x.png"), "--classes", "cat, dog", "--weights", str(folder),
                 "--short-side", "32", "--crop", "0", "--output", str(tmp_path / "out"), "-q"])
    assert code == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "out" / "x.json").read_text())
    assert written["model"] == "hf-clip" and written["weights"] == str(folder)
