"""Build a `CLIPBackbone` from an open_clip architecture name and a source of weights."""
from __future__ import annotations

import difflib
import os
import zipfile
from pathlib import Path

import open_clip
import torch

from .clip import CLIPBackbone

RANDOM_WEIGHTS = "random"
_PACKAGE = Path(__file__).resolve().parent.parent
open_clip.add_model_config(_PACKAGE / "model_configs")  # the ovdense-tiny-* architectures
# Weights shipped inside the package: (architecture, tag) -> file, and the command that makes it.
PACKAGED_WEIGHTS = {
    ("ovdense-tiny-vit", "synthetic"): (_PACKAGE / "weights" / "ovdense-tiny-vit-synthetic.safetensors",
                                        "ovdense train clip --config configs/tiny_clip_vit_synthetic.yaml"),
}
_HOW_TO_GET_WEIGHTS = (
    "To use real CLIP weights either (a) run once on a machine with internet access so that open_clip "
    "caches them (e.g. `python -c \"import open_clip; open_clip.create_model('ViT-B-16', pretrained='openai')\"`) "
    "and copy the Hugging Face cache (~/.cache/huggingface) here, or (b) download a checkpoint file "
    "(OpenAI .pt, open_clip .bin or .safetensors) and pass its path as the weights, "
    "e.g. `--weights /path/to/ViT-B-16.pt`."
)


class WeightsNotFoundError(FileNotFoundError):
    """The requested CLIP weights are neither a readable file nor available offline."""


def _check_model_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return
    close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown CLIP architecture {name!r}.{hint} `ovdense models` lists them all.")


def _is_torchscript(path: Path) -> bool:
    """OpenAI's CLIP .pt files are TorchScript archives, not pickled state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _from_file(name: str, path: Path, device: str, precision: str) -> torch.nn.Module:
    if _is_torchscript(path):
        # TorchScript archives hold no Python pickle code; read the weights and build an eager model.
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True, precision=precision)
        # Scalars and causal masks stored beside the weights are not parameters of the eager model.
        extra = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
        state = {k: v for k, v in state.items() if k.split(".")[-1] not in extra}
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise ValueError(f"{path} does not hold weights for the {name} architecture: {error}") from error
        return model.to(device)
    try:
        return open_clip.create_model(name, pretrained=str(path), precision=precision, device=device,
                                      weights_only=True)
    except RuntimeError as error:
        raise ValueError(f"{path} does not hold weights for the {name} architecture: {error}") from error


def load_clip(name: str, weights: str, device: str = "cpu", precision: str = "fp32", seed: int = 0) -> CLIPBackbone:
    """Load an open_clip architecture with weights, in eval mode.

    name: an open_clip architecture ('ViT-B-16', 'RN50', ...) or 'hf-hub:org/repo' / 'local-dir:PATH'.
    weights: an open_clip pretrained tag ('openai', 'laion2b_s34b_b88k'; downloaded or read from the
        local cache), a local checkpoint file (.pt, .pth, .bin, .safetensors), or 'random' for a
        seeded random initialisation (tests, pipeline checks); 'random:SEED' (a backbone's identity)
        names the seed too.
    Raises WeightsNotFoundError, with instructions, when the weights are not available here.
    """
    _check_model_name(name)
    if weights.startswith(f"{RANDOM_WEIGHTS}:") and weights.split(":", 1)[1].isdigit():
        weights, seed = RANDOM_WEIGHTS, int(weights.split(":", 1)[1])
    kwargs = dict(precision=precision, device=device)
    if name.startswith(("hf-hub:", "local-dir:")):
        try:
            model = open_clip.create_model(name, **kwargs)
        except Exception as error:  # hub errors come in many types
            raise WeightsNotFoundError(f"could not load {name}: {error}\n{_HOW_TO_GET_WEIGHTS}") from error
    elif (name, weights) in PACKAGED_WEIGHTS:
        path, command = PACKAGED_WEIGHTS[(name, weights)]
        if not path.is_file():
            raise WeightsNotFoundError(f"the packaged weights {path.name} are missing; make them with `{command}`")
        model = _from_file(name, path, device, precision)
    elif weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None, **kwargs)
    elif Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"checkpoint file {path} does not exist.\n{_HOW_TO_GET_WEIGHTS}")
        model = _from_file(name, path, device, precision)
    else:
        tags = open_clip.list_pretrained_tags_by_model(name) + [t for n, t in PACKAGED_WEIGHTS if n == name]
        if weights not in tags:
            raise ValueError(f"{weights!r} is neither a file nor a pretrained tag of {name}; "
                             f"known tags: {', '.join(tags) or 'none'}")
        try:
            model = open_clip.create_model(name, pretrained=weights, **kwargs)
        except Exception as error:  # offline: huggingface_hub / urllib errors
            raise WeightsNotFoundError(
                f"weights {name}/{weights} are not in the local cache and could not be downloaded "
                f"({type(error).__name__}).\n{_HOW_TO_GET_WEIGHTS}") from error
    tokenizer = open_clip.get_tokenizer(name)
    identity = f"{RANDOM_WEIGHTS}:{seed}" if weights == RANDOM_WEIGHTS else str(weights)
    return CLIPBackbone(model.eval(), tokenizer, name=name, weights=identity).eval()
