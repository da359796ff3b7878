"""microsoft/RegionCLIP checkpoints (detectron2 .pth files, {'model': state dict}) -> ovdense.

  pretrained backbones (regionclip_pretrained-{cc,coco}_rn50{,x4}.pth): `backbone.*` is the RegionCLIP-pretrained
      image tower with OpenAI CLIP names, `lang_encoder.*` the (unchanged) CLIP text tower -> an open_clip CLIP state
      dict (`pretrained_to_clip`), usable as --weights and as a detector recipe's `init`.
  detectors (regionclip_finetuned-{coco,lvis}_rn50{,x4}.pth): `backbone.*` (res5 and the attention pool included) and
      `roi_heads.box_predictor.*` -> the image tower and box head of a RegionCLIPDetector (`load_official_detector`).
Their offline RPN (`offline_backbone.*`, `offline_proposal_generator.*`: a detectron2 ImageNet R50, BGR input) has no
counterpart here: the detector takes an RPN trained with `ovdense train rpn` on the CLIP's own frozen trunk.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import CheckpointError

_IGNORED = ("teacher_backbone.", "offline_backbone.", "offline_proposal_generator.", "roi_heads.mask_head.")
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_BN_STATS = ("running_mean", "running_var")


def read_official(path: str | Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The state dict under `key` of an official .pth (without running any pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the released checkpoints are listed in the official "
                              "repositories' MODEL_ZOO.md / README.md")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({error})") from error
    state = checkpoint.get(key, checkpoint if key == "model" else None) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors under {key!r}")
    return state


def _visual(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`backbone.*` -> open_clip `visual.*` names; BatchNorm counters (FrozenBN has none) are added as 0."""
    visual = {f"visual.{k[len('backbone.'):]}": v for k, v in state.items() if k.startswith("backbone.")}
    for key in reference:
        if key.startswith("visual.") and key.endswith("num_batches_tracked") and key not in visual:
            visual[key] = torch.zeros((), dtype=torch.long)
    return visual


def _check(mapped: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], prefix: str, source: str) -> None:
    """Every key of `reference` under `prefix` is in `mapped` with its shape, and `mapped` has nothing else there."""
    wanted = {k: v for k, v in reference.items() if k.startswith(prefix)}
    got = {k: v for k, v in mapped.items() if k.startswith(prefix)}
    missing, unexpected = sorted(set(wanted) - set(got)), sorted(set(got) - set(wanted))
    shapes = [f"{k} {tuple(got[k].shape)} != {tuple(wanted[k].shape)}" for k in wanted.keys() & got.keys()
              if got[k].shape != wanted[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source} does not fit this CLIP: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                              f"shapes {shapes[:3]}")


def _leftovers(state: dict[str, torch.Tensor], used: tuple[str, ...], source: str) -> None:
    unknown = sorted(k for k in state if not k.startswith(used + _IGNORED))
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; is it a "
                              "RegionCLIP checkpoint?")


def pretrained_to_clip(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], source: str = "checkpoint"
                       ) -> dict[str, torch.Tensor]:
    """A pretrained RegionCLIP state dict -> the open_clip state dict of `reference` (e.g. RN50's `state_dict()`).

    The text tower comes from `lang_encoder.*` (its logit scale, which RegionCLIP drops, is CLIP's ln 100), else
    from `reference` (RegionCLIP never trains it).
    """
    _leftovers(state, ("backbone.", "lang_encoder."), source)
    out = _visual(state, reference)
    _check(out, reference, "visual.", source)
    text = {k[len("lang_encoder."):]: v for k, v in state.items() if k.startswith("lang_encoder.")}
    for key, value in reference.items():
        if key.startswith(_TEXT_KEYS) or key in ("logit_scale", "attn_mask"):
            out[key] = text.get(key, value)
    if "logit_scale" in reference and "logit_scale" not in text:
        out["logit_scale"] = torch.tensor(math.log(100.0), dtype=reference["logit_scale"].dtype)
    _check(out, reference, "", source)
    return out


def detector_state(state: dict[str, torch.Tensor], detector, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """An official detector state dict -> the `encoder.*` and `box_head.*` entries of `detector` (a
    RegionCLIPDetector over the same CLIP architecture), all checked against it."""
    _leftovers(state, ("backbone.", "roi_heads.box_predictor."), source)
    predictor = {k[len("roi_heads.box_predictor."):]: v for k, v in state.items()
                 if k.startswith("roi_heads.box_predictor.")}
    known = {"cls_score.weight", "cls_bg_score.weight", "test_cls_score.weight", "bbox_pred.weight", "bbox_pred.bias"}
    if set(predictor) - known or {"bbox_pred.weight", "bbox_pred.bias"} - set(predictor):
        raise CheckpointError(f"{source}: the box predictor keys {sorted(predictor)} are not RegionCLIP's "
                              "(class-agnostic bbox_pred expected)")
    reference = {k[len("encoder.clip.model."):]: v for k, v in detector.state_dict().items()
                 if k.startswith("encoder.clip.model.")}
    visual = _visual(state, reference)
    _check(visual, reference, "visual.", source)
    out = {f"encoder.clip.model.{k}": v for k, v in visual.items()}
    out["box_head.weight"], out["box_head.bias"] = predictor["bbox_pred.weight"], predictor["bbox_pred.bias"]
    wanted = detector.state_dict()
    shapes = [k for k in out if out[k].shape != wanted[k].shape]
    if shapes:
        raise CheckpointError(f"{source}: shapes of {shapes[:3]} do not fit this detector")
    return out


def load_official_detector(path: str | Path, detector) -> None:
    """Load an official detector checkpoint's image tower and box head into `detector` (in place)."""
    detector.load_state_dict(detector_state(read_official(path), detector, str(path)), strict=False)
