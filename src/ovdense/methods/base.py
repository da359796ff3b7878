"""What every segmentation method gives the predictor, and how trained methods are saved and loaded.

A method splits inference so that a predictor can cache the image:
  embed_crops(crops (B, 3, H, W)) -> dict of (B, ...) tensors    depends on the pixels only
  embed_text(queries, templates, cache) -> (Q, D)                depends on the words only
  crop_logits(embedded, text, protocol) -> (B, Q, h, w)          combines the two
`scores` says what crop_logits returns: 'cosine' similarities (the predictor scales them and takes a
softmax over the queries) or per-query 'probability' masks in [0, 1] (used as they are).
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..backbones import CLIPBackbone, load_clip
from ..errors import CheckpointError, InputError
from ..io import atomic_path
from ..state import load_trained_state, trained_state
from ..text import TextEmbeddingCache


NO_CLIP = "none"  # the recorded model of a method built without a CLIP (GLIP-T: Swin-T and BERT are in its file)


class TrainedModel:
    """What trained models share: `name`, `backbone` (the CLIP they were built on) and the constructor arguments
    besides it in `self.config`; `saved_prefixes`: frozen parts saved all the same (they do not come from the CLIP)."""

    saved_prefixes: tuple[str, ...] = ()

    def save(self, path: str | Path, preset: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
        """Write the trained weights (not the frozen CLIP), the constructor arguments and the recommended inference
        preset (used when a user names none) as safetensors; `dtype` torch.float16 halves the file (shipped
        models)."""
        return save_trained(self, path, self.config, preset, self.saved_prefixes, dtype)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", weights: str | None = None, **overrides):
        """Rebuild a saved method: its CLIP from the recorded name and weights (or `weights`), then the
        trained weights. overrides: constructor arguments to change (e.g. kp_weight=0, inference='score_map')."""
        metadata, state = read_trained(path)
        if metadata["method"] != cls.name:
            raise CheckpointError(f"{path} holds a {metadata['method']} model, not {cls.name}: pass "
                                  f"--method {metadata['method']}")
        backbone = None if metadata["model"] == NO_CLIP else load_clip(metadata["model"], weights or metadata["weights"],
                                                                        device=device)
        method = cls(backbone, **cls.restore_arguments({**metadata["config"], **overrides}))
        state = with_changed_rows(method, state, metadata["changed_rows"], str(path))
        load_trained_state(method, state, str(path))
        return method.to(device).eval()

    @classmethod
    def restore_arguments(cls, config: dict) -> dict:
        """The constructor arguments that rebuild a saved method from its recorded `config` (e.g. without
        downloading weights the file holds)."""
        return config


class DenseMethod(TrainedModel, nn.Module):
    """Base class: a CLIP backbone, cached template-averaged text embeddings, cosine scores."""

    name = "method"
    scores = "cosine"
    mode: str | None = None
    pamr_on_masks = False  # True: crop_logits runs PAMR on each crop's masks itself (protocol.pamr_at == 'mask')
    min_crop_patches = 1  # crops are padded to at least this many patches a side (a head that pools needs more)

    def __init__(self, backbone: CLIPBackbone):
        super().__init__()
        self.backbone = backbone

    def score_kind(self, protocol) -> str:
        """What crop_logits returns under `protocol`: 'cosine', 'logits' or 'probability'."""
        return self.scores

    def embed_text(self, queries: list[str], templates: tuple[str, ...], cache: TextEmbeddingCache) -> torch.Tensor:
        """(Q,) names -> (Q, D) unit-norm text embeddings averaged over `templates`."""
        return cache.embed(self.backbone, queries, templates)


def save_trained(method: nn.Module, path: str | Path, config: dict, preset: str | None = None,
                 prefixes: tuple[str, ...] = (), dtype: torch.dtype = torch.float32) -> Path:
    """Write the trainable weights and the buffers (e.g. BatchNorm statistics) of `method`, not its frozen
    CLIP weights, and how to rebuild it, as safetensors.

    config: the constructor arguments of the method besides the backbone. prefixes: state-dict prefixes saved
    whole, frozen or not. dtype: of the floating-point tensors written. A trained token table of the CLIP (not under
    `prefixes`) is written as the rows that changed (`changed_rows`).
    """
    state = trained_state(method)
    state.update({k: v for k, v in method.state_dict().items() if k.startswith(tuple(prefixes)) and prefixes})
    state, fingerprints = changed_rows(method, {k: v.detach().cpu().to(dtype if v.is_floating_point() else v.dtype)
                                                .contiguous() for k, v in state.items()}, tuple(prefixes))
    backbone = method.backbone
    metadata = {"method": method.name, "model": backbone.name, "weights": backbone.weights,
                "config": json.dumps(config), **({"preset": preset} if preset else {}),
                **({"changed_rows": json.dumps(fingerprints)} if fingerprints else {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def changed_rows(method: nn.Module, state: dict[str, torch.Tensor], keep: tuple[str, ...] = ()
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`state` with each trained token table of the method's CLIP (an nn.Embedding weight; none under the prefixes
    `keep`, saved whole) replaced by the rows that differ, in the state's dtype, from the CLIP the method was built
    on: KEY@rows (R,) int64 and KEY@values (R, D); and {KEY: `fingerprint` of that CLIP's table}, which the file
    records so that loading onto another table fails. GLIP fine-tunes the text tower, but only the rows of the words
    it reads move beyond weight decay's float16-invisible shrinkage (48 of 49408 on the synthetic world). A table
    stays whole when more than half of it changed or that CLIP cannot be loaded again."""
    backbone = method.backbone
    prefix = next((f"{name}." for name, module in method.named_modules() if module is backbone), None)
    tables = [f"{name}.weight" for name, module in method.named_modules() if isinstance(module, nn.Embedding)
              and prefix and name.startswith(prefix) and not name.startswith(keep) and f"{name}.weight" in state]
    if not tables:
        return state, {}
    try:
        built_on = load_clip(backbone.name, backbone.weights).state_dict()
    except (InputError, ValueError, OSError):
        return state, {}
    state, fingerprints = dict(state), {}
    for key in tables:
        base = built_on[key[len(prefix):]].to(state[key].dtype)
        rows = torch.nonzero((state[key] != base).any(dim=1)).squeeze(1)
        if 2 * len(rows) <= len(base):
            state[f"{key}@rows"], state[f"{key}@values"] = rows, state.pop(key)[rows].contiguous()
            fingerprints[key] = fingerprint(base)
    return state, fingerprints


