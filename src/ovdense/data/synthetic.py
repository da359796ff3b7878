"""A procedurally generated open-vocabulary world with exact ground truth.

Scenes are textured "stuff" regions (sky, grass, water, ...) with 2-4 coloured "things" (12 shapes x 8
colours x 3 sizes) painted over them, with bounded occlusion. Every scene comes with instance masks and
boxes, a semantic label map, and 1-5 captions whose noun phrases carry character spans and the
boxes they refer to. Everything is a pure function of (seed, index, size): `SyntheticWorld(seed=0)
.scene(7)` is the same scene on every machine.

Version 2 (the default 96 px world) gives things a signal: diameters of 28-52% of the short side (27 px or
more when whole, over three 8 px patches), shapes whose silhouettes differ (best-aligned IoU <= 0.79 for every pair;
pentagon and hexagon, near-circles at small sizes, became bar and hourglass), paint that contrasts with the
stuff underneath, at most a quarter of a thing hidden, and about 19% of the pixels on things.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

STUFF = ("sky", "grass", "water", "sand", "snow", "brick wall", "wooden floor", "asphalt")
THINGS = ("circle", "square", "triangle", "star", "hourglass", "cross",
          "heart", "diamond", "crescent", "ring", "arrow", "bar")
NOVEL_THINGS = ("heart", "crescent", "arrow")  # in captions only, never in box or mask supervision of train
COLOURS = {"red": (215, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
           "blue": (40, 80, 220), "purple": (140, 50, 180), "white": (245, 245, 245), "black": (25, 25, 25)}
SIZES = {"small": (0.28, 0.34), "medium": (0.36, 0.42), "large": (0.44, 0.52)}  # diameter / short side
STUFF_COLOURS = {"sky": (120, 175, 235), "grass": (70, 150, 50), "water": (40, 110, 170), "sand": (215, 190, 130),
                 "snow": (235, 240, 250), "brick wall": (165, 70, 50), "wooden floor": (150, 100, 55),
                 "asphalt": (85, 85, 90)}  # the mean colour of each texture
# The words of the captions besides the names above (relations, articles, "a photo of"): with them, every word a
# CLIP trained on this world has read (its close-ups add "a photo of a red star.")
CAPTION_WORDS = ("a", "an", "on", "with", "and", "photo", "of", "to", "the", "left", "right", "above", "below")
MIN_CONTRAST = 60  # RGB distance between a thing's paint and the stuff it lies on (no white star on snow)
MAX_HIDDEN = 0.25  # a thing painted later hides at most this fraction of what is still visible of an earlier one
VERSION = 2
SKY_ONLY_ON_TOP = "sky"


@dataclass
class SceneObject:
    """One visible thing: its category, attributes, visible mask (H, W) bool and tight box [x0, y0, x1, y1)."""

    category: str
    colour: str
    size: str
    mask: np.ndarray
    box: list[int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.category}"


@dataclass
class Phrase:
    """A noun phrase of a caption: caption[span[0]:span[1]] == text; boxes of what it refers to."""

    text: str
    span: tuple[int, int]
    category: str
    boxes: list[list[int]]
    objects: list[int] = field(default_factory=list)  # indices into Scene.objects (empty for stuff)


@dataclass
class Caption:
    text: str
    phrases: list[Phrase]


@dataclass
class Scene:
    """image: (H, W, 3) uint8; semantic: (H, W) int64 class indices into SyntheticWorld.classes."""

    index: int
    image: np.ndarray
    semantic: np.ndarray
    stuff: dict[str, np.ndarray]  # stuff name -> (H, W) bool region
    objects: list[SceneObject]
    captions: list[Caption]


def _texture(name: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float texture of a named material."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = rng.normal(0, 1, (height, width)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)

    def colour(variation):
        return np.array(STUFF_COLOURS[name], np.float32)[None, None] * (1 + variation[..., None])

    if name == "sky":
        return colour(0.25 * ys / height - 0.1 + 0.02 * noise)
    if name == "grass":
        blades = np.sin(xs * 1.7 + phase + 2 * np.sin(ys * 0.3)) * 0.12
        return colour(blades + 0.12 * noise)
    if name == "water":
        return colour(0.15 * np.sin(ys * 0.8 + np.sin(xs * 0.15 + phase) * 2) + 0.03 * noise)
    if name == "sand":
        return colour(0.08 * noise + 0.05 * np.sin(xs * 0.2 + ys * 0.1 + phase))
    if name == "snow":
        return colour(0.03 * noise - 0.04 * np.sin(xs * 0.1 + phase))
    if name == "brick wall":
        row = (ys // 6).astype(int)
        mortar = (ys % 6 < 1) | ((xs + 6 * (row % 2)) % 12 < 1)
        return np.where(mortar[..., None], np.float32(200), colour(0.06 * noise))
    if name == "wooden floor":
        grain = 0.12 * np.sin(ys * 1.1 + 3 * np.sin(xs * 0.05 + phase)) + ((ys % 10) < 1) * -0.3
        return colour(grain + 0.04 * noise)
    if name == "asphalt":
        return colour(0.15 * noise)
    raise ValueError(f"unknown stuff {name!r}")


def _shape_mask(category: str, centre: tuple[float, float], radius: float, angle: float,
                size: tuple[int, int], supersample: int = 4) -> np.ndarray:
    """(H, W) bool mask of a shape, drawn at `supersample` x resolution and box-filtered down."""
    height, width = size
    s = supersample
    canvas = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = centre[0] * s, centre[1] * s, radius * s

    def polygon(points):
        cos, sin = math.cos(angle), math.sin(angle)
        draw.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points], fill=255)

    def regular(n, start=-math.pi / 2, radii=(1.0,)):
        return [(radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / (n * len(radii))),
                 radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / (n * len(radii))))
                for i in range(n * len(radii))]

    if category == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif category == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        draw.ellipse([cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r], fill=0)
    elif category == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        dx, dy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        draw.ellipse([cx + dx - 0.85 * r, cy + dy - 0.85 * r, cx + dx + 0.85 * r, cy + dy + 0.85 * r], fill=0)
    elif category == "square":
        polygon([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])
    elif category == "triangle":
        polygon(regular(3))
    elif category == "bar":
        polygon([(-1, -0.32), (1, -0.32), (1, 0.32), (-1, 0.32)])
    elif category == "hourglass":
        polygon([(-0.75, -0.9), (0.75, -0.9), (0.15, 0), (0.75, 0.9), (-0.75, 0.9), (-0.15, 0)])
    elif category == "star":
        polygon(regular(5, radii=(1.0, 0.42)))
    elif category == "diamond":
        polygon([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])
    elif category == "cross":
        a, b = 0.3, 0.95
        polygon([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a),
                 (-a, -a)])
    elif category == "heart":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        x, y = 16 * np.sin(t) ** 3, -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        polygon(list(zip(x / 17, (y + 2.5) / 17)))
    elif category == "arrow":
        polygon([(-1, -0.25), (0.2, -0.25), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.25), (-1, 0.25)])
    else:
        raise ValueError(f"unknown shape {category!r}")
    return np.asarray(canvas.resize((width, height), Image.BOX)) >= 128


@functools.lru_cache(maxsize=None)
def _unit_area(category: str) -> float:
    """Area of a shape of radius 1, measured once on a shape drawn with radius 50."""
    return float(_shape_mask(category, (64, 64), 50, 0.0, (128, 128)).sum()) / 50 ** 2


def _shape_area(category: str, radius: float) -> float:
    """Pixel area of a shape of `radius` drawn whole."""
    return _unit_area(category) * radius ** 2


def _box(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def world_words() -> frozenset[str]:
    """Every word the world's captions use, lower-case: all a CLIP trained on them can know."""
    names = STUFF + THINGS + tuple(COLOURS) + tuple(SIZES) + CAPTION_WORDS
    return frozenset(word for name in names for word in name.split())


