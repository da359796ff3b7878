"""Train a tiny CLIP from scratch on the synthetic world's captions, and measure it zero-shot on object crops and
on the objects' regions of its dense map."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..backbones import CLIPBackbone
from ..backbones.loading import RANDOM_WEIGHTS, load_clip
from ..data.export import scene_index
from ..data.images import to_tensor
from ..data.synthetic import COLOURS, SyntheticWorld
from ..errors import InputError
from ..io import atomic_path
from ..text import TextEmbeddingCache
from . import checks
from .recipe import Recipe, check_clip, check_world, finish_run, run_paths, validated
from .trainer import Trainer, check_resume


CLOSE_UP_VIEWS = ("centred", "anywhere")
TOKEN_READOUTS = ("plain", "maskclip")


def crop_window(image_size: tuple[int, int], box: list[int], margin: float = 0.25) -> tuple[int, int, int, int]:
    """The window [x0, y0, x1, y1) of a square crop centred on `box` ([x0, y0, x1, y1)), `margin` of its longer side
    on each side, clipped to the (height, width) image."""
    height, width = image_size
    x0, y0, x1, y1 = box
    half = (0.5 + margin) * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return max(0, int(cx - half)), max(0, int(cy - half)), min(width, int(cx + half) + 1), min(height, int(cy + half) + 1)


def object_crop(image: np.ndarray, box: list[int], margin: float = 0.25) -> np.ndarray:
    """A square crop of `image` centred on `box` ([x0, y0, x1, y1)), `margin` of its longer side on each side."""
    x0, y0, x1, y1 = crop_window(image.shape[:2], box, margin)
    return image[y0:y1, x0:x1]


def anywhere_window(image_size: tuple[int, int], box: list[int], rng: np.random.Generator,
                    fill: tuple[float, float] = (0.35, 0.9)) -> tuple[int, int, int, int]:
    """A square window [x0, y0, x1, y1) that holds `box` whole at a random place, the box's longer side a random
    `fill` fraction of the window's side (less when the image is too small for that)."""
    height, width = image_size
    x0, y0, x1, y1 = box
    side = int(min(height, width, max(x1 - x0, y1 - y0) / rng.uniform(*fill)))
    left = int(rng.integers(max(0, x1 - side), max(0, x1 - side, min(x0, width - side)) + 1))
    top = int(rng.integers(max(0, y1 - side), max(0, y1 - side, min(y0, height - side)) + 1))
    return left, top, left + side, top + side


