"""Build a `CLIPBackbone` from an open_clip architecture name and a source of weights."""
from __future__ import annotations

import collections
import difflib
import io
import os
import pickle
import socket
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub
import open_clip
import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, UsageError
from ..shipped import SHIPPED_TAG, shipped
from .clip import CLIPBackbone

RANDOM_WEIGHTS = "random"
HF_CLIP = "hf-clip"  # the architecture of a transformers CLIPModel folder given as the weights (hf_clip.py)
_PACKAGE = Path(__file__).resolve().parent.parent
open_clip.add_model_config(_PACKAGE / "model_configs")  # the ovdense-tiny-* architectures

_HOW_TO_GET_WEIGHTS = (
    "To use real CLIP weights either (a) run once on a machine with internet access so that open_clip "
    "caches them (e.g. `python -c \"import open_clip; open_clip.create_model('ViT-B-16', pretrained='openai')\"`) "
    "and copy the Hugging Face cache (~/.cache/huggingface) here, or (b) download a checkpoint file "
    "(OpenAI .pt, open_clip .bin or .safetensors) and pass its path as the weights, "
    "e.g. `--weights /path/to/ViT-B-16.pt`. Offline, the CLIP that ships with ovdense needs no download "
    "(leave out --model and --weights)."
)
_OFFLINE_VALUES = ("1", "on", "yes", "true")


def _host_reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to host:443 opens within `timeout` seconds (one try, no retries)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_tag_available(name: str, tag: str) -> None:
    """Fail at once, before open_clip's downloader and its retries, when the weights of open_clip tag `tag` are not
    in the local caches and cannot be downloaded (HF_HUB_OFFLINE set, or the host unreachable)."""
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    config = open_clip.get_pretrained_cfg(name, tag)
    repo, filename = os.path.split(config.get("hf_hub", ""))
    if repo:
        for candidate in ([filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]):
            if isinstance(huggingface_hub.try_to_load_from_cache(repo, candidate), str):
                return
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    else:
        url = config.get("url", "")
        if not url or (Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(url).path)).is_file():
            return
        host = urlparse(url).hostname
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFFLINE_VALUES:
        why = "HF_HUB_OFFLINE is set"
    elif not _host_reachable(host):
        why = f"{host} cannot be reached from here"
    else:
        return
    raise WeightsNotFoundError(f"CLIP weights {name}/{tag} are not in the local cache and {why}. {_HOW_TO_GET_WEIGHTS}")


class WeightsNotFoundError(CheckpointError, FileNotFoundError):
    """The requested CLIP weights are neither a readable file nor available offline."""


def _check_model_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return
    close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UsageError(f"unknown CLIP architecture {name!r} (--model).{hint} `ovdense models` lists them all.")


def _is_torchscript(path: Path) -> bool:
    """OpenAI's CLIP .pt files are TorchScript archives, not pickled state dicts."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


_STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                   "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}


class _ScriptObject:
    """Stands for a TorchScript module in an archive's data.pkl; keeps its attributes, runs none of its code."""

    def __setstate__(self, state):
        self.state = state


class _WeightsUnpickler(pickle.Unpickler):
    """Reads a TorchScript archive's data.pkl allowing only modules (as _ScriptObject), tensors and storages."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    def persistent_load(self, pid):
        """('storage', dtype, key, location, numel) -> (the bytes of data/KEY as an untyped storage, dtype)."""
        _, dtype, key, _, _ = pid
        if key not in self.storages:  # tensors that share a storage share it here too
            data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            self.storages[key] = torch.frombuffer(data, dtype=torch.uint8).untyped_storage() if data \
                else torch.UntypedStorage(0)
        return self.storages[key], dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
    """torch._utils._rebuild_tensor_v2 for a (storage, dtype) from persistent_load; set_ checks the bounds."""
    untyped, dtype = storage
    return torch.empty(0, dtype=dtype).set_(untyped, offset, size, stride)


def _torchscript_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a TorchScript archive by attribute path, read without torch.jit.load, which would run
    the archive's TorchScript code (e.g. a crafted __setstate__) while loading."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            raise ValueError("the archive has no data.pkl")
        root = _WeightsUnpickler(archive, pickles[0].rsplit("/", 1)[0]).load()
    state, stack, seen = {}, [("", root)], set()
    while stack:
        name, obj = stack.pop()
        if id(obj) in seen or not isinstance(getattr(obj, "state", None), dict):
            continue  # a module met twice (a crafted cycle), or one with a custom __getstate__
        seen.add(id(obj))
        for key, value in obj.state.items():
            if isinstance(value, torch.Tensor):
                state[name + key] = value
            elif isinstance(value, _ScriptObject):
                stack.append((f"{name}{key}.", value))
    return state


def _from_file(name: str, path: Path, device: str, precision: str) -> torch.nn.Module:
    """The `name` architecture with the weights of checkpoint file `path` (OpenAI TorchScript .pt, open_clip
    .pt/.bin state dict, .safetensors); nothing in the file is executed. Raises CheckpointError naming the
    file when it is empty, damaged, not a weights file, or holds weights of another architecture."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); download or copy it again")
    try:
        if _is_torchscript(path):
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=True, precision=precision)
            # Scalars and causal masks stored beside the weights are not parameters of the eager model.
            extra = {"input_resolution", "context_length", "vocab_size", "attn_mask"}
            weights = _torchscript_weights(path)
            model.load_state_dict({k: v for k, v in weights.items() if k.split(".")[-1] not in extra})
        else:  # open_clip reads it with torch.load(weights_only=True) or safetensors and converts the keys
            model = open_clip.create_model(name, pretrained=str(path), precision=precision, weights_only=True)
    except Exception as error:  # torch, open_clip, zipfile and safetensors raise a dozen types for a bad file;
        raise _unreadable(path, name, error) from error  # on the CPU, only the file (or memory) can fail here
    return model.to(device)


