"""Pictures of predictions: colour overlays with outlines, names on the regions and a legend; palette label PNGs;
box drawings with captions that do not cover each other.

Colours come from one categorical palette (`palette`) shared by `overlay` and `label_image`, so a
label PNG and its overlay agree. Small images are drawn upscaled (`display_scale`: nearest neighbour, an integer
factor) and all text is drawn at the final size, so it stays legible and crisp. Scores are written as the JSON
writes them (`round_score`) and shown from that value (`score_text`). Works with Pillow >= 10.0; fonts scale with
the image from Pillow 10.1 on (10.0 has only the fixed-size bitmap font).
"""
from __future__ import annotations

from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import UsageError

BACKGROUND_NAMES = frozenset({"background"})
BACKGROUND_COLOUR = (64, 64, 64)  # a dark grey: the background is dimmed, not coloured like a class
OUTLINE_COLOUR = (255, 255, 255)

SCORE_DECIMALS = 4  # a score's precision in the JSON results
DISPLAY_SHORT_SIDE = 384  # pictures whose short side is under this are drawn upscaled ...
DISPLAY_MAX_SIDE = 2048  # ... without their long side passing this
DRAW_NMS_IOU = 0.5  # box drawings: class-wise hard NMS at this IoU (soft-NMS keeps decayed duplicates)

_LIGHTNESS = (30.0, 85.0)  # CIELAB L* range of palette colours: nothing near black or near white
_GRID = 8  # sRGB candidate grid step of the palette search


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB values in [0, 255] -> (..., 3) CIELAB (D65)."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = c @ np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]]).T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


@lru_cache(maxsize=4)
def _glasbey(count: int) -> np.ndarray:
    """Greedy farthest-point colours in CIELAB (Glasbey et al. 2007) over an sRGB grid, L* in _LIGHTNESS.

    Each colour is the candidate farthest from all colours before it (the first: farthest from mid grey),
    so any prefix is itself well spread and a class keeps its colour when the vocabulary grows.
    """
    axis = np.append(np.arange(0, 256, _GRID), 255)
    candidates = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    lab = srgb_to_lab(candidates)
    keep = (lab[:, 0] >= _LIGHTNESS[0]) & (lab[:, 0] <= _LIGHTNESS[1])
    candidates, lab = candidates[keep], lab[keep]
    nearest = np.linalg.norm(lab - srgb_to_lab(np.array([128, 128, 128])), axis=1)
    chosen = np.empty(min(count, len(candidates)), dtype=np.int64)
    for step in range(len(chosen)):
        chosen[step] = pick = int(nearest.argmax())
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[pick], axis=1))
    colours = candidates[chosen].astype(np.uint8)
    if count > len(colours):  # past ~17k classes colours must repeat
        colours = np.resize(colours, (count, 3))
    colours.setflags(write=False)
    return colours


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 categorical colours, pairwise as distinct as a greedy search makes them.

    Min CIELAB distance (Delta E 1976): ~39 among the first 20, ~16 among 150, ~13 among 256
    (the old Pascal VOC bit palette: 8.8 and 1.5). `palette(n)[:m] == palette(m)`.
    """
    return _glasbey(max(256, int(n)))[:n].copy()


def class_colours(classes: int | Sequence[str]) -> np.ndarray:
    """(K, 3) uint8 colours of K classes (a count or the names): `palette`, a class named 'background' dark grey."""
    if isinstance(classes, (int, np.integer)):
        return palette(int(classes))
    colours = palette(len(classes))
    for index, name in enumerate(classes):
        if str(name).strip().lower() in BACKGROUND_NAMES:
            colours[index] = BACKGROUND_COLOUR
    return colours


def label_image(labels: np.ndarray, classes: int | Sequence[str]) -> Image.Image:
    """(H, W) labels -> a palette PNG image (mode P) for up to 256 classes, else 16-bit grey.

    classes: the class count, or the class names (then a 'background' class is dark grey as in `overlay`).
    """
    count = classes if isinstance(classes, (int, np.integer)) else len(classes)
    labels = np.asarray(labels)
    if count <= 256:
        colours = palette(256)
        colours[:count] = class_colours(classes)
        image = Image.fromarray(np.ascontiguousarray(labels.astype(np.uint8)))  # mode L ...
        image.putpalette(colours.flatten().tolist())  # ... becomes P with these colours, indices kept
        return image
    return Image.fromarray(np.ascontiguousarray(labels.astype(np.uint16)))


def boundaries(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """(H, W) bool: pixels on a boundary between two labels.

    width 1: a pixel whose right or lower neighbour has another label (a 1 px line on one side);
    width 2: also those whose left or upper neighbour does (the line straddles the boundary).
    """
    edge = np.zeros(labels.shape, dtype=bool)
    across = labels[:, 1:] != labels[:, :-1]  # between column x and x + 1
    down = labels[1:] != labels[:-1]  # between row y and y + 1
    edge[:, :-1] |= across
    edge[:-1] |= down
    if width >= 2:
        edge[:, 1:] |= across
        edge[1:] |= down
    return edge


@lru_cache(maxsize=32)
def _font(size: int):
    """A font of `size` px: DejaVu Sans where the system has it (it covers accents, Greek, Cyrillic), else Pillow's
    scalable default font (>= 10.1, Latin letters only), else its fixed bitmap font."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):  # Pillow 10.0 (no size=), or no FreeType
        return ImageFont.load_default()