def fingerprint(table: torch.Tensor) -> str:
    """The sha256 of a tensor's bytes (hex)."""
    return hashlib.sha256(table.detach().cpu().contiguous().view(torch.uint8).numpy()).hexdigest()


def with_changed_rows(method: nn.Module, state: dict[str, torch.Tensor], fingerprints: dict[str, str],
                      source: str) -> dict[str, torch.Tensor]:
    """The inverse of `changed_rows`: each KEY@rows / KEY@values pair written into a copy of the method's KEY (the
    table of the CLIP it was just built on, which must have the recorded fingerprint). Raises CheckpointError
    naming `source` when a pair does not fit or the CLIP is not the one the file was trained on."""
    tables = {k.rpartition("@")[0] for k in state if "@" in k}
    current = method.state_dict()
    restored = {k: v for k, v in state.items() if "@" not in k}
    for key in sorted(tables):
        rows, values, table = state.get(f"{key}@rows"), state.get(f"{key}@values"), current.get(key)
        missing = [part for part, there in (("@rows", rows is not None), ("@values", values is not None),
                                            ("fingerprint", key in fingerprints)) if not there]
        if missing:
            raise CheckpointError(f"{source} is damaged: the changed rows of {key} lack their {', '.join(missing)}")
        if (table is None or rows.dtype != torch.int64 or rows.dim() != 1
                or values.shape != (len(rows), *table.shape[1:])):
            raise CheckpointError(f"{source} does not fit this {type(method).__name__}: its changed rows of {key} "
                                  f"({tuple(values.shape)}) are not rows of a table of that name")
        if not bool(((rows >= 0) & (rows < len(table))).all()):
            raise CheckpointError(f"{source} is damaged: a changed row of {key} lies outside the table")
        if fingerprint(table.to(values.dtype)) != fingerprints[key]:
            raise CheckpointError(f"{source} stores only the rows of {key} that training changed; the other rows come "
                                  "from the CLIP it was trained on, and the CLIP given is another: leave out --weights "
                                  "(or pass the weights the file records)")
        restored[key] = table.clone().index_copy_(0, rows.to(table.device), values.to(table.device, table.dtype))
    return restored


def read_trained(path: str | Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata with 'config' and 'changed_rows' decoded, state dict (empty unless `tensors`; a token table may be
    KEY@rows / KEY@values, see `changed_rows`)) of a file written by `save_trained`.

    Raises CheckpointError naming the file when it is missing, a folder, not a safetensors file (a pickle is
    never unpickled), damaged, or a safetensors file without ovdense's method metadata.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; pass the method checkpoint file (.safetensors) itself")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; make one with `ovdense train METHOD --config "
                              "RECIPE` (recipes in configs/) or `ovdense convert METHOD FILE` from the authors' "
                              "released files (`ovdense models` lists them)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()} if tensors else {}
    except (SafetensorError, OSError) as error:
        if zipfile.is_zipfile(path):  # torch.save's format: most likely a run's last.pt
            raise CheckpointError(f"{path} is a training-state file (like a run's last.pt), not a method checkpoint: "
                                  "pass the .safetensors file that `ovdense train` exports when the run finishes"
                                  ) from error
        raise CheckpointError(f"{path} is not a readable method checkpoint: it must be a complete safetensors "
                              f"file written by `ovdense train` ({error})") from error
    missing = [key for key in ("method", "model", "weights") if key not in metadata]
    if missing:
        raise CheckpointError(f"{path} is not an ovdense method checkpoint (its metadata lacks "
                              f"{', '.join(missing)}); CLIP weights go to --weights, not --checkpoint")
    try:
        metadata["config"] = json.loads(metadata.get("config", "{}"))
        metadata["changed_rows"] = json.loads(metadata.get("changed_rows", "{}"))
    except ValueError as error:
        raise CheckpointError(f"{path}: the method config or changed rows in its metadata are not valid JSON "
                              f"({error})") from error
    return metadata, state
