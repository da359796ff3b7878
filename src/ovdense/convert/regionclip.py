"""microsoft/RegionCLIP checkpoints (detectron2 .pth files, {'model': state dict}) -> ovdense.

  pretrained backbones (regionclip_pretrained-{cc,coco}_rn50{,x4}.pth): `backbone.*` is the RegionCLIP-pretrained
      image tower with OpenAI CLIP names, `lang_encoder.*` the (unchanged) CLIP text tower -> an open_clip CLIP state
      dict (`pretrained_to_clip`), usable as --weights and as a detector recipe's `init`.
  detectors (regionclip_finetuned-{coco,lvis}_rn50{,x4}.pth): `backbone.*` (res5 and the attention pool included) and
      `roi_heads.box_predictor.*` -> the image tower and box head of a RegionCLIPDetector (`detector_state`); its
      `test_cls_score` (when there) holds the test classes' embeddings.
  offline RPNs (rpn_coco_48.pth: R-50-C4; rpn_lvis_866{,_lsj}.pth: R-50-FPN; detectron2 Mask R-CNN checkpoints):
      `backbone.*` and `proposal_generator.*` -> an `OfflineRPN` (`offline_rpn_state`); their `roi_heads.*` are not
      used (RegionCLIP loads only the backbone and RPN). A detector file carries a copy as `offline_backbone.*` /
      `offline_proposal_generator.*`; the official test loads the RPN file after it, so that one wins.
  concept embeddings (coco_65_cls_emb.pth, lvis_1203_cls_emb.pth, ...): a bare (K, D) tensor, the mean over RegionCLIP's
      81 templates of the raw CLIP text embeddings of K class names.
`convert` turns a set of these files into one ovdense file.
"""
from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from ..detection.msra_resnet import STAGES
from ..errors import CheckpointError, UsageError

_PREDICTOR = "roi_heads.box_predictor."
_IGNORED = ("teacher_backbone.", "offline_backbone.", "offline_proposal_generator.", "roi_heads.mask_head.")
_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
_BN_STATS = ("running_mean", "running_var")


def _load(path: str | Path):
    """What an official .pth holds, read without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; the released checkpoints are listed in the official "
                              "repositories' MODEL_ZOO.md / README.md")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({error})") from error


def read_official(path: str | Path, key: str = "model") -> dict[str, torch.Tensor]:
    """The state dict under `key` of an official .pth (without running any pickled code)."""
    checkpoint = _load(path)
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
        raise CheckpointError(f"{source} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}, "
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
    _leftovers(state, ("backbone.", _PREDICTOR), source)
    predictor = {k[len(_PREDICTOR):]: v for k, v in state.items() if k.startswith(_PREDICTOR)}
    known = {"cls_score.weight", "cls_bg_score.weight", "test_cls_score.weight", "bbox_pred.weight", "bbox_pred.bias"}
    if set(predictor) - known or {"bbox_pred.weight", "bbox_pred.bias"} - set(predictor):
        raise CheckpointError(f"{source}: the box predictor keys {sorted(predictor)} are not RegionCLIP's "
                              "(class-agnostic bbox_pred expected)")
    if "cls_bg_score.weight" in predictor and predictor["cls_bg_score.weight"].any():
        raise CheckpointError(f"{source}: roi_heads.box_predictor.cls_bg_score.weight is not zero; RegionCLIP's "
                              "background embedding is the zero vector (its logit 0), which this detector assumes")
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


# ------------------------------------------------------------------------------------------------- offline RPNs
_RPN_FILE = ("backbone.", "proposal_generator.")  # a Mask R-CNN checkpoint: what RegionCLIP loads from it
_RPN_COPY = ("offline_backbone.", "offline_proposal_generator.")  # the copy a detector checkpoint carries
_HEAD_NAMES = {"objectness_logits": "cls_logits", "anchor_deltas": "bbox_pred"}


def offline_rpn_config(state: dict[str, torch.Tensor], prefixes: tuple[str, str] = _RPN_FILE) -> dict:
    """The `OfflineRPN` arguments an official RPN state dict implies: trunk (C4 or FPN: `bottom_up` keys), stem width,
    blocks per stage, FPN width and norm, RPN head convs. Test-time settings stay detectron2's defaults, as the
    released detectors' test configs leave them (no OFFLINE_RPN_* override)."""
    backbone, generator = prefixes
    trunk = "fpn" if any(k.startswith(f"{backbone}bottom_up.") for k in state) else "c4"
    body = f"{backbone}bottom_up." if trunk == "fpn" else backbone
    stem = state.get(f"{body}stem.conv1.weight")
    if stem is None:
        raise CheckpointError(f"no {body}stem.conv1.weight: not a detectron2 ResNet RPN checkpoint")
    counts = [len({k[len(body):].split(".")[1] for k in state if k.startswith(f"{body}{stage}.")}) for stage in STAGES]
    config = {"trunk": trunk, "width": stem.shape[0], "blocks": [c or 3 for c in counts],  # C4 stops at res4
              "head_convs": max(1, sum(1 for k in state if k.startswith(f"{generator}rpn_head.conv.conv")
                                       and k.endswith(".weight")))}
    if trunk == "fpn":
        config["fpn_channels"] = state[f"{backbone}fpn_lateral2.weight"].shape[0]
        config["fpn_norm"] = f"{backbone}fpn_lateral2.norm.weight" in state
    return config