def _text_size(font, text: str) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the ink of `text`."""
    left, top, right, bottom = font.getbbox(text)
    return left, top, right - left, bottom - top


def _as_rgb(image, shape: tuple[int, int]) -> np.ndarray | None:
    """Image (array of (H, W[, 1|3|4]) or PIL) -> (H, W, 3) uint8 at the label size; None stays None."""
    if image is None:
        return None
    picture = image if isinstance(image, Image.Image) else Image.fromarray(_uint8(np.asarray(image)))
    picture = picture.convert("RGB")
    if picture.size != (shape[1], shape[0]):
        picture = picture.resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(picture)


def _uint8(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
        array = array * 255.0
    return np.ascontiguousarray(np.clip(array, 0, 255).astype(np.uint8))


def round_score(score) -> float:
    """A score as the JSON results write it: rounded to SCORE_DECIMALS decimals."""
    return round(float(score), SCORE_DECIMALS)


def score_text(score) -> str:
    """A score as pictures, the page and the console show it: the JSON's value (`round_score`) to 2 decimals,
    halves rounded up as a reader of the JSON would (0.535 -> '0.54', 0.565 -> '0.57'), not from the float again."""
    return str(Decimal(repr(round_score(score))).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def display_scale(height: int, width: int) -> int:
    """The integer factor a (height, width) picture is drawn at: the smallest that brings its short side to
    DISPLAY_SHORT_SIDE, at most what keeps its long side within DISPLAY_MAX_SIDE; 1 for pictures large enough."""
    short, long = max(1, min(height, width)), max(1, height, width)
    return max(1, min(-(-DISPLAY_SHORT_SIDE // short), DISPLAY_MAX_SIDE // long))


def _checked_scale(scale: int | None, shape: tuple[int, int]) -> int:
    """The drawing factor: `scale`, or `display_scale` of `shape` when None; a UsageError unless a positive int."""
    if scale is None:
        return display_scale(*shape)
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or scale < 1:
        raise UsageError(f"scale must be a positive integer (the drawing's magnification), got {scale!r}")
    return int(scale)


def _upscale(array: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, ...) -> (H * factor, W * factor, ...): each pixel repeated (nearest neighbour)."""
    return array if factor == 1 else array.repeat(factor, axis=0).repeat(factor, axis=1)


def _share_text(count: int, total: int) -> str:
    """'12.3%'; a class too small to show at 0.1% precision reads '<0.1%', one just short of all '>99.9%'."""
    text = f"{100.0 * count / total:.1f}"
    if float(text) == 0.0:
        return "<0.1%"
    if text == "100.0" and count < total:
        return ">99.9%"
    return f"{text}%"


