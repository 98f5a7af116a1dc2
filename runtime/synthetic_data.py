"""A synthetic segmentation dataset: scenes a small model learns in a few hundred iterations.

Each class has its own look (base colour, jittered per instance, and a texture kind) and
the things their own shape family, so the task is learnable; positions, sizes, occlusions
and band heights are random, so it is not trivial. Stuff fills horizontal bands (sky or
wall above a wavy horizon, grass/water/road below); things are drawn on top in random
order, the label being the top-most shape, some with a thin ignore (255) border as in VOC.
Everything comes from one numpy Generator and PIL drawing: same seed, same bytes.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .datasets import DatasetError, write_label
from .files import replace_folder

IGNORE = 255
GENERATOR = "scan-deploy synthetic_data"  # what synthetic.json says, so a rerun may replace the folder


@dataclass(frozen=True)
class Look:
    colour: tuple[int, int, int]
    texture: str  # flat | stripes | checker | noise | dots | gradient
    angle: float = 0.0  # degrees of the direction the pattern varies along: 0 = vertical stripes
    shape: str = "band"  # band (stuff) | ellipse | rectangle | triangle | house | star


LOOKS: dict[str, Look] = {
    "sky": Look((125, 175, 235), "gradient", angle=90.0),
    "wall": Look((185, 160, 135), "checker"),
    "grass": Look((75, 150, 55), "noise"),
    "water": Look((35, 85, 165), "stripes", angle=90.0),  # horizontal waves
    "road": Look((100, 100, 106), "flat"),
    "ball": Look((225, 55, 45), "dots", shape="ellipse"),
    "box": Look((205, 150, 70), "stripes", angle=45.0, shape="rectangle"),
    "tree": Look((25, 85, 35), "dots", shape="triangle"),
    "house": Look((215, 205, 120), "stripes", angle=0.0, shape="house"),
    "flower": Look((225, 70, 190), "gradient", angle=0.0, shape="star"),
}
SYNTH_CLASSES: list[str] = list(LOOKS)
STUFF_ABOVE, STUFF_BELOW = ("sky", "wall"), ("grass", "water", "road")
THINGS = [name for name, look in LOOKS.items() if look.shape != "band"]


def _texture(look: Look, rng: np.random.Generator, rows: slice, cols: slice, scale: float) -> np.ndarray:
    """The fill of one instance over its bounding box: the class look with colour, angle and scale jitter."""
    base = np.clip(np.asarray(look.colour, np.float32) + rng.normal(0, 12, 3), 0, 255).astype(np.float32)
    angle = math.radians(look.angle + rng.uniform(-15, 15))
    period = rng.uniform(6, 11) * max(1.0, scale / 256)  # patterns keep their look on larger images
    ys, xs = np.mgrid[rows, cols].astype(np.float32)
    height, width = ys.shape
    along = xs * math.cos(angle) + ys * math.sin(angle)
    if look.texture == "stripes":  # two tones: the base and a darker one
        shade = np.where(np.sin(along * (2 * math.pi / period)) > 0, 1.0, 0.62)
    elif look.texture == "checker":
        shade = np.where(((xs // period + ys // period) % 2) == 0, 1.0, 0.72)
    elif look.texture == "noise":
        shade = 1.0 + rng.normal(0, 0.16, (height, width)).astype(np.float32)
    elif look.texture == "dots":  # light dots on a grid
        half = period / 2
        near = (np.mod(xs, period) - half) ** 2 + (np.mod(ys, period) - half) ** 2 < (0.3 * period) ** 2
        shade = np.where(near, 1.55, 1.0)
    elif look.texture == "gradient":
        span = max(float(along.max() - along.min()), 1.0)
        shade = 0.75 + 0.5 * (along - along.min()) / span
    else:
        shade = np.ones((height, width), np.float32)
    fill = base * shade[..., None]
    return fill + rng.normal(0, 4, (height, width, 1)).astype(np.float32)  # faint grain, so nothing is one value


def _polygon(shape: str, rng: np.random.Generator, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """The outline of one thing, rotated about its centre."""
    if shape == "ellipse":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        points = np.stack([np.cos(t), rng.uniform(0.75, 1.0) * np.sin(t)], 1)
        turn = rng.uniform(0, 180)
    elif shape == "rectangle":
        aspect = rng.uniform(0.5, 1.0)
        points = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]], float)
        turn = rng.uniform(-35, 35)
    elif shape == "triangle":  # a tall tree crown, roughly upright
        points = np.array([[0, -1.2], [0.7, 0.8], [-0.7, 0.8]])
        turn = rng.uniform(-12, 12)
    elif shape == "house":  # walls and a roof in one pentagon
        points = np.array([[-0.8, 1], [0.8, 1], [0.8, -0.1], [0, -0.9], [-0.8, -0.1]])
        turn = rng.uniform(-8, 8)
    else:  # star: a flower with 5 to 8 petals
        tips = int(rng.integers(5, 9))
        t = np.linspace(0, 2 * math.pi, 2 * tips, endpoint=False)
        reach = np.where(np.arange(2 * tips) % 2 == 0, 1.0, rng.uniform(0.35, 0.6))
        points = np.stack([reach * np.cos(t), reach * np.sin(t)], 1)
        turn = rng.uniform(0, 360)
    c, s = math.cos(math.radians(turn)), math.sin(math.radians(turn))
    rotated = points @ np.array([[c, s], [-s, c]]) * radius
    return [(float(cx + x), float(cy + y)) for x, y in rotated]


def _mask(height: int, width: int, draw_fn) -> np.ndarray:
    canvas = Image.new("L", (width, height), 0)
    draw_fn(ImageDraw.Draw(canvas))
    return np.asarray(canvas, dtype=bool)


def _wavy_band(rng: np.random.Generator, height: int, width: int, top: float) -> np.ndarray:
    """Pixels below a wavy line around row `top`."""
    xs = np.arange(width)
    amplitude = rng.uniform(0, 0.04) * height
    line = top + amplitude * np.sin(xs * (2 * math.pi / rng.uniform(0.4, 1.5) / width) + rng.uniform(0, 2 * math.pi))
    return np.arange(height)[:, None] >= line[None, :]


def synthetic_sample(height: int, width: int, seed: int, include: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, HxW int64 label) of one scene; `include` names a class the scene must show."""
    if include is not None and include not in LOOKS:
        raise DatasetError(f"unknown synthetic class {include!r}: choose one of {', '.join(SYNTH_CLASSES)}")
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    label = np.zeros((height, width), np.int64)

    def paint(name: str, mask: np.ndarray) -> None:
        # Textures are computed over the mask's bounding box only: full-frame fills would triple the time.
        hit_rows, hit_cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if hit_rows.size == 0:
            return
        rows, cols = slice(hit_rows[0], hit_rows[-1] + 1), slice(hit_cols[0], hit_cols[-1] + 1)
        inside = mask[rows, cols]
        np.copyto(image[rows, cols], _texture(LOOKS[name], rng, rows, cols, min(height, width)), where=inside[..., None])
        np.copyto(label[rows, cols], SYNTH_CLASSES.index(name), where=inside)

    above = include if include in STUFF_ABOVE else ("sky" if rng.random() < 0.7 else "wall")
    paint(above, np.ones((height, width), bool))
    below = [str(name) for name in rng.permutation(STUFF_BELOW)[: int(rng.integers(1, 4))]]
    if include in STUFF_BELOW and include not in below:
        below[0] = include
    horizon = rng.uniform(0.25, 0.6) * height
    tops = [horizon, *np.sort(horizon + rng.uniform(0.1, 0.85, len(below) - 1) * (height - horizon))]
    for name, top in zip(below, tops):
        paint(name, _wavy_band(rng, height, width, float(top)))

    things = [str(t) for t in rng.choice(THINGS, int(rng.integers(2, 7)))]
    if include in THINGS and include not in things:
        things[int(rng.integers(len(things)))] = include
    short = min(height, width)
    bordered = [rng.random() < 0.35 for _ in things]
    bordered[-1] = bordered[-1] or not any(bordered)  # the top-most always shows, so every scene has ignore pixels
    for name, border in zip(things, bordered):
        radius = max(3.0, short * math.exp(rng.uniform(math.log(0.05), math.log(0.3))))
        centre = (rng.uniform(0, width), rng.uniform(0.15 * height, height))
        points = _polygon(LOOKS[name].shape, rng, *centre, radius)
        inside = _mask(height, width, lambda d: d.polygon(points, fill=1))
        paint(name, inside)
        if border:
            line = int(rng.integers(1, 4))
            edge = _mask(height, width, lambda d: d.line(points + points[:1], fill=1, width=line, joint="curve"))
            label[edge] = IGNORE  # the pixels keep their colour: only the label is unsure there
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


