"""Label maps to pictures: a colour overlay with a legend of the classes present (pillow only)."""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def palette(num_classes: int) -> np.ndarray:
    """(K, 3) uint8 colours, well separated and stable for a given class index.

    Hues advance by the golden ratio so neighbouring indices get distant colours.
    """
    golden = 0.618033988749895
    colours = []
    for i in range(num_classes):
        hue = (i * golden) % 1.0
        sat = 0.65 + 0.35 * ((i // 7) % 2)
        val = 0.95 - 0.25 * ((i // 3) % 2)
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


def overlay(image: np.ndarray, label_map: np.ndarray, classes: list[str], alpha: float = 0.5, max_legend: int = 40) -> Image.Image:
    """Blend class colours over the image and append a legend of the classes present.

    Args:
        image: (H, W, 3) uint8 RGB, the same size as `label_map`.
        label_map: (H, W) integer class indices into `classes`.
        classes: class names.
        alpha: weight of the colour layer.
        max_legend: at most this many legend rows (classes with most pixels first).
    """
    if image.shape[:2] != label_map.shape:
        raise ValueError(f"image {image.shape[:2]} and label map {label_map.shape} differ in size")
    colours = palette(len(classes))
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours[label_map].astype(np.float32)
    picture = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))

    counts = np.bincount(label_map.ravel(), minlength=len(classes))
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    shown = present[:max_legend]
    font = ImageFont.load_default()
    row = 18
    height, width = label_map.shape
    texts = [f"{classes[i]} ({100.0 * counts[i] / label_map.size:.1f}%)" for i in shown]
    if len(present) > len(shown):
        texts.append(f"... {len(present) - len(shown)} more")
    measure = ImageDraw.Draw(picture)
    text_w = max((measure.textlength(t, font=font) for t in texts), default=0)
    legend_w = int(text_w) + 36
    canvas = Image.new("RGB", (width + legend_w, max(height, row * len(texts) + 8)), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for n, text in enumerate(texts):
        y = 4 + n * row
        if n < len(shown):
            draw.rectangle([width + 6, y + 2, width + 20, y + 14], fill=tuple(int(c) for c in colours[shown[n]]), outline=(0, 0, 0))
        draw.text((width + 26, y + 1), text, fill=(0, 0, 0), font=font)
    return canvas


def label_image(label_map: np.ndarray, num_classes: int) -> Image.Image:
    """Class indices as a PNG-ready image: 8-bit up to 256 classes, else 16-bit."""
    if num_classes <= 256:
        return Image.fromarray(label_map.astype(np.uint8))
    return Image.fromarray(label_map.astype(np.uint16))