def _unreadable(path: Path, name: str, error: Exception) -> CheckpointError:
    """One CheckpointError with a reason for whatever reading weights file `path` for `name` raised."""
    if isinstance(error, pickle.UnpicklingError):
        reason = ("it is damaged, or it holds pickled Python objects besides tensors, which are not loaded "
                  "because unpickling them could run arbitrary code")
    elif (recorded := recorded_architecture(str(path))) not in (None, name):
        reason = f"it holds the weights of {recorded}, not of {name}; pass --model {recorded} (or leave --model out)"
    elif isinstance(error, RuntimeError) and "state_dict" in str(error):
        reason = f"its weights are not those of the {name} architecture; check the architecture name"
    else:
        reason = "it is damaged, truncated, or not a weights file"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):  # keep what was refused, not torch's advice
        lines = lines[-2:-1]
    detail = " ".join(" ".join(lines).split())
    detail = f"{type(error).__name__}: {detail[:200]}{'...' if len(detail) > 200 else ''}"
    return CheckpointError(f"cannot load CLIP weights from {path}: {reason} ({detail})")


def recorded_architecture(weights: str) -> str | None:
    """The open_clip architecture that a CLIP weights file records ('model' in the metadata of the .safetensors files
    `ovdense train clip` writes), or None (not such a file, or unreadable: loading it will say why)."""
    path = Path(weights).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError):
        return None
    return metadata.get("model") if "method" not in metadata else None  # a method's file is no CLIP's


def is_model_folder(weights: str) -> bool:
    """Whether `weights` names a folder, which only a transformers CLIPModel folder may be (hf_clip.py): its
    config.json gives the architecture, so --model may be left out (the CLI passes None). A bare word such as
    'random' or 'openai' is a folder only if it holds a config.json: a same-named folder does not hide the tag."""
    path = Path(weights).expanduser()
    return path.is_dir() and (os.sep in weights or (path / "config.json").is_file())


def load_clip(name: str | None, weights: str, device: str = "cpu", precision: str = "fp32", seed: int = 0
              ) -> CLIPBackbone:
    """Load an open_clip architecture with weights, in eval mode.

    name: an open_clip architecture ('ViT-B-16', 'RN50', ...) or 'hf-hub:org/repo' / 'local-dir:PATH';
        None or 'hf-clip' when `weights` is a transformers CLIP folder, whose config.json gives it.
    weights: an open_clip pretrained tag ('openai', 'laion2b_s34b_b88k'; downloaded or read from the
        local cache), a local checkpoint file (.pt, .pth, .bin, .safetensors), a transformers CLIPModel
        folder (config.json, model.safetensors: see hf_clip.py), or 'random' for a seeded random
        initialisation (tests, pipeline checks); 'random:SEED' (a backbone's identity) names the seed too.
    Raises WeightsNotFoundError, with instructions, when the weights are not available here.
    """
    if name in (None, HF_CLIP) or is_model_folder(weights):
        from .hf_clip import load_hf_clip  # imported here: hf_clip uses this module's helpers
        return load_hf_clip(name, weights, device, precision)
    _check_model_name(name)
    if weights.startswith(f"{RANDOM_WEIGHTS}:") and weights.split(":", 1)[1].isdigit():
        weights, seed = RANDOM_WEIGHTS, int(weights.split(":", 1)[1])
    kwargs = dict(precision=precision, device=device)
    if name.startswith(("hf-hub:", "local-dir:")):
        try:
            model = open_clip.create_model(name, **kwargs)
        except Exception as error:  # hub errors come in many types
            raise WeightsNotFoundError(f"could not load {name}: {error}. {_HOW_TO_GET_WEIGHTS}") from error
    elif (packaged := shipped("clip", name, weights)) is not None:
        path, command = packaged.path, packaged.command
        if not path.is_file():
            raise WeightsNotFoundError(f"the packaged weights {path.name} are missing (reinstall ovdense); to make "
                                       f"them, run `{command} --output runs/clip` and copy runs/clip/{path.name} "
                                       f"into {path.parent} by hand")
        model = _from_file(name, path, device, precision)
    elif weights == RANDOM_WEIGHTS:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None, **kwargs)
    elif Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors") or os.sep in weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"checkpoint file {path} does not exist. {_HOW_TO_GET_WEIGHTS}")
        model = _from_file(name, path, device, precision)
    else:
        tags = open_clip.list_pretrained_tags_by_model(name) + [SHIPPED_TAG] * bool(shipped("clip", name))
        if weights not in tags:
            raise ValueError(f"{weights!r} is neither a file nor a pretrained tag of {name}; "
                             f"known tags: {', '.join(tags) or 'none'}")
        _check_tag_available(name, weights)
        try:
            model = open_clip.create_model(name, pretrained=weights, **kwargs)
        except Exception as error:  # huggingface_hub / urllib errors
            raise WeightsNotFoundError(
                f"weights {name}/{weights} are not in the local cache and could not be downloaded "
                f"({type(error).__name__}). {_HOW_TO_GET_WEIGHTS}") from error
    tokenizer = open_clip.get_tokenizer(name)
    identity = f"{RANDOM_WEIGHTS}:{seed}" if weights == RANDOM_WEIGHTS else str(weights)
    return CLIPBackbone(model.eval(), tokenizer, name=name, weights=identity).eval()