# -- the dataset on disk -------------------------------------------------------------------------

def _check_arguments(images, size, seed, val_fraction) -> tuple[int, int]:
    def is_int(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    if not is_int(images) or images < 2:
        raise DatasetError(f"images must be an integer of at least 2, so that train and val get one each (got {images!r})")
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(is_int(v) and v >= 32 for v in size):
        raise DatasetError(f"size must be (height, width) with both at least 32 pixels (got {size!r})")
    if not is_int(seed) or seed < 0:
        raise DatasetError(f"seed must be a non-negative integer (got {seed!r})")
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DatasetError(f"val_fraction must lie strictly between 0 and 1 (got {val_fraction!r})")
    return int(size[0]), int(size[1])


def _is_previous_synthetic(folder: Path) -> bool:
    try:
        return json.loads((folder / "synthetic.json").read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out} is a file: give a new or empty folder for the synthetic dataset")
    if out.is_dir() and any(out.iterdir()) and not _is_previous_synthetic(out):
        raise DatasetError(f"refusing to write the synthetic dataset into {out}: the folder is not empty and is not a "
                           "previous synthetic dataset (no synthetic.json); choose a new or empty folder")


def _image_seed(seed: int, index: int) -> int:
    """Independent streams per image (seed 1's image 0 is not seed 0's image 1)."""
    return int(np.random.SeedSequence([int(seed), index]).generate_state(1)[0])


def _write_split(folder: Path, split: str, indices: range, size, seed: int) -> dict:
    (folder / "images" / split).mkdir(parents=True)
    (folder / "annotations" / split).mkdir(parents=True)
    pixels = np.zeros(len(SYNTH_CLASSES) + 1, np.int64)  # the last slot counts ignore pixels
    present = np.zeros(len(SYNTH_CLASSES), np.int64)
    for position, index in enumerate(indices):
        # Cycling a required class through each split puts every class in any split of >= 10 images.
        include = SYNTH_CLASSES[position % len(SYNTH_CLASSES)]
        image, label = synthetic_sample(size[0], size[1], _image_seed(seed, index), include=include)
        stem = f"{index:06d}"
        Image.fromarray(image).save(folder / "images" / split / f"{stem}.jpg", format="JPEG", quality=95, subsampling=0)
        write_label(folder / "annotations" / split / f"{stem}.png", label, IGNORE)
        counts = np.bincount(np.where(label == IGNORE, len(SYNTH_CLASSES), label).ravel(), minlength=len(pixels))
        pixels += counts
        present += counts[:-1] > 0
    total = max(int(pixels.sum()), 1)
    return {
        "images": len(indices),
        "pixel_share": {name: round(int(pixels[i]) / total, 5) for i, name in enumerate(SYNTH_CLASSES)},
        "ignore_share": round(int(pixels[-1]) / total, 5),
        "images_with_class": {name: int(present[i]) for i, name in enumerate(SYNTH_CLASSES)},
        "missing_classes": [name for i, name in enumerate(SYNTH_CLASSES) if present[i] == 0],
    }


def write_synthetic_dataset(out: Path, images: int = 64, size: tuple[int, int] = (256, 256), seed: int = 0,
                            val_fraction: float = 0.25) -> dict:
    """Write `images` scenes of `size` (height, width) in the generic layout, split train/val; return a summary.

    The folder is built beside `out` and renamed into place, so `out` is never half-written;
    an existing `out` must be empty or a previous synthetic dataset (which is replaced).
    """
    out = Path(out).expanduser()
    height, width = _check_arguments(images, size, seed, val_fraction)
    n_val = min(images - 1, max(1, round(images * val_fraction)))
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        splits = {"train": range(0, images - n_val), "val": range(images - n_val, images)}
        per_split = {name: _write_split(built, name, indices, (height, width), seed) for name, indices in splits.items()}
        summary = {"generator": GENERATOR, "format": 1, "seed": int(seed), "size": [height, width],
                   "images": {name: part["images"] for name, part in per_split.items()}, "val_fraction": val_fraction,
                   "classes": list(SYNTH_CLASSES), "ignore_label": IGNORE, "splits": per_split}
        (built / "classes.json").write_text(json.dumps({"classes": SYNTH_CLASSES, "ignore_label": IGNORE}, indent=1))
        (built / "synthetic.json").write_text(json.dumps(summary, indent=1) + "\n")
        replace_folder(built, out)
    except BaseException:
        shutil.rmtree(built, ignore_errors=True)
        raise
    return {**summary, "out": str(out)}
