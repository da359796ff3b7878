"""CLIP weights in the Hugging Face transformers layout (a `CLIPModel` folder) as an open_clip model.

A folder written by `CLIPModel.save_pretrained` (or downloaded from the Hub, e.g. openai/clip-vit-base-patch16)
holds config.json (model_type 'clip'), the weights (model.safetensors or pytorch_model.bin, possibly sharded with
an .index.json) and often preprocessor_config.json. The architecture comes from config.json; every weight is
placed on open_clip's `CLIP`, which then computes what transformers' `CLIPModel` computes:

* image tower: patch conv (no bias), class and positional embeddings, pre-LayerNorm, pre-norm blocks,
  post-LayerNorm on the class token, linear projection without bias;
* text tower: causal blocks, final LayerNorm, the end-of-text token pooled, linear projection without bias.

Text is tokenized by open_clip's CLIP tokenizer, the same BPE (vocabulary 49408) as transformers' CLIPTokenizer.
The end-of-text token (49407) is the largest id and the first one of its kind, so open_clip's pooling (argmax of
the ids) picks the token transformers pools, both for eos_token_id 2 (configs made before transformers 4.31: argmax)
and 49407 (the first position of that id).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import open_clip
import safetensors.torch
import torch
from open_clip.transform import PreprocessCfg

from ..errors import CheckpointError, UsageError
from .clip import CLIPBackbone
from .loading import HF_CLIP, _unreadable

# transformers' CLIPTextConfig / CLIPVisionConfig / CLIPConfig defaults, for keys a config.json leaves out
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_PROJECTION_DIM = 512
_EOS_IDS = (2, 49407)  # end-of-text pooling that open_clip's argmax reproduces with its tokenizer (module docstring)
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_IGNORED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")  # arange buffers
_BLOCK = {  # open_clip resblock key <- transformers encoder-layer keys (q, k, v: stacked into in_proj)
    "ln_1.weight": ("layer_norm1.weight",), "ln_1.bias": ("layer_norm1.bias",),
    "attn.in_proj_weight": tuple(f"self_attn.{p}_proj.weight" for p in "qkv"),
    "attn.in_proj_bias": tuple(f"self_attn.{p}_proj.bias" for p in "qkv"),
    "attn.out_proj.weight": ("self_attn.out_proj.weight",), "attn.out_proj.bias": ("self_attn.out_proj.bias",),
    "ln_2.weight": ("layer_norm2.weight",), "ln_2.bias": ("layer_norm2.bias",),
    "mlp.c_fc.weight": ("mlp.fc1.weight",), "mlp.c_fc.bias": ("mlp.fc1.bias",),
    "mlp.c_proj.weight": ("mlp.fc2.weight",), "mlp.c_proj.bias": ("mlp.fc2.bias",),
}
_OUTSIDE_BLOCKS = {  # open_clip key <- transformers key
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",  # sic: transformers' spelling
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "visual_projection.weight",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "text_projection.weight",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = ("visual.proj", "text_projection")  # nn.Linear(width, dim).weight -> (width, dim) matrices


def read_config(folder: Path) -> dict:
    """config.json of a transformers CLIPModel -> {'text': {...}, 'vision': {...}, 'projection_dim': int}, every
    architecture key present (transformers' defaults filled in; the old `*_config_dict` entries win, as there).
    Raises CheckpointError when the folder holds no CLIPModel."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind == "clip_vision_model":
        raise CheckpointError(f"{folder} holds only CLIP's image tower ({path.name}: model_type 'clip_vision_model'); "
                              f"open-vocabulary labels need the text tower too: use the full CLIPModel folder")
    if kind != "clip":
        raise CheckpointError(f"{path} describes a {kind!r} model, not a transformers CLIPModel (model_type 'clip'); "
                              f"ovdense reads CLIP folders, or open_clip ones as --model local-dir:{folder}")
    architectures = config.get("architectures") or ["CLIPModel"]
    if "CLIPModel" not in architectures:
        raise CheckpointError(f"{path} describes {', '.join(map(str, architectures))}, not a CLIPModel with both "
                              f"towers and projections")
    towers = {}
    for tower, defaults in (("text", _TEXT_DEFAULTS), ("vision", _VISION_DEFAULTS)):
        parts = [config.get(f"{tower}_config") or {}, config.get(f"{tower}_config_dict") or {}]
        if not all(isinstance(part, dict) for part in parts):
            raise CheckpointError(f"{path}: {tower}_config must be a JSON object")
        given = {**parts[0], **parts[1]}
        towers[tower] = {key: given.get(key, default) for key, default in defaults.items()}
    return {**towers, "projection_dim": config.get("projection_dim", _PROJECTION_DIM)}


def open_clip_config(config: dict, where: Path) -> dict:
    """`read_config`'s result -> the keyword arguments of open_clip's `CLIP` (embed_dim, vision_cfg, text_cfg,
    quick_gelu). Raises CheckpointError for what open_clip's CLIP or its tokenizer cannot reproduce."""
    text, vision = config["text"], config["vision"]
    if text["vocab_size"] != _TEXT_DEFAULTS["vocab_size"] or text["eos_token_id"] not in _EOS_IDS:
        raise CheckpointError(f"{where}: the text tower has vocab_size {text['vocab_size']} and eos_token_id "
                              f"{text['eos_token_id']}; ovdense tokenizes with CLIP's own BPE (vocab_size 49408, "
                              f"end of text 49407), so it cannot read this model's text")
    acts = {text["hidden_act"], vision["hidden_act"]}
    if len(acts) > 1 or not acts <= {"quick_gelu", "gelu"}:
        raise CheckpointError(f"{where}: hidden_act {text['hidden_act']!r} (text) and {vision['hidden_act']!r} "
                              f"(vision); open_clip's CLIP has one activation for both towers, 'quick_gelu' or 'gelu'")

    def common(tower: dict) -> dict:  # open_clip builds int(width * mlp_ratio) hidden units: + 0.5 keeps it exact
        width = tower["hidden_size"]
        cfg = {"width": width, "layers": tower["num_hidden_layers"],
               "mlp_ratio": (tower["intermediate_size"] + 0.5) / width}
        if tower["layer_norm_eps"] != 1e-5:  # torch's (and open_clip's) LayerNorm default
            cfg["norm_kwargs"] = {"eps": tower["layer_norm_eps"]}
        return cfg

    heads = vision["num_attention_heads"]
    return {
        "embed_dim": config["projection_dim"],
        "vision_cfg": {**common(vision), "image_size": vision["image_size"], "patch_size": vision["patch_size"],
                       "head_width": vision["hidden_size"] // heads},
        "text_cfg": {**common(text), "heads": text["num_attention_heads"],
                     "context_length": text["max_position_embeddings"], "vocab_size": text["vocab_size"]},
        "quick_gelu": acts == {"quick_gelu"},
    }


def _architecture(cfg: dict) -> dict:
    """What fixes the shapes and the computation of an open_clip CLIP config (activation aside), flattened:
    every CLIPVisionCfg / CLIPTextCfg field, the MLP width instead of its ratio, and embed_dim."""
    flat = {"embed_dim": cfg["embed_dim"]}
    for tower, cls in (("vision", open_clip.CLIPVisionCfg), ("text", open_clip.CLIPTextCfg)):
        fields = asdict(cls(**cfg[f"{tower}_cfg"]))
        fields["mlp_width"] = int(fields["width"] * fields.pop("mlp_ratio"))
        flat.update({f"{tower} {key}": value for key, value in fields.items()})
    return flat


def check_architecture(name: str, cfg: dict, folder: Path) -> None:
    """UsageError unless open_clip architecture `name` is the one config.json describes."""
    if name.startswith(("hf-hub:", "local-dir:")):
        raise UsageError(f"--model {name} brings its own weights; to use the transformers CLIP in {folder}, "
                         f"omit --model")
    reference = open_clip.get_model_config(name)
    if reference is None:
        raise UsageError(f"unknown CLIP architecture {name!r} (--model); omit --model to use the architecture "
                         f"that {folder / 'config.json'} describes")
    mine, theirs = _architecture(cfg), _architecture(reference)
    differences = [f"{key} {theirs.get(key)} (config.json: {value})" for key, value in mine.items()
                   if theirs.get(key) != value]
    if differences:
        raise UsageError(f"--model {name} is not the architecture of the CLIP in {folder}: {'; '.join(differences)}; "
                         f"omit --model to use the folder's own")


def _weight_files(folder: Path) -> list[Path]:
    """The weight files transformers would read, in its order of preference: safetensors first, sharded or not."""
    for name in _WEIGHTS:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as error:
            raise CheckpointError(f"cannot read the shard index {path}: {type(error).__name__}: {error}") from error
        files = [folder / shard for shard in dict.fromkeys(shards)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path} lists shards that are not in {folder}: {', '.join(missing)}")
        return files
    raise CheckpointError(f"{folder} has a CLIP config.json but no PyTorch weights ({', '.join(_WEIGHTS)}); copy "
                          f"the model's model.safetensors (or pytorch_model.bin) next to it")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files by its transformers name; nothing in a file is executed."""
    state = {}
    for path in _weight_files(folder):
        try:
            if path.suffix == ".safetensors":
                state.update(safetensors.torch.load_file(path, device="cpu"))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as error:  # safetensors, torch and pickle raise many types for a bad file
            raise _unreadable(path, HF_CLIP, error) from error
    return state


def _sources(target: str) -> tuple[str, ...]:
    """The transformers key(s) that make open_clip key `target` (several: q, k, v to concatenate)."""
    for prefix, tower in (("visual.transformer.resblocks.", "vision_model"), ("transformer.resblocks.", "text_model")):
        if target.startswith(prefix):
            index, rest = target[len(prefix):].split(".", 1)
            return tuple(f"{tower}.encoder.layers.{index}.{key}" for key in _BLOCK[rest])
    return (_OUTSIDE_BLOCKS[target],)


def convert_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, folder: Path
                       ) -> dict[str, torch.Tensor]:
    """transformers CLIPModel tensors -> `model`'s (open_clip CLIP) state dict. Every key is placed or is a
    position_ids buffer; CheckpointError names a missing or unknown key, or one whose shape does not fit."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    sources = {target: _sources(target) for target in expected}
    known = {key for keys in sources.values() for key in keys}
    missing = sorted(known - state.keys())
    unknown = sorted(state.keys() - known - set(_IGNORED))
    for keys, what in ((missing, "lack"), (unknown, "have keys a CLIPModel does not have:")):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            raise CheckpointError(f"the weights in {folder} {what} {shown}; they are not those of the CLIPModel "
                                  f"that its config.json describes")
    converted = {}
    for target, keys in sources.items():
        shape = expected[target]
        if target in _TRANSPOSED:
            shape = shape[::-1]
        elif len(keys) > 1:
            shape = (shape[0] // len(keys),) + shape[1:]
        for key in keys:
            if tuple(state[key].shape) != shape:
                raise CheckpointError(f"{key} in {folder} has shape {tuple(state[key].shape)}, but the CLIPModel "
                                      f"that its config.json describes needs {shape}")
        tensors = [state[key] for key in keys]
        if target in _TRANSPOSED:
            converted[target] = tensors[0].T
        else:
            converted[target] = torch.cat(tensors) if len(tensors) > 1 else tensors[0]
    return converted


def _image_normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) from preprocessor_config.json (image_mean / image_std) when there, else CLIP's."""
    path = folder / "preprocessor_config.json"
    mean, std = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    if not path.is_file():
        return mean, std
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        mean, std = config.get("image_mean", mean), config.get("image_std", std)
        if not all(len(v) == 3 and all(isinstance(x, (int, float)) for x in v) for v in (mean, std)):
            raise ValueError(f"image_mean {mean} and image_std {std} must be three numbers each")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    return tuple(map(float, mean)), tuple(map(float, std))


def _cast(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """open_clip's precisions: 'fp16' / 'bf16' as OpenAI (LayerNorms in fp32), 'pure_*' everything, else fp32."""
    dtype = torch.bfloat16 if "bf16" in precision else torch.float16
    if precision in ("fp16", "bf16"):
        open_clip.convert_weights_to_lp(model, dtype=dtype)
    elif precision in ("pure_fp16", "pure_bf16"):
        model.to(dtype=dtype)
    return model


def load_hf_clip(name: str | None, weights: str, device: str = "cpu", precision: str = "fp32") -> CLIPBackbone:
    """The CLIP of a transformers CLIPModel folder as a CLIPBackbone, in eval mode.

    name: None or 'hf-clip' (the architecture of the folder's config.json; the backbone is named 'hf-clip'), or an
        open_clip architecture, which must be that one (UsageError otherwise; the backbone keeps the name).
    weights: the folder (config.json, model.safetensors or pytorch_model.bin, optional preprocessor_config.json).
    """
    folder = Path(weights).expanduser()
    if not folder.is_dir():
        raise UsageError(f"--weights {weights} is not a folder: without --model (or with --model {HF_CLIP}) the "
                         f"weights must be a transformers CLIP folder (config.json, model.safetensors); otherwise "
                         f"pass --model (`ovdense models` lists the architectures)")
    if not (folder / "config.json").is_file():
        hint = (f"; it is an open_clip folder: pass --model local-dir:{folder}"
                if (folder / "open_clip_config.json").is_file() else "")
        raise CheckpointError(f"{folder} is a folder without config.json: pass the checkpoint file itself, or a "
                              f"transformers CLIPModel folder (config.json, model.safetensors){hint}")
    config = read_config(folder)
    cfg = open_clip_config(config, folder / "config.json")
    if name not in (None, HF_CLIP):
        check_architecture(name, cfg, folder)
    state = read_weights(folder)
    model = open_clip.CLIP(**cfg, cast_dtype=open_clip.get_cast_dtype(precision))
    model.load_state_dict(convert_state_dict(state, model, folder))
    mean, std = _image_normalisation(folder)
    open_clip.set_model_preprocess_cfg(model, asdict(PreprocessCfg(size=model.visual.image_size, mean=mean, std=std)))
    model = _cast(model, precision).to(device).eval()
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return CLIPBackbone(model, tokenizer, name=name or HF_CLIP, weights=str(weights)).eval()
