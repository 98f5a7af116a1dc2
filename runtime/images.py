"""Image input and the official test resize, with numpy and pillow only (no torch).

Shared by the eager pipeline and the deployed runtime so that both see the same pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ScanError


class ImageError(ScanError, ValueError):
    """An image that cannot be used; the message names the file and the problem."""


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """Any PIL mode to HxWx3 uint8 RGB.

    Greyscale is replicated, alpha is dropped (as detectron2's `read_image(format="RGB")`
    does), palettes are expanded, and 16/32-bit images are scaled to 8 bits instead of
    being clipped (PIL's own conversion would saturate everything above 255).
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(np.round(array * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_image(source) -> np.ndarray:
    """Read a path, a PIL image or an array into HxWx3 uint8 RGB, with clear errors."""
    if isinstance(source, np.ndarray):
        return as_rgb_array(source)
    if isinstance(source, Image.Image):
        return _to_rgb8(source)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated files fail here and not later
            return _to_rgb8(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"cannot read image {path}: {exc} (is it a complete PNG/JPEG file?)") from None


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ... as pillow reads them) -> HxWx3 uint8 RGB.

    The size is read from the header first: an image above `max_pixels` is refused before its
    pixels are decoded, so a small file cannot make the caller allocate gigabytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"encoded image of {width}x{height} pixels, more than {max_pixels}: resize it before sending")
            image.load()
            return _to_rgb8(image)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageError(f"cannot decode the image bytes: {exc} (send a complete PNG or JPEG file)") from None


def as_rgb_array(array: np.ndarray) -> np.ndarray:
    """Validate an in-memory image: HxW, HxWx1, HxWx3 or HxWx4, uint8 (or uint16, scaled)."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(f"expected an HxWx3 image array, got shape {tuple(array.shape)}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageError(f"empty image of shape {tuple(array.shape)}")
    if array.dtype == np.uint16:
        array = np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageError(f"expected a uint8 image array, got {array.dtype} (scale it to 0..255 and cast to uint8)")
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def shortest_edge_size(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
    """Output (h, w) of detectron2's `ResizeShortestEdge` (SPEC §1.2 step 2)."""
    scale = short / min(height, width)
    if height < width:
        new_h, new_w = short, scale * width
    else:
        new_h, new_w = scale * height, short
    if max(new_h, new_w) > max_size:
        rescale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * rescale, new_w * rescale
    return int(new_h + 0.5), int(new_w + 0.5)


def resize_shortest_edge(image: np.ndarray, short: int = 640, max_size: int = 2560) -> np.ndarray:
    """The official test resize: PIL bilinear on uint8 to the `shortest_edge_size`."""
    height, width = image.shape[:2]
    new_h, new_w = shortest_edge_size(height, width, short, max_size)
    if (new_h, new_w) == (height, width):
        return image
    resized = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)
