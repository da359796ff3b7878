"""What every segmentation method gives the predictor, and how trained methods are saved and loaded.

A method splits inference so that a predictor can cache the image:
  embed_crops(crops (B, 3, H, W)) -> dict of (B, ...) tensors    depends on the pixels only
  embed_text(queries, templates, cache) -> (Q, D)                depends on the words only
  crop_logits(embedded, text, protocol) -> (B, Q, h, w)          combines the two
`scores` says what crop_logits returns: 'cosine' similarities (the predictor scales them and takes a
softmax over the queries) or per-query 'probability' masks in [0, 1] (used as they are).
"""
from __future__ import annotations

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
TABLE_ROWS = 4096  # a trained CLIP weight with more rows (its token table) is saved as the rows training changed


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
        load_trained_state(method, with_changed_rows(method, state, str(path)), str(path))
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
    whole, frozen or not. dtype: of the floating-point tensors written. A trained token table of the CLIP is written
    as the rows that changed (`changed_rows`).
    """
    state = trained_state(method)
    state.update({k: v for k, v in method.state_dict().items() if k.startswith(tuple(prefixes)) and prefixes})
    state = changed_rows(method, {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous()
                                  for k, v in state.items()})
    backbone = method.backbone
    metadata = {"method": method.name, "model": backbone.name, "weights": backbone.weights,
                "config": json.dumps(config), **({"preset": preset} if preset else {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return Path(path)


def changed_rows(method: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with each trained token table of the method's CLIP (a 2-D weight of more than TABLE_ROWS rows) replaced
    by the rows that differ, in the table's dtype, from the CLIP the method was built on: KEY@rows (R,) int64 and
    KEY@values (R, D). GLIP fine-tunes the text tower, but only the rows of the words it reads move beyond weight
    decay's float16-invisible shrinkage (48 of 49408 on the synthetic world). The table stays whole when more than
    half of it changed or that CLIP cannot be loaded again."""
    prefix = next((f"{name}." for name, module in method.named_modules() if module is method.backbone), None)
    tables = [k for k, v in state.items() if prefix and k.startswith(prefix) and v.dim() == 2 and len(v) > TABLE_ROWS]
    if not tables:
        return state
    try:
        built_on = load_clip(method.backbone.name, method.backbone.weights).state_dict()
    except (InputError, ValueError, OSError):
        return state
    state = dict(state)
    for key in tables:
        base = built_on.get(key[len(prefix):])
        if base is None or base.shape != state[key].shape:
            continue
        rows = torch.nonzero((state[key] != base.to(state[key].dtype)).any(dim=1)).squeeze(1)
        if 2 * len(rows) > len(base):
            continue
        state[f"{key}@rows"], state[f"{key}@values"] = rows, state.pop(key)[rows].contiguous()
    return state


def with_changed_rows(method: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The inverse of `changed_rows`: each KEY@rows / KEY@values pair written into a copy of the method's KEY (the
    table of the CLIP it was just built on). Raises CheckpointError naming `source` when a pair does not fit."""
    tables = {k[:-len("@rows")] for k in state if k.endswith("@rows")}
    current = method.state_dict()
    restored = {k: v for k, v in state.items() if k.rpartition("@")[0] not in tables}
    for key in sorted(tables):
        rows, values, table = state[f"{key}@rows"], state.get(f"{key}@values"), current.get(key)
        fits = (table is not None and values is not None and rows.dim() == 1 and not rows.is_floating_point()
                and values.shape == (len(rows), *table.shape[1:]) and bool(((rows >= 0) & (rows < len(table))).all()))
        if not fits:
            raise CheckpointError(f"{source} does not fit this {type(method).__name__}: its changed rows of {key} "
                                  "are not rows of that table")
        restored[key] = table.clone().index_copy_(0, rows, values.to(table.dtype))
    return restored


def read_trained(path: str | Path, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata with 'config' decoded, state dict (empty unless `tensors`)) of a file written by `save_trained`.

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
    except ValueError as error:
        raise CheckpointError(f"{path}: the method config in its metadata is not valid JSON ({error})") from error
    return metadata, state