class _CaptionBuilder:
    """Builds a caption piece by piece, recording the character span of each noun phrase."""

    def __init__(self):
        self.text, self.phrases = "", []

    def add(self, words: str) -> "_CaptionBuilder":
        self.text += words
        return self

    def phrase(self, text: str, category: str, boxes: list[list[int]], objects: list[int]) -> "_CaptionBuilder":
        start = len(self.text)
        self.text += text
        self.phrases.append(Phrase(text, (start, len(self.text)), category, boxes, objects))
        return self

    def build(self) -> Caption:
        return Caption(self.text, self.phrases)


class SyntheticWorld:
    """Deterministic generator of scenes; `classes` are the stuff names then the thing names.

    size: image (height, width) or one int; each scene has 2..max_objects things (fewer when they do not fit).
    """

    version = VERSION

    def __init__(self, size: int | tuple[int, int] = 96, seed: int = 0, max_objects: int = 4):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.seed = seed
        self.max_objects = max_objects
        self.stuff, self.things, self.novel = STUFF, THINGS, NOVEL_THINGS
        self.classes = list(STUFF) + list(THINGS)

    @property
    def base_things(self) -> list[str]:
        return [t for t in self.things if t not in self.novel]

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, index])
        height, width = self.size
        stuff_map, stuff = self._stuff_layout(rng)
        image = np.zeros((height, width, 3), np.float32)
        for name, region in stuff.items():
            image[region] = _texture(name, height, width, rng)[region]
        objects = self._place_objects(rng, stuff)
        semantic = stuff_map.copy()
        for obj_index, (obj, full) in enumerate(objects):
            shade = 1 + 0.12 * (np.mgrid[0:height, 0:width][0] / height - 0.5)
            paint = np.array(COLOURS[obj.colour], np.float32)[None, None] * shade[..., None]
            image[full] = (paint + rng.normal(0, 4, paint.shape))[full]
            semantic[obj.mask] = self.classes.index(obj.category)
        scene_objects = [obj for obj, _ in objects]
        captions = self._captions(rng, scene_objects, stuff, stuff_map)
        image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
        return Scene(index, image, semantic.astype(np.int64), stuff, scene_objects, captions)

    def _stuff_layout(self, rng) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        height, width = self.size
        ys, xs = np.mgrid[0:height, 0:width]
        ground = [s for s in self.stuff if s != SKY_ONLY_ON_TOP]
        top = SKY_ONLY_ON_TOP if rng.random() < 0.6 else str(rng.choice(ground))
        rest = [s for s in ground if s != top]
        names = [top] + list(rng.choice(rest, size=2, replace=False))
        horizon = height * rng.uniform(0.3, 0.6) + height * 0.05 * np.sin(xs / width * 2 * np.pi * rng.uniform(0.5, 2))
        split = width * rng.uniform(0.3, 0.7) + width * 0.05 * np.sin(ys / height * 2 * np.pi * rng.uniform(0.5, 2))
        regions = [ys < horizon]
        if rng.random() < 0.5:
            regions += [(ys >= horizon) & (xs < split), (ys >= horizon) & (xs >= split)]
        else:
            regions += [ys >= horizon]
        stuff_map = np.zeros((height, width), np.int64)
        stuff = {}
        for name, region in zip(names, regions):
            if region.any():
                stuff[name] = region
                stuff_map[region] = self.classes.index(name)
        return stuff_map, stuff

    def _place_objects(self, rng, stuff: dict[str, np.ndarray]) -> list[tuple[SceneObject, np.ndarray]]:
        """Objects painted in order, each at least 80% inside the image, in a colour that contrasts with the
        stuff it lies on; a new one may hide at most MAX_HIDDEN of any earlier object's visible part."""
        height, width = self.size
        placed: list[tuple[SceneObject, np.ndarray]] = []
        used = set()
        for _ in range(int(rng.integers(min(2, self.max_objects), self.max_objects + 1))):
            for _attempt in range(20):
                category, colour = str(rng.choice(self.things)), str(rng.choice(list(COLOURS)))
                size = str(rng.choice(list(SIZES)))
                if (category, colour) in used:
                    continue
                radius = 0.5 * min(height, width) * rng.uniform(*SIZES[size])
                centre = (rng.uniform(radius * 0.6, width - radius * 0.6), rng.uniform(radius * 0.6, height - radius * 0.6))
                full = _shape_mask(category, centre, radius, rng.uniform(-0.35, 0.35), self.size)
                if full.sum() < 0.8 * _shape_area(category, radius):
                    continue
                paint = np.array(COLOURS[colour], np.float32)
                if any(np.linalg.norm(paint - STUFF_COLOURS[name]) < MIN_CONTRAST
                       for name, region in stuff.items() if (region & full).any()):
                    continue
                if any((obj.mask & full).sum() > MAX_HIDDEN * obj.mask.sum() for obj, _ in placed):
                    continue
                for obj, _ in placed:
                    obj.mask = obj.mask & ~full
                    obj.box = _box(obj.mask)
                placed.append((SceneObject(category, colour, size, full.copy(), _box(full)), full))
                used.add((category, colour))
                break
        return placed

    def _captions(self, rng, objects: list[SceneObject], stuff: dict[str, np.ndarray],
                  stuff_map: np.ndarray) -> list[Caption]:
        def stuff_under(obj: SceneObject) -> str:
            ys, xs = np.nonzero(obj.mask)
            return self.classes[int(np.bincount(stuff_map[ys, xs]).argmax())]

        def thing(builder, i, with_size=False):
            """Adds 'a red star' (article, then the phrase)."""
            obj = objects[i]
            text = f"{obj.size} {obj.name}" if with_size else obj.name
            builder.add("an " if text[0] in "aeiou" else "a ")
            return builder.phrase(text, obj.category, [obj.box], [i])

        def ground(builder, name):
            return builder.phrase(name, name, [_box(stuff[name])], [])

        captions = []
        for _ in range(int(rng.integers(1, 6))):
            kind = int(rng.integers(0, 4 if len(objects) > 1 else 2))
            i = int(rng.integers(len(objects)))
            b = _CaptionBuilder()
            if kind == 0:  # "a small red star on grass"
                thing(b, i, with_size=True).add(" on ")
                ground(b, stuff_under(objects[i]))
            elif kind == 1:  # "a photo of a blue circle"
                thing(b.add("a photo of "), i)
            elif kind == 2:  # "a red star to the left of a blue circle"
                j = int(rng.choice([k for k in range(len(objects)) if k != i]))
                (x0, y0), (x1, y1) = (_centre(objects[i].box), _centre(objects[j].box))
                if abs(x0 - x1) >= abs(y0 - y1):
                    relation = " to the left of " if x0 < x1 else " to the right of "
                else:
                    relation = " above " if y0 < y1 else " below "
                thing(b, i).add(relation)
                thing(b, j)
            else:  # "grass with a red star and a blue circle"
                ground(b, stuff_under(objects[i])).add(" with ")
                chosen = list(rng.permutation(len(objects)))[: int(rng.integers(2, len(objects) + 1))]
                for n, k in enumerate(chosen):
                    b.add("" if n == 0 else (" and " if n == len(chosen) - 1 else ", "))
                    thing(b, int(k))
            captions.append(b.build())
        return captions


def _centre(box: list[int]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
