"""Pictures of predictions: colour overlays with a legend, and palette label PNGs."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, the Pascal VOC bit-interleaved palette (0 is black, 15 is person pink)."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for index in range(n):
        c, shift = index, 7
        while c:
            for channel in range(3):
                colours[index, channel] |= ((c >> channel) & 1) << shift
            c >>= 3
            shift -= 1
    return colours


def label_image(labels: np.ndarray, num_classes: int) -> Image.Image:
    """(H, W) labels -> a palette PNG image (mode P) for up to 256 classes, else 16-bit grey."""
    if num_classes <= 256:
        image = Image.fromarray(labels.astype(np.uint8), mode=None).convert("P")
        image.putpalette(palette(256).flatten().tolist())
        return image
    return Image.fromarray(labels.astype(np.uint16))


def overlay(image: np.ndarray, labels: np.ndarray, class_names: list[str], alpha: float = 0.55,
            note: str | None = None) -> Image.Image:
    """(H, W, 3) uint8 image + (H, W) labels -> the blended picture with a legend of the classes present."""
    colours = palette(len(class_names))
    blended = (image.astype(np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha).astype(np.uint8)
    present, counts = np.unique(labels, return_counts=True)
    order = np.argsort(-counts)
    height, width = labels.shape
    font = ImageFont.load_default(size=max(12, min(24, height // 30)))
    row = font.size + 8
    legend_width = max(160, 30 + max(int(font.getlength(f"{class_names[i]} 100.0%")) for i in present))
    canvas = Image.new("RGB", (width + legend_width, max(height, row * (len(present) + 2))), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for line, k in enumerate(order):
        index, y = present[k], 6 + line * row
        draw.rectangle([width + 8, y, width + 8 + font.size, y + font.size], fill=tuple(int(c) for c in colours[index]),
                       outline="black")
        share = 100.0 * counts[k] / labels.size
        draw.text((width + 16 + font.size, y), f"{class_names[index]} {share:.1f}%", fill="black", font=font)
    if note:
        draw.text((4, canvas.height - row), note, fill="red", font=font)
    return canvas
