"""`ovdense models`: the models that ship (with their recipes and figures), the authors' released ones and how to
convert them, and open_clip's architectures with their tags and dense modes."""
from __future__ import annotations

from ..catalog import DENSE_MODES, RESNET_DENSE_MODES


def add_parser(sub):
    return sub.add_parser("models", help="list the authors' released models, the shipped ones and open_clip's "
                                         "architectures, tags and dense modes")


def dense_modes_of(name: str) -> str:
    """The dense modes an open_clip architecture supports, from its config (no model is built)."""
    import open_clip
    vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
    if vision.get("timm_model_name"):
        return "none (timm image tower)"
    if isinstance(vision.get("layers"), (list, tuple)):
        return ", ".join(RESNET_DENSE_MODES)
    if vision.get("attentional_pool"):
        return "none (attention-pooled ViT)"
    return ", ".join(DENSE_MODES)


def _print_shipped() -> None:
    from ..backbones import loading  # noqa: F401  (registers the ovdense-tiny-* architectures with open_clip)
    from ..shipped import SHIPPED, SHIPPED_CLIP, SHIPPED_TAG
    print("Shipped with ovdense (offline, no download):")
    for model in SHIPPED:
        if model.kind == "clip":
            usage = f"{model.name} --weights {SHIPPED_TAG}  (dense modes: {dense_modes_of(model.name)})"
        elif model.kind == "segmenter":
            usage = f"segment --method {model.name} --weights {SHIPPED_TAG}  (on {SHIPPED_CLIP})"
        else:
            usage = f"detect --method {model.name} --weights {SHIPPED_TAG}"
        print(f"  {usage}; preset {model.preset}")
        print(f"      {model.description}")
        print(f"      {model.scores()}; measured by {model.measured_by}")
        print(f"      made by {model.command}" if model.recipe else "      training-free: nothing to train")


def run(args) -> int:
    import open_clip

    from ..zoo import RELEASES
    _print_shipped()
    print("\nThe authors' released models (download the files from the source, then convert once):")
    for release in RELEASES:
        print(f"  {release.name}: {release.method}, {release.backbone}; preset {release.preset}")
        print(f"      paper: {release.paper}")
        print(f"      files: {', '.join(release.files)} from {release.source}")
        print(f"      {release.command}")
    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    print("\nopen_clip architectures (tags download once where the internet is reachable; or --weights FILE):")
    print(f"  {'architecture':<34} {'dense modes':<40} pretrained tags")
    for name in open_clip.list_models():
        print(f"  {name:<34} {dense_modes_of(name):<40} {', '.join(tags.get(name, [])) or '-'}")
    return 0