class SyntheticCaptions(torch.utils.data.Dataset):
    """Item i: (image (3, S, S) normalised, caption string, token target (S, S) bool, subject (3,) int64, named (P,)
    int8) from train scene i // k (k items per scene); S is `image_size` (default: the world's size).

    Most items are the whole scene with one of its captions; a `close_ups` fraction are close-up views (chosen
    deterministically from i). A `stuff_close_ups` fraction of those show a window mostly inside one stuff region,
    captioned "a photo of grass."; the others show one thing, captioned "a photo of a red star." (or, a
    `shape_captions` fraction of them, "a photo of a star."): `views` "centred" crops around it (10-40% margins),
    "anywhere" puts it anywhere in a square window whose side its box's longer side fills a random `fill` fraction
    of (`anywhere_window`; things in whole scenes fill 28-52% of it, with their neighbours in view).
    The token target marks the pixels of the close-up's base thing or stuff (what a train label map shows); it is
    empty for whole scenes and for novel things, which the world shows in captions only. The subject says what a
    close-up shows and what its caption says of it: its world class, its colour and the colour the caption names
    (indices into world.classes and COLOURS; -1 for none: whole scenes, stuff, shape-only captions); `true_of`.
    `named` is for whole scenes, read from their captions' words: over the P = classes x colours things
    (`phrase_text`), 2 marks one thing that the item's caption names, 1 the others that the scene's captions name;
    all 0 for close-ups. Scenes are generated on first use and kept in memory.
    """

    def __init__(self, world: SyntheticWorld, scenes: int, captions_per_scene: int = 3, split: str = "train",
                 close_ups: float = 0.0, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD,
                 image_size: int | None = None, views: str = "centred", stuff_close_ups: float = 0.0,
                 shape_captions: float = 0.0, fill: tuple[float, float] = (0.35, 0.9)):
        self.world, self.scenes, self.k, self.split = world, scenes, captions_per_scene, split
        self.image_size = image_size or world.size[0]
        self.close_ups, self.mean, self.std, self.views = close_ups, mean, std, views
        self.stuff_close_ups, self.shape_captions, self.fill = stuff_close_ups, shape_captions, fill
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, list[str], list]] = {}

    def __len__(self) -> int:
        return self.scenes * self.k

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str, torch.Tensor, torch.Tensor, torch.Tensor]:
        scene_id, caption_id = divmod(index, self.k)
        if scene_id not in self._cache:
            scene = self.world.scene(scene_index(self.split, scene_id))
            things = [[thing_index(self.world, p.category, scene.objects[p.objects[0]].colour)
                       for p in c.phrases if p.objects] for c in scene.captions]  # what each caption names
            self._cache[scene_id] = (scene.image, scene.semantic.astype(np.uint8), [c.text for c in scene.captions],
                                     [(o.box, o.category, o.colour, o.mask) for o in scene.objects], things)
        image, semantic, captions, objects, things = self._cache[scene_id]
        rng = np.random.default_rng([index, 17])
        subject = [-1, -1, -1]
        named = torch.zeros(len(self.world.classes) * len(COLOURS), dtype=torch.int8)
        if rng.random() >= self.close_ups:
            window, caption, target = (0, 0, image.shape[1], image.shape[0]), captions[caption_id % len(captions)], None
            named[[t for said in things for t in said]] = 1
            said = things[caption_id % len(captions)]
            named[said[int(rng.integers(len(said)))]] = 2
        elif self.stuff_close_ups and rng.random() < self.stuff_close_ups:  # no draw without: older recipes' data
            window, subject[0] = self._stuff_close_up(semantic, rng)
            caption, target = f"a photo of {self.world.classes[subject[0]]}.", semantic == subject[0]
        else:
            box, category, colour, mask = objects[int(rng.integers(len(objects)))]
            if self.views == "centred":
                window = crop_window(image.shape[:2], box, margin=rng.uniform(0.1, 0.4))
            else:
                window = anywhere_window(image.shape[:2], box, rng, self.fill)
            said = not rng.random() < self.shape_captions
            caption = photo_caption(f"{colour} {category}" if said else category)
            target = None if category in self.world.novel else mask
            paint = list(COLOURS).index(colour)
            subject = [self.world.classes.index(category), paint, paint if said else -1]
        x0, y0, x1, y1 = window
        size = (self.image_size, self.image_size)
        if target is None:
            target = torch.zeros(size, dtype=torch.bool)
        else:
            target = torch.from_numpy(target[y0:y1, x0:x1]).float()[None, None]
            target = F.interpolate(target, size=size, mode="nearest")[0, 0].bool()
        return (to_tensor(image[y0:y1, x0:x1], self.mean, self.std, self.image_size), caption, target,
                torch.tensor(subject), named)

    def _stuff_close_up(self, semantic: np.ndarray, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], int]:
        """A square window (30-60% of the image's short side) around one of 8 random pixels of a random stuff class
        of the scene, the one that holds most of its pixels, and that class."""
        height, width = semantic.shape
        present = [c for c in np.unique(semantic) if self.world.classes[c] in self.world.stuff]
        label = int(present[int(rng.integers(len(present)))])
        region = semantic == label
        side = int(min(height, width) * rng.uniform(0.3, 0.6))
        ys, xs = np.nonzero(region)
        picks = rng.integers(len(ys), size=8)
        places = [(min(max(0, int(xs[k]) - side // 2), width - side),
                   min(max(0, int(ys[k]) - side // 2), height - side)) for k in picks]
        x0, y0 = max(places, key=lambda p: region[p[1]:p[1] + side, p[0]:p[0] + side].sum())
        return (x0, y0, x0 + side, y0 + side), label


def photo_caption(name: str) -> str:
    """'red star' -> 'a photo of a red star.' (the close-ups' captions; 'an' before a vowel)."""
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}."


def thing_index(world: SyntheticWorld, category: str, colour: str) -> int:
    """A {colour} {category} thing -> its index among the world's classes x COLOURS (`phrase_text`)."""
    return world.classes.index(category) * len(COLOURS) + list(COLOURS).index(colour)


def phrase_text(world: SyntheticWorld, index: int) -> str:
    """`thing_index` -> the close-up caption that names that thing: 'a photo of a red star.'."""
    category, colour = divmod(index, len(COLOURS))
    return photo_caption(f"{list(COLOURS)[colour]} {world.classes[category]}")


def caption_batch(items, tokenizer, world: SyntheticWorld, phrases: bool = False) -> tuple:
    """`SyntheticCaptions` items -> (images (B, 3, S, S), tokens (B, L), targets (B, S, S), subjects (B, 3), named
    (B, P)), and with `phrases` also (phrase ids (U,), their tokens (U, L)): the U things the batch's scenes are asked
    to find (`named` == 2), in the scene-level term's order."""
    images, texts, targets, subjects, named = zip(*items)
    batch = torch.stack(images), tokenizer(list(texts)), torch.stack(targets), torch.stack(subjects), torch.stack(named)
    if not phrases:
        return batch
    ids = torch.nonzero(batch[4] == 2)[:, 1].unique()
    return batch + (ids, tokenizer([phrase_text(world, int(i)) for i in ids]))


class PatchCLIP(torch.nn.Module):
    """A ViT CLIP (a `CLIPBackbone`) whose forward also returns its patch embeddings: (images (B, 3, H, W), tokens
    (T, L)) -> (image features (B, D) and text features (T, D), both unit, logit scale, patch embeddings (B, h*w, D):
    the `readout` dense mode's tokens after ln_post and proj, "plain" (the last block as it is) or "maskclip" (its
    value path, one more last block's cost)). The first three are open_clip's forward's. Its state dict is the CLIP's
    under "model." as before."""

    def __init__(self, backbone: CLIPBackbone, readout: str = "plain"):
        super().__init__()
        self.model, self.readout = backbone.model, checks.choice("token_readout", readout, TOKEN_READOUTS)
        self.__dict__["backbone"] = backbone  # not a submodule: its parameters are self.model's

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        visual = self.model.visual
        x, grid = self.backbone.vit_tokens(images, depth=-1)
        pooled, patches = visual._pool(self.backbone.vit_blocks(x, visual.transformer.resblocks[-1:]))
        if self.readout != "plain":
            patches = visual.ln_post(self.backbone.vit_last_block(x, self.readout, grid, with_keys=False)[0][:, 1:])
        image, text = F.normalize(pooled @ visual.proj, dim=-1), self.model.encode_text(tokens, normalize=True)
        return image, text, self.model.logit_scale.exp(), patches @ visual.proj


def patch_targets(targets: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, S, S) bool pixel targets -> (B, grid * grid) bool: the patches whose centre pixel is a target."""
    size = targets.shape[-1]
    centres = ((torch.arange(grid, device=targets.device) + 0.5) * size / grid).long()
    return targets[:, centres][:, :, centres].flatten(1)


def clip_loss(model, batch, token_weight: float = 0.0, mask_true_captions: bool = False, mil_weight: float = 0.0,
              mil_top_k: int = 8, scene_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE between the batch's images and captions (open_clip's ClipLoss, gathered under DDP).

    batch: (images (B, 3, S, S), tokens (B, L), token targets (B, S, S) bool, subjects (B, 3)[, named (B, P), phrase
    ids (U,), phrase tokens (U, L)]), as `caption_batch` gives them.
    mask_true_captions: leave out of each image's softmax the other captions that are also true of it, and out of
    each caption's the other images it is true of (`also_true`): templated close-up captions repeat, and a repeat
    is no negative.
    The token terms need `model` a PatchCLIP; each classifies among the rank's captions by the same scaled cosine,
    its own caption the target and the others that are also true of it left out:
    token_weight > 0 adds the close-up token term: every patch embedding whose centre pixel is a target
    (`patch_targets`: the close-up's base thing or stuff) is classified, and the cross-entropy, averaged over those
    tokens, is added with that weight. It asks each token, not only their pool, to name what it shows.
    mil_weight > 0 adds the caption-level (multiple-instance) token term: every close-up, novel things included, is
    classified by `top_k_caption_logits` among the captions of close-ups of its kind (things or stuff), each caption
    scored by the `mil_top_k` patches that match it best. No pixel is marked: some patches must name the caption,
    more than any patch names another of its kind. Scene captions and the other kind's are no negatives: a thing
    close-up shows stuff around it (and may show a part of another thing: the noise this term accepts).
    scene_weight > 0 adds the scene-level term, the same in whole scenes: each scene is classified among the batch's
    phrases ("a photo of a red star.", one thing its caption names) by `top_k_caption_logits`, the things its
    captions name left out of its negatives. It finds things, novel ones included, among their neighbours; a thing
    in view that no caption of the scene names (about 1 scene in 7 has one among its negatives) is the noise it
    accepts."""
    images, tokens, targets, subjects = batch[:4]
    if scene_weight and len(batch) < 7:
        raise ValueError("scene_weight needs the phrases of caption_batch(..., phrases=True)")
    phrases = bool(scene_weight) and len(batch[5]) > 0
    outputs = model(images, torch.cat([tokens, batch[6]]) if phrases else tokens)
    image_features, logit_scale = outputs[0], outputs[2]
    text_features, phrase_features = outputs[1][:len(tokens)], outputs[1][len(tokens):]
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if world > 1 else 0
    if mask_true_captions:
        loss = masked_contrastive(image_features, text_features, logit_scale, tokens, subjects, rank, world)
    else:
        loss = open_clip.ClipLoss(gather_with_grad=True, rank=rank, world_size=world)(
            image_features, text_features, logit_scale)
    values = {"loss": loss, "logit_scale": logit_scale.detach()}
    if not (token_weight or mil_weight or phrases):
        return values
    values["clip_loss"] = loss.detach()
    patches, leave_out = F.normalize(outputs[3], dim=-1), also_true(tokens, subjects)  # (B, h*w, D), (B, B)
    inside = patch_targets(targets.to(images.device), int(round(patches.shape[1] ** 0.5)))  # (B, h*w)
    own = torch.nonzero(inside.any(dim=1)).squeeze(1)
    if token_weight and len(own):
        logits = (logit_scale * patches[own] @ text_features.T).masked_fill(leave_out[own][:, None], float("-inf"))
        token_loss = F.cross_entropy(logits[inside[own]], own[:, None].expand(-1, inside.shape[1])[inside[own]])
        values |= {"loss": values["loss"] + token_weight * token_loss, "token_loss": token_loss.detach()}
    shown = torch.nonzero(subjects[:, 0] >= 0).squeeze(1)  # the close-ups
    if mil_weight and len(shown):
        thing = subjects[:, 1] >= 0  # (B,) a thing close-up: it has a paint
        other_kind = (thing[:, None] != thing[None]) | (subjects[None, :, 0] < 0)  # (B, B)
        logits = top_k_caption_logits(patches[shown], text_features, logit_scale, mil_top_k)
        mil_loss = F.cross_entropy(logits.masked_fill((leave_out | other_kind)[shown], float("-inf")), shown)
        values |= {"loss": values["loss"] + mil_weight * mil_loss, "mil_loss": mil_loss.detach()}
    if phrases:
        named, ids = batch[4].to(images.device), batch[5].to(images.device)
        scenes, wanted = torch.nonzero(named == 2).unbind(dim=1)
        logits = top_k_caption_logits(patches[scenes], phrase_features, logit_scale, mil_top_k)  # (n, U)
        own_phrase = (wanted[:, None] == ids[None]).float().argmax(dim=1)
        leave_out = (named[scenes][:, ids] > 0) & (wanted[:, None] != ids[None])
        scene_loss = F.cross_entropy(logits.masked_fill(leave_out, float("-inf")), own_phrase)
        values |= {"loss": values["loss"] + scene_weight * scene_loss, "scene_loss": scene_loss.detach()}
    return values


def top_k_caption_logits(patches: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor, k: int
                         ) -> torch.Tensor:
    """(n, N, D) unit patch embeddings and (T, D) unit caption features -> (n, T): each caption's scaled cosine with
    an image, averaged over the k of its N patches that match that caption best."""
    logits = logit_scale * patches @ text_features.T  # (n, N, T)
    return logits.topk(min(k, logits.shape[1]), dim=1).values.mean(dim=1)


def masked_contrastive(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                       tokens: torch.Tensor, subjects: torch.Tensor, rank: int = 0, world: int = 1) -> torch.Tensor:
    """open_clip's ClipLoss over (B, D) unit features (gathered with their gradients under DDP, with the tokens
    (B, L) and subjects (B, 3)), each softmax without the other pairs that `also_true` marks."""
    if world > 1:
        image_features, text_features = open_clip.loss.gather_features(
            image_features, text_features, gather_with_grad=True, rank=rank, world_size=world)
        tokens, subjects = _gathered(tokens, world), _gathered(subjects, world)
    leave_out = also_true(tokens, subjects)  # (N, N)
    logits = logit_scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits.masked_fill(leave_out, float("-inf")), labels)
            + F.cross_entropy(logits.T.masked_fill(leave_out.T, float("-inf")), labels)) / 2


def _gathered(tensor: torch.Tensor, world: int) -> torch.Tensor:
    """The ranks' (B, ...) tensors concatenated in rank order (no gradient)."""
    parts = [torch.empty_like(tensor) for _ in range(world)]
    torch.distributed.all_gather(parts, tensor)
    return torch.cat(parts)


def also_true(tokens: torch.Tensor, subjects: torch.Tensor) -> torch.Tensor:
    """(B, L) caption tokens and (B, 3) subjects -> (B, B) bool: caption j is true of item i and j != i (the same
    text, or `true_of`)."""
    same = (tokens[:, None] == tokens[None]).all(dim=-1) | true_of(subjects.to(tokens.device))
    return same & ~torch.eye(len(tokens), dtype=torch.bool, device=tokens.device)


def true_of(subjects: torch.Tensor) -> torch.Tensor:
    """(B, 3) `SyntheticCaptions` subjects -> (B, B) bool: caption j is true of close-up i (the same class, and no
    colour named or i's colour: "a photo of a star." is true of a red star)."""
    shown, paint, said = subjects.unbind(dim=1)
    same = (shown[:, None] == shown[None]) & (shown[:, None] >= 0)
    return same & ((said[None] < 0) | (said[None] == paint[:, None]))


def colour_shape_text(backbone: CLIPBackbone, things: list[str], template: str = "a photo of a {}.") -> torch.Tensor:
    """(colours * shapes, D) text embeddings of `template` with "{colour} {shape}", colour-major."""
    names = [f"{c} {t}" for c in COLOURS for t in things]
    return TextEmbeddingCache().embed(backbone, names, (template,)).to(backbone.device)


def shape_accuracy(scores: torch.Tensor, shapes: list[int], world: SyntheticWorld) -> tuple[float, float]:
    """(N, colours, shapes) scores and the (N,) true shapes -> shape accuracy (%) of base and of novel things, the
    best colour of each shape standing for it."""
    shape_ok = (scores.amax(dim=1).argmax(dim=1) == torch.tensor(shapes)).float()
    novel = torch.tensor([world.things[t] in world.novel for t in shapes])
    return 100 * float(shape_ok[~novel].mean()), 100 * float(shape_ok[novel].mean())


@torch.no_grad()
def score_object_crops(backbone: CLIPBackbone, crops: list[np.ndarray], things: list[str],
                       template: str = "a photo of a {}.") -> torch.Tensor:
    """(N,) object crops -> (N, colours, shapes) cosine similarity with "a photo of a {colour} {shape}."."""
    size = backbone.image_size
    text = colour_shape_text(backbone, things, template)
    images = torch.stack([to_tensor(c, backbone.image_mean, backbone.image_std, size) for c in crops])
    features = torch.cat([F.normalize(backbone.encode_image(images[i:i + 256].to(backbone.device)), dim=-1)
                          for i in range(0, len(images), 256)])
    return (features @ text.T).view(len(crops), len(COLOURS), len(things)).cpu()


def zero_shot_crops(backbone: CLIPBackbone, world: SyntheticWorld, scenes: int = 200, split: str = "val"
                    ) -> dict[str, float]:
    """Zero-shot accuracy (%) on the val objects, each cropped around its box (25% margin).

    Every crop is scored against "a photo of a {colour} {shape}." for all colours and shapes; the shape
    prediction takes the best colour for each shape (colour words act as synonyms), and vice versa.
    Shape accuracy is reported for base and novel things, against a chance of 1 / number of shapes.
    """
    colours = list(COLOURS)
    crops, shapes, paint = [], [], []
    for i in range(scenes):
        scene = world.scene(scene_index(split, i))
        for obj in scene.objects:
            crops.append(object_crop(scene.image, obj.box))
            shapes.append(world.things.index(obj.category))
            paint.append(colours.index(obj.colour))
    scores = score_object_crops(backbone, crops, list(world.things))
    base, novel = shape_accuracy(scores, shapes, world)
    colour_ok = (scores.amax(dim=2).argmax(dim=1) == torch.tensor(paint)).float()
    return {"zs_base_acc": base, "zs_novel_acc": novel, "zs_colour_acc": 100 * float(colour_ok.mean()), "zs_crops": len(shapes),
            "chance_acc": 100 / len(world.things)}


@torch.no_grad()
def zero_shot_regions(backbone: CLIPBackbone, world: SyntheticWorld, scenes: int = 200, split: str = "val",
                      mode: str = "maskclip") -> dict[str, float]:
    """Zero-shot shape accuracy (%) of the val objects read from the whole scene's dense map: the `mode` dense
    features at the model's native size, RoIAligned (7x7, averaged) over each object's exact box, scored as
    `zero_shot_crops` scores crops. What a dense method can get from the foundation before any training."""
    text = colour_shape_text(backbone, list(world.things))
    scores, shapes = [], []
    for i in range(scenes):
        scene = world.scene(scene_index(split, i))
        image = to_tensor(scene.image, backbone.image_mean, backbone.image_std, backbone.image_size)[None]
        dense = backbone.dense_features(image.to(backbone.device), mode).features  # (1, D, h, w)
        boxes = torch.tensor([obj.box for obj in scene.objects], dtype=dense.dtype, device=dense.device)
        if not len(boxes):
            continue
        scores.append(region_scores(dense, boxes, dense.shape[-1] / scene.image.shape[1], text).cpu())
        shapes += [world.things.index(obj.category) for obj in scene.objects]
    base, novel = shape_accuracy(torch.cat(scores), shapes, world)
    return {"dense_base_acc": base, "dense_novel_acc": novel}


def region_scores(dense: torch.Tensor, boxes: torch.Tensor, scale: float, text: torch.Tensor) -> torch.Tensor:
    """(1, D, h, w) dense map, (N, 4) boxes in the pixels of an image `scale` times the map's size and
    (colours * shapes, D) `colour_shape_text` -> (N, colours, shapes) cosine similarity of each box's RoIAligned
    (7x7, averaged) feature with each caption."""
    from torchvision.ops import roi_align
    regions = roi_align(dense, [boxes], 7, scale, sampling_ratio=2, aligned=True).mean(dim=(2, 3))
    return (F.normalize(regions, dim=-1) @ text.T).view(len(boxes), len(COLOURS), -1)


@dataclass
class PretrainConfig(Recipe):
    """A tiny-CLIP recipe (YAML): architecture, world, data size, training settings, export path.

    model: an open_clip architecture. weights: where training starts: 'random' (drawn from train.seed) or a source
        `load_clip` reads (a weights file, e.g. an earlier run's export, to train it further; a pretrained tag).
    world: SyntheticWorld arguments {size, seed, max_objects}. scenes: train scenes; captions_per_scene: items
        per scene; close_ups: fraction of items that are close-ups; close_up_views, close_up_fill (the "anywhere"
        views' range of box side / window side), stuff_close_ups, shape_captions: their kind (`SyntheticCaptions`);
        token_loss: the weight of the close-up token term (`clip_loss`, ViTs);
        mil_loss, mil_top_k: the weight of the caption-level token term and its patches per caption (`clip_loss`,
        ViTs); scene_loss: the weight of the scene-level term (the same in whole scenes, for one thing their caption
        names; `clip_loss`, ViTs); token_readout: the dense mode whose patch tokens these terms train (`PatchCLIP`);
        mask_true_captions: no caption true of an image is its negative (`clip_loss`);
        eval_scenes: val scenes scored.
    train: TrainConfig fields. export: where the final fp16 weights go (safetensors); a relative path is in the
        run's output folder; default OUT/MODEL.safetensors. Never inside the installed package.
    """

    model: str = "ovdense-tiny-vit"
    weights: str = RANDOM_WEIGHTS
    world: dict = field(default_factory=lambda: {"size": 96, "seed": 0, "max_objects": 4})
    scenes: int = 20000
    captions_per_scene: int = 3
    close_ups: float = 0.0
    close_up_views: str = "centred"
    close_up_fill: list = field(default_factory=lambda: [0.35, 0.9])
    stuff_close_ups: float = 0.0
    shape_captions: float = 0.0
    token_loss: float = 0.0
    mil_loss: float = 0.0
    mil_top_k: int = 8
    scene_loss: float = 0.0
    token_readout: str = "plain"
    mask_true_captions: bool = False
    eval_scenes: int = 200

    def check_model(self) -> None:
        check_clip(self.model, self.weights)

    def check_keys(self) -> None:
        check_world(self.world)
        checks.integer("scenes", self.scenes, minimum=1)
        checks.integer("captions_per_scene", self.captions_per_scene, minimum=1)
        checks.number("close_ups", self.close_ups, minimum=0, maximum=1)
        checks.choice("close_up_views", self.close_up_views, CLOSE_UP_VIEWS)
        checks.pair("close_up_fill", self.close_up_fill,
                    lambda key, v: checks.number(key, v, positive=True, maximum=1), ordered=True)
        checks.number("stuff_close_ups", self.stuff_close_ups, minimum=0, maximum=1)
        checks.number("shape_captions", self.shape_captions, minimum=0, maximum=1)
        checks.number("token_loss", self.token_loss, minimum=0)
        checks.number("mil_loss", self.mil_loss, minimum=0)
        checks.integer("mil_top_k", self.mil_top_k, minimum=1)
        checks.number("scene_loss", self.scene_loss, minimum=0)
        checks.choice("token_readout", self.token_readout, TOKEN_READOUTS)
        checks.boolean("mask_true_captions", self.mask_true_captions)
        layers = (open_clip.get_model_config(self.model) or {}).get("vision_cfg", {}).get("layers")
        for key in ("token_loss", "mil_loss", "scene_loss"):
            if getattr(self, key) and isinstance(layers, (list, tuple)):  # a ResNet's stages
                raise InputError(f"{key}: the token terms need a ViT; {self.model} is a ResNet")
        checks.integer("eval_scenes", self.eval_scenes, minimum=1)


def build_clip(config: PretrainConfig) -> torch.nn.Module:
    """`config.model` with `config.weights`, in train mode; 'random' ones are drawn from train.seed, so the same
    recipe starts from the same weights."""
    return load_clip(config.model, config.weights, seed=config.train_config().seed).model.train()


def pretrain_clip(config: PretrainConfig, out_dir: str | Path, device: str = "cpu", resume: bool = True,
                  max_steps: int | None = None, progress: bool = True
                  ) -> tuple[CLIPBackbone, dict, Path | None]:
    """Train `config.model` from random weights on synthetic captions; returns the backbone, its zero-shot scores
    and the exported weights file.

    The final weights are written (fp16 safetensors) to `config.export` (relative: in out_dir) only once training
    has reached train.steps; a run stopped early by `max_steps` exports nothing (None) and resumes from
    out_dir/last.pt.
    """
    validated(config)
    out_dir, export = run_paths(out_dir, config.export, f"{config.model}.safetensors")
    if resume:
        check_resume(out_dir, "clip")
    train_config = config.train_config()
    world = SyntheticWorld(**(config.world or {}))
    model = build_clip(config)
    tokenizer = open_clip.get_tokenizer(config.model)
    backbone = CLIPBackbone(model, tokenizer, name=config.model, weights=f"training:{out_dir}")
    data = SyntheticCaptions(world, config.scenes, config.captions_per_scene, close_ups=config.close_ups,
                             image_size=backbone.image_size, views=config.close_up_views,
                             stuff_close_ups=config.stuff_close_ups, shape_captions=config.shape_captions,
                             fill=tuple(config.close_up_fill))

    def evaluate(_model):
        scores = zero_shot_crops(backbone, world, config.eval_scenes)
        for mode in ("maskclip", "plain"):
            regions = zero_shot_regions(backbone, world, config.eval_scenes, mode=mode)
            scores |= {f"{mode}_{key[len('dense_'):]}": value for key, value in regions.items()}
        return scores

    run = {"method": "clip", "recipe": config.source, "model": {"model": config.model}}
    patches = config.token_loss or config.mil_loss or config.scene_loss
    trainee = PatchCLIP(backbone, config.token_readout) if patches else model
    loss = partial(clip_loss, token_weight=config.token_loss, mask_true_captions=config.mask_true_captions,
                   mil_weight=config.mil_loss, mil_top_k=config.mil_top_k, scene_weight=config.scene_loss)
    collate = partial(caption_batch, tokenizer=tokenizer, world=world, phrases=config.scene_loss > 0)
    trainer = Trainer(trainee, loss, data, train_config, out_dir, collate=collate, evaluate=evaluate, device=device,
                      progress=progress, run=run)
    trainer.fit(resume=resume, max_steps=max_steps)
    model.eval()
    scores = evaluate(model)

    def save():
        with atomic_path(export) as tmp:
            save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                      metadata={"model": config.model, "steps": str(trainer.step)})
    return backbone, scores, finish_run(trainer, export, save)
