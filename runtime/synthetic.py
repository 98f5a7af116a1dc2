"""A synthetic scene the project draws itself: the embedded default input (no downloads)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


def synthetic_scene(height: int = 480, width: int = 640, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 RGB: sky gradient, ground, a sun, a house and a few random shapes."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height)[:, None, None]
    sky = (1 - rows) * np.array([110, 160, 235]) + rows * np.array([200, 225, 250])
    image = np.broadcast_to(sky, (height, width, 3)).copy()
    horizon = int(height * 0.62)
    image[horizon:] = np.array([70, 140, 60]) + rng.normal(0, 8, (height - horizon, width, 3))
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    sun = (int(width * 0.8), int(height * 0.18), int(min(height, width) * 0.08))
    draw.ellipse([sun[0] - sun[2], sun[1] - sun[2], sun[0] + sun[2], sun[1] + sun[2]], fill=(250, 220, 80))
    left, top = int(width * 0.15), int(height * 0.38)
    right, bottom = int(width * 0.45), horizon + int(height * 0.08)
    draw.rectangle([left, top, right, bottom], fill=(180, 90, 60))
    draw.polygon([(left - 15, top), ((left + right) // 2, top - int(height * 0.15)), (right + 15, top)], fill=(120, 40, 40))
    draw.rectangle([left + 20, top + 30, left + 60, top + 70], fill=(170, 210, 240))
    for _ in range(4):
        cx, cy = int(rng.integers(width // 2, width)), int(rng.integers(horizon, height))
        r = int(rng.integers(10, 40))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    return np.asarray(picture, dtype=np.uint8)