def _ink(colour) -> tuple[int, int, int]:
    """Black or white, whichever reads better on `colour` (WCAG relative luminance)."""
    c = np.asarray(colour, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    luminance = float(c @ np.array([0.2126, 0.7152, 0.0722]))
    return (0, 0, 0) if luminance > 0.179 else (255, 255, 255)


def _fits(integral: np.ndarray, height: int, width: int) -> np.ndarray:
    """Top-left corners (y, x) where a height x width box lies wholly inside the mask, from its integral image."""
    inside = (integral[height:, width:] - integral[:-height, width:] - integral[height:, :-width]
              + integral[:-height, :-width])
    return inside == height * width


def text_position(mask: np.ndarray, height: int, width: int) -> tuple[int, int] | None:
    """Top-left (y, x) of a height x width box inside `mask`, as deep in it as it goes; None if it does not fit.

    The box is grown by a margin on every side while it still fits somewhere (binary search), so it
    ends up in the region's thickest part, away from its boundary (and the image border); among the
    deepest places the one nearest their mean is taken.
    """
    rows, cols = mask.shape
    if height > rows or width > cols:
        return None
    integral = np.zeros((rows + 1, cols + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    best = _fits(integral, height, width)
    if not best.any():
        return None
    low, high = 0, (min(rows - height, cols - width) // 2) + 1  # margin `low` fits, `high` does not
    while high - low > 1:
        margin = (low + high) // 2
        fits = _fits(integral, height + 2 * margin, width + 2 * margin)
        if fits.any():
            low, best = margin, fits
        else:
            high = margin
    ys, xs = np.nonzero(best)
    pick = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(ys[pick]) + low, int(xs[pick]) + low


def _name_regions(draw: ImageDraw.ImageDraw, labels: np.ndarray, present: np.ndarray, names: Sequence[str],
                  colours: np.ndarray, size: int, max_side: int = 256) -> None:
    """Write each present class's name in a box of its colour, at the deepest place of its area that holds it.

    Placement runs on the label map subsampled to at most `max_side` px; a class whose area holds
    neither the text at `size` nor at 3/4 of it is left to the legend.
    """
    step = max(1, -(-max(labels.shape) // max_side))
    small = labels[::step, ::step]
    for index in present:
        mask = small == index
        for font_size in dict.fromkeys((size, max(9, round(size * 0.75)))):
            font = _font(font_size)
            left, top, text_w, text_h = _text_size(font, names[index])
            pad = max(2, font_size // 5)
            box_w, box_h = text_w + 2 * pad, text_h + 2 * pad
            spot = text_position(mask, -(-box_h // step), -(-box_w // step))
            if spot is not None:
                y = min(spot[0] * step, labels.shape[0] - box_h)  # subsampling may overshoot by < step
                x = min(spot[1] * step, labels.shape[1] - box_w)
                colour = tuple(int(c) for c in colours[index])
                ink = _ink(colour)
                draw.rectangle([x, y, x + box_w - 1, y + box_h - 1], fill=colour, outline=ink)
                draw.text((x + pad - left, y + pad - top), names[index], fill=ink, font=font)
                break


def overlay(image, labels: np.ndarray, class_names: Sequence[str], alpha: float = 0.55,
            note: str | None = None, *, outline: int | None = None, outline_colour=OUTLINE_COLOUR,
            names: bool = True, legend: bool = True, font_size: int | None = None,
            scale: int | None = None) -> Image.Image:
    """(H, W, 3) uint8 image + (H, W) labels -> the blended picture, with a legend of the classes present.

    image: an array ((H, W[, C]), uint8 or floats in [0, 1]) or PIL image, resized to the labels if
        need be; None draws the class colours alone.
    alpha: weight of the class colour over the image.
    outline: width in px (0: none; None: 1, or 2 when the drawn short side is >= 600 px) of the lines
        drawn in `outline_colour` on the boundaries between label regions.
    names: write each class's name on its region (where the text fits).
    legend: a legend to the right: the classes present, by decreasing area, with their share
        ('<0.1%' for one too small to show at that precision).
    font_size: text height in px; by default it scales with the drawn picture (>= Pillow 10.1).
    scale: the picture is drawn (H * scale, W * scale), pixels repeated; None: `display_scale` (small
        images come out upscaled). Outlines, names and legend are drawn at that size, never scaled.
    Labels outside [0, len(class_names)) are left untinted and out of the legend.
    """
    labels = np.asarray(labels)
    rgb = _as_rgb(image, labels.shape)
    factor = _checked_scale(scale, labels.shape)
    labels = _upscale(labels, factor)
    rgb = None if rgb is None else _upscale(rgb, factor)
    height, width = labels.shape
    count = len(class_names)
    colours = class_colours(list(class_names))
    valid = (labels >= 0) & (labels < count)
    safe = np.where(valid, labels, 0) if count else np.zeros_like(labels)
    if rgb is None:
        rgb, alpha = np.zeros((height, width, 3), dtype=np.uint8), 1.0
    tint = colours[safe].astype(np.float32) if count else np.zeros((height, width, 3), np.float32)
    blended = rgb.astype(np.float32) * (1 - alpha) + tint * alpha
    blended = np.where(valid[..., None], blended, rgb).round().astype(np.uint8)
    if outline is None:
        outline = 2 if min(height, width) >= 600 else 1
    if outline > 0:
        blended[boundaries(labels, outline)] = outline_colour

    present, counts = np.unique(labels[valid], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    present, counts = present[order], counts[order]
    size = font_size or max(12, min(40, round(min(height, width) / 22)))
    font = _font(size)
    _, line_top, _, line_h = _text_size(font, "Ag")
    row, margin = line_h + max(6, line_h // 2), 8
    entries = [(int(index), f"{class_names[index]} {_share_text(int(c), labels.size)}")
               for index, c in zip(present, counts)] if legend else []
    columns: list[list[tuple[int, str]]] = []
    column_widths: list[int] = []
    if entries:
        per_column = max(1, (max(height, 4 * row) - 2 * margin) // row)
        columns = [entries[i:i + per_column] for i in range(0, len(entries), per_column)]
        column_widths = [line_h + 3 * margin // 2 + max(_text_size(font, text)[2] for _, text in column) + margin
                         for column in columns]
    legend_h = 2 * margin + row * max(len(c) for c in columns) if columns else 0
    note_h = line_h + margin if note else 0  # a strip under the picture, so the note hides nothing
    canvas = Image.new("RGB", (width + sum(column_widths), max(height + note_h, legend_h)), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    if names and count:
        _name_regions(draw, labels, present, list(class_names), colours, size)
    x = width
    for column, column_width in zip(columns, column_widths):
        for line, (index, text) in enumerate(column):
            y = margin + line * row
            draw.rectangle([x + margin, y, x + margin + line_h, y + line_h],
                           fill=tuple(int(c) for c in colours[index]), outline="black")
            draw.text((x + margin + line_h + margin // 2, y - line_top), text, fill="black", font=font)
        x += column_width
    if note:
        draw.text((4, height + margin // 2 - line_top), note, fill=(200, 0, 0), font=font)
    return canvas


def drawn_boxes(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float | None = DRAW_NMS_IOU
                ) -> np.ndarray:
    """(N, 4) xyxy boxes, (N,) scores and labels -> the indices of the boxes a drawing shows, best first: those
    class-wise hard NMS at IoU `iou` keeps (None: all), so the near duplicates that soft-NMS keeps with decayed
    scores are not drawn over each other."""
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if iou is None:
        return np.argsort(-scores, kind="stable")
    import torch  # here, so that palettes, overlays and score_text do not load torch
    from torchvision.ops import batched_nms
    keep = batched_nms(torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4), torch.from_numpy(scores),
                       torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1), float(iou))
    return keep.numpy()


def _caption_spots(box: np.ndarray, size: tuple[int, int], canvas: tuple[int, int]) -> np.ndarray:
    """(C, 2) top-left corners (x, y) where a `size` (width, height) caption of `box` (x0, y0, x1, y1 in pixels) may
    go, best first: above the box, below it, inside its top; then one caption height further up, further down,
    further inside, and so on; each left-aligned with the box, then right-aligned; all within the canvas."""
    (w, h), (canvas_w, canvas_h) = size, canvas
    x0, y0, x1, y1 = (int(v) for v in box)
    xs = list(dict.fromkeys(min(max(0, x), max(0, canvas_w - w)) for x in (x0, x1 - w)))
    spots = []
    for step in range(-(-canvas_h // max(1, h)) + 1):
        rows = [y0 - h * (step + 1), y1 + h * step]  # above, below
        if step == 0 or y0 + h * (step + 1) <= y1:  # inside: its top row always, further rows while they fit
            rows.append(y0 + h * step)
        spots += [(x, y) for y in rows if 0 <= y <= canvas_h - h for x in xs]
    return np.array(spots, dtype=np.int64).reshape(-1, 2)


def place_labels(boxes: np.ndarray, sizes: np.ndarray, canvas: tuple[int, int]) -> list[tuple[int, int] | None]:
    """Where to put the captions of boxes so that no two overlap, greedily in the given order (best box first).

    boxes: (N, 4) xyxy in the picture's pixels; sizes: (N, 2) caption (width, height) in px; canvas: the picture's
    (width, height). Returns per box the top-left (x, y) of its caption, which then covers columns x .. x + w - 1
    and rows y .. y + h - 1: above the box where that is free, else below it, else inside its top, else the free
    place nearest those (`_caption_spots`); None where no free place lies within the picture.
    """
    taken = np.zeros((0, 4), dtype=np.int64)  # x0, y0, x1, y1 (exclusive) of the captions placed so far
    places: list[tuple[int, int] | None] = []
    for box, (w, h) in zip(np.asarray(boxes).reshape(-1, 4), np.asarray(sizes, dtype=np.int64).reshape(-1, 2)):
        spots = _caption_spots(box, (int(w), int(h)), canvas)
        ends = spots + np.array([w, h])
        clash = ((spots[:, None, 0] < taken[None, :, 2]) & (taken[None, :, 0] < ends[:, None, 0])
                 & (spots[:, None, 1] < taken[None, :, 3]) & (taken[None, :, 1] < ends[:, None, 1])).any(axis=1)
        free = np.flatnonzero(~clash)
        if len(free):
            x, y = (int(v) for v in spots[free[0]])
            taken = np.vstack([taken, [x, y, x + w, y + h]])
            places.append((x, y))
        else:
            places.append(None)
    return places


def draw_boxes(image, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str],
               width: int | None = None, font_size: int | None = None, *, scale: int | None = None,
               nms_iou: float | None = DRAW_NMS_IOU) -> Image.Image:
    """(H, W, 3) image + (N, 4) xyxy boxes, (N,) labels and scores -> a PIL image with each box outlined in its
    class colour and captioned 'name 0.87' (`score_text`: the score the JSON writes), the best box on top.

    Only the boxes `drawn_boxes` keeps are drawn (class-wise hard NMS at `nms_iou`; None: all of them): the results
    and their JSON keep soft-NMS's near duplicates, the picture does not. Captions are placed by `place_labels`
    (none covers another; one that finds no free place is left out, its box still drawn).
    width: outline width in px; font_size: caption text height in px (both scale with the drawn picture by default).
    scale: the picture is drawn (H * scale, W * scale), pixels repeated; None: `display_scale` (small images come out
    upscaled). Lines and text are drawn at that size.
    """
    shape = image.size[::-1] if isinstance(image, Image.Image) else np.asarray(image).shape[:2]
    factor = _checked_scale(scale, shape)
    rgb = _upscale(_as_rgb(image, shape), factor)
    canvas = Image.fromarray(rgb)
    height, img_width = rgb.shape[:2]
    draw = ImageDraw.Draw(canvas)
    colours = class_colours(list(class_names))
    boxes, labels = np.asarray(boxes, dtype=np.float64).reshape(-1, 4), np.asarray(labels).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    shown = drawn_boxes(boxes, scores, labels, nms_iou)
    pixels = np.clip(np.round(boxes[shown] * factor), 0, [img_width, height, img_width, height]).astype(np.int64)
    width = width or max(1, round(min(height, img_width) / 200))
    size = font_size or max(12, min(32, round(min(height, img_width) / 28)))
    font = _font(size)
    _, line_top, _, line_h = _text_size(font, "Agy")
    pad = max(1, size // 8)
    texts = [f"{class_names[int(labels[k])]} {score_text(scores[k])}" for k in shown]
    inks = [_text_size(font, text) for text in texts]  # (left, top, width, height)
    sizes = np.array([(ink[2] + 2 * pad, line_h + 2 * pad) for ink in inks], dtype=np.int64).reshape(-1, 2)
    places = place_labels(pixels, sizes, (img_width, height))
    box_colours = [tuple(int(c) for c in colours[int(labels[k])]) for k in shown]
    for (x0, y0, x1, y1), colour in reversed(list(zip(pixels.tolist(), box_colours))):
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=width)
    for place, text, ink, (w, h), colour in reversed(list(zip(places, texts, inks, sizes.tolist(), box_colours))):
        if place is not None:
            x, y = place
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=colour)
            draw.text((x + pad - ink[0], y + pad - line_top), text, fill=_ink(colour), font=font)
    return canvas