def _rpn_name(key: str, prefixes: tuple[str, str]) -> str | None:
    """An official RPN key -> the `OfflineRPN` key, or None for what RegionCLIP does not load or recomputes."""
    backbone, generator = prefixes
    if key.endswith("num_batches_tracked"):  # SyncBN counters of the LSJ RPN: FrozenBN has none
        return None
    if key.startswith(backbone):
        return "backbone." + key[len(backbone):]
    if key.startswith(f"{generator}anchor_generator."):  # older detectron2 saved the cell anchors: checked apart
        return None
    rest = key[len(f"{generator}rpn_head."):] if key.startswith(f"{generator}rpn_head.") else None
    if rest is None:
        raise CheckpointError(f"unknown RPN key {key}")
    parts = rest.split(".")
    if parts[0] == "conv":  # one conv: conv.weight; several: conv.conv{k}.weight -> torchvision's conv.{k}.0.weight
        index = parts[1][len("conv"):] if parts[1].startswith("conv") else "0"
        return f"head.conv.{index}.0.{parts[-1]}"
    if parts[0] in _HEAD_NAMES:
        return f"head.{_HEAD_NAMES[parts[0]]}.{parts[-1]}"
    raise CheckpointError(f"unknown RPN head key {key}")


def offline_rpn_state(state: dict[str, torch.Tensor], rpn, prefixes: tuple[str, str] = _RPN_FILE,
                      source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """An official RPN state dict (keys under `prefixes`; others are not read) -> the state dict of `rpn` (an
    OfflineRPN of `offline_rpn_config(state)`), every key checked against it."""
    mapped = {}
    for key, value in state.items():
        if key.startswith(prefixes):
            name = _rpn_name(key, prefixes)
            if name is not None:
                mapped[name] = value
    for index, cells in enumerate(rpn.cells):
        saved = state.get(f"{prefixes[1]}anchor_generator.cell_anchors.{index}")
        if saved is not None and (saved.shape != cells.shape or not torch.allclose(saved, cells, atol=1e-3)):
            raise CheckpointError(f"{source}: its anchors ({prefixes[1]}anchor_generator.cell_anchors.{index}) are not "
                                  "detectron2's default sizes 32-512 x ratios 0.5, 1, 2")
    _check(mapped, rpn.state_dict(), "", f"{source} (offline RPN)")
    return mapped


# ------------------------------------------------------------------------------------------------- conversion
ARCHS = {(1024, 2048): "RN50", (640, 2560): "RN50x4"}  # attnpool.c_proj (out, in) -> open_clip architecture
TEMPLATES = "regionclip81"  # what RegionCLIP's concept-embedding files average over


def _kind(content, path: Path) -> str:
    """'embeddings', 'detector', 'rpn' or 'pretrained': what an official file is, from its content."""
    if isinstance(content, torch.Tensor):
        if content.dim() != 2:
            raise CheckpointError(f"{path}: a tensor of shape {tuple(content.shape)}; class embeddings are (K, D)")
        return "embeddings"
    state = content.get("model", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds neither a state dict of tensors nor a (K, D) class-embedding tensor")
    if f"{_PREDICTOR}bbox_pred.weight" in state:
        return "detector"
    if any(k.startswith("proposal_generator.") for k in state):
        return "rpn"
    if "backbone.attnpool.c_proj.weight" in state:
        return "pretrained"
    raise CheckpointError(f"{path} is none of RegionCLIP's files (detector, offline RPN, pretrained backbone, class "
                          "embeddings)")


def _arch(state: dict[str, torch.Tensor], model: str | None, source: str) -> str:
    if model:
        return model
    pool = state.get("backbone.attnpool.c_proj.weight")
    shape = tuple(pool.shape) if pool is not None else None
    if shape not in ARCHS:
        raise UsageError(f"{source}: an attention pool of shape {shape} is neither RN50's nor RN50x4's; name the "
                         "open_clip architecture (model=...)")
    return ARCHS[shape]


def _clip_from_pretrained(state: dict[str, torch.Tensor], arch: str, source: str):
    """A CLIPBackbone of a pretrained RegionCLIP file (image tower and its `lang_encoder` text tower)."""
    from ..backbones import CLIPBackbone
    with torch.random.fork_rng():
        model = open_clip.create_model(arch, pretrained=None)
    model.load_state_dict(pretrained_to_clip(state, model.state_dict(), source))
    return CLIPBackbone(model.eval(), open_clip.get_tokenizer(arch), arch, source)


def _text_embeddings(detector: dict[str, torch.Tensor], files: list[tuple[Path, torch.Tensor]], names: list[str],
                     text_clip, source: str) -> torch.Tensor:
    """(K, D) unit-norm embeddings of the K test classes, as RegionCLIP's test uses them: the detector's
    `test_cls_score` (loaded after the OPENSET_TEST_TEXT_EMB_PATH file, so it wins when the shapes agree), else the
    given concept-embedding file, else the mean over RegionCLIP's 81 templates of `text_clip`'s raw embeddings."""
    from ..text import TextEmbeddingCache, resolve_templates
    if len(files) > 1:
        raise UsageError(f"give one class-embedding file, not {len(files)}")
    stored = detector.get(f"{_PREDICTOR}test_cls_score.weight")
    given = files[0][1] if files else None
    if stored is not None and (given is None or given.shape == stored.shape):
        embeddings, where = stored, f"{source} ({_PREDICTOR}test_cls_score.weight)"
    elif given is not None:
        embeddings, where = given, str(files[0][0])
    else:
        if text_clip is None:
            raise UsageError("no class embeddings: give RegionCLIP's concept-embedding file (e.g. "
                             "coco_65_cls_emb.pth), the pretrained RegionCLIP file (its text tower) or text_weights "
                             "(a CLIP tag or file)")
        return TextEmbeddingCache().embed(text_clip, names, resolve_templates(TEMPLATES), raw_mean=True)
    if len(embeddings) != len(names):
        raise UsageError(f"{where} holds {len(embeddings)} class embeddings but {len(names)} class names were given; "
                         "give the names in the order the embeddings were made (RegionCLIP's "
                         "coco_zeroshot_categories.py / lvis_v1_categories.py)")
    return F.normalize(embeddings.float(), dim=-1)


SHIPPED_CLASS_LISTS = {False: "ov_coco65", True: "lvis1203"}  # the test classes in RegionCLIP's embedding order


def _class_names(class_names, lvis: bool) -> list[str]:
    """A list of names, a text file with one per line, 'a, b, c', or the name of a shipped list (ov_coco65:
    coco_zeroshot_categories.py's COCO_OVD_ALL_CLS; lvis1203: lvis_v1_categories.py by id, '_' as spaces); None: the
    shipped list of the protocol (`lvis`)."""
    from ..data.datasets import builtin_vocabulary
    from ..text import Vocabulary
    class_names = SHIPPED_CLASS_LISTS[lvis] if class_names is None else class_names
    if isinstance(class_names, str):
        if class_names in SHIPPED_CLASS_LISTS.values():
            return builtin_vocabulary(class_names).names
        vocabulary = Vocabulary.from_file(class_names) if Path(class_names).is_file() else Vocabulary.parse(class_names)
        return vocabulary.names
    return list(class_names)


def convert(paths: list[str | Path], output: str | Path, class_names=None, model: str | None = None,
            text_weights: str | None = "openai", preset: str | None = None) -> Path:
    """RegionCLIP's released files -> one ovdense file.

    paths: a detector (regionclip_finetuned-*.pth) with its offline RPN (rpn_*.pth; else the copy in the detector),
        optionally a concept-embedding file (coco_65_cls_emb.pth, ...) and a pretrained RegionCLIP file (for its text
        tower) -> a RegionCLIPDetector file (method 'regionclip', no CLIP needed: the image tower, RPN and class
        embeddings are in it), preset 'ov-coco' (C4 RPN) or 'lvis' (FPN RPN) unless `preset` says;
        or a pretrained RegionCLIP file alone -> an open_clip CLIP weights file (--weights, a recipe's init).
    class_names: the test classes, in the order of the embeddings (list, 'a, b', a file with one per line, or
        'ov_coco65' / 'lvis1203'; default: the list of the RPN's protocol).
    model: the open_clip architecture (default: RN50 / RN50x4 from the attention pool's shape).
    text_weights: the CLIP weights (tag or file) whose text tower embeds names the file has no embedding for, loaded
        only then ('openai': the tower RegionCLIP's embeddings come from); also used here when no embeddings are given.
    """
    from ..methods.regionclip import RegionCLIPDetector
    from ..presets import get_detection_protocol
    if preset is not None:
        get_detection_protocol(preset)  # a UsageError naming the presets otherwise
    files: dict[str, list] = {"embeddings": [], "detector": [], "rpn": [], "pretrained": []}
    for path in map(Path, paths):
        content = _load(path)
        kind = _kind(content, path)
        files[kind].append((path, content if kind == "embeddings" else content.get("model", content)))
    if any(len(files[k]) > 1 for k in ("detector", "rpn", "pretrained")):
        raise UsageError("give at most one detector, one offline RPN and one pretrained RegionCLIP file")
    output = Path(output)
    if not files["detector"]:
        if not files["pretrained"] or files["rpn"] or files["embeddings"]:
            raise UsageError("regionclip: give a detector (regionclip_finetuned-*.pth) with its offline RPN "
                             "(rpn_*.pth), or a pretrained RegionCLIP file (regionclip_pretrained-*.pth) alone")
        return _write_clip(*files["pretrained"][0], model, text_weights, output)
    path, detector_dict = files["detector"][0]
    arch = _arch(detector_dict, model, str(path))
    if files["rpn"]:
        rpn_path, rpn_dict, prefixes = *files["rpn"][0], _RPN_FILE
    elif any(k.startswith(_RPN_COPY[0]) for k in detector_dict):
        rpn_path, rpn_dict, prefixes = path, detector_dict, _RPN_COPY
    else:
        raise UsageError(f"{path} carries no offline RPN: give its RPN file too (rpn_coco_48.pth for OV-COCO, "
                         "rpn_lvis_866_lsj.pth for LVIS)")
    rpn_config = offline_rpn_config(rpn_dict, prefixes)
    names = _class_names(class_names, rpn_config["trunk"] == "fpn")
    text_clip = None
    if files["pretrained"]:
        text_clip = _clip_from_pretrained(files["pretrained"][0][1], arch, str(files["pretrained"][0][0]))
    elif text_weights and not files["embeddings"] and f"{_PREDICTOR}test_cls_score.weight" not in detector_dict:
        from ..backbones import load_clip
        text_clip = load_clip(arch, text_weights)
    embeddings = _text_embeddings(detector_dict, files["embeddings"], names, text_clip, str(path))
    side = math.isqrt(detector_dict["backbone.attnpool.positional_embedding"].shape[0] - 1)
    lvis = rpn_config["trunk"] == "fpn"
    detector = RegionCLIPDetector(None, names, resolution=2 * side, templates=TEMPLATES, rpn_source="offline",
                                  offline_rpn=rpn_config, stored_text=True, arch=arch, text_weights=text_weights,
                                  focal_gamma=None if lvis else 0.5, background_weight=0.8 if lvis else 0.2)
    state = detector_state(detector_dict, detector, str(path))
    state.update({f"offline_rpn.{k}": v for k, v in
                  offline_rpn_state(rpn_dict, detector.offline_rpn, prefixes, str(rpn_path)).items()})
    if embeddings.shape[1] != detector.class_embeddings.shape[1]:
        raise UsageError(f"the class embeddings have {embeddings.shape[1]} dimensions, the {arch} image tower "
                         f"{detector.class_embeddings.shape[1]}: they come from another CLIP")
    state["class_embeddings"] = embeddings
    missing, unexpected = detector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: not placed {missing[:5]}, unknown {unexpected[:5]}")
    return detector.eval().save(output, preset=preset or ("lvis" if lvis else "ov-coco"))


def _write_clip(path: Path, state: dict[str, torch.Tensor], model: str | None, text_weights: str | None,
                output: Path) -> Path:
    """A pretrained RegionCLIP file -> an open_clip CLIP weights file (safetensors); its text tower from
    `lang_encoder.*`, else from `text_weights`."""
    from safetensors.torch import save_file

    from ..io import atomic_path
    arch = _arch(state, model, str(path))
    if any(k.startswith("lang_encoder.") for k in state):
        with torch.random.fork_rng():
            reference = open_clip.create_model(arch, pretrained=None).state_dict()
    elif text_weights:
        from ..backbones import load_clip
        reference = load_clip(arch, text_weights).model.state_dict()
    else:
        raise UsageError(f"{path} has no text tower (lang_encoder.*): name the CLIP weights to take it from "
                         "(text_weights)")
    clip = pretrained_to_clip(state, reference, str(path))
    with atomic_path(output) as tmp:
        save_file({k: v.contiguous() for k, v in clip.items()}, str(tmp))
    return output
