"""Region/text pairs for the CLIP finetuning (SPEC §4.1), with numpy and pillow only (no torch).

SCAN finetunes CLIP on masked region crops paired with a text: ov-seg's mask-caption CSV
(tab-separated `filepath`/`title`, crops saved with the background fill RGB (124,116,103)), or,
here, the whole mask of each class of a segmentation dataset (ov-seg's GT-mask/class pairs).
Each sample also carries the region's full image (squashed to 224, bilinear), which the
contextual shift needs, and the mask = the pixels that are not exactly the fill colour after
the `--with-mask` RandomResizedCrop(224, scale (0.9, 1), bicubic), because that is how the
official loader recovers the mask from a crop. Drawing from a numpy Generator keeps it seeded.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.datasets import SegmentationDataset, read_label
from runtime.errors import ScanError
from runtime.files import atomic_write
from runtime.images import load_image

FILL = (124, 116, 103)  # ov-seg's background colour of region crops (SPEC §4.1)
CLIP_INPUT = 224
# CLIP (OpenAI) statistics in 0..1 units; the same values as scan_model.regions, which imports torch.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
FULL_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG")
_CACHE_FORMAT = 1


class RegionDataError(ScanError, ValueError):
    """Finetuning data that cannot be used; the message names the file or row and the fix."""


@dataclass(frozen=True)
class RegionRecord:
    image: str  # the full image of the region
    text: str
    class_id: int = -1  # index into the dataset's class names; -1 for CSV rows
    label: str | None = None  # label file (dataset regions)
    box: tuple[int, int, int, int] | None = None  # x0, y0, x1, y1 (exclusive) of the class mask
    region: str | None = None  # region crop file (CSV rows)
    source: str = ""  # for error messages: "file.csv line 7" or "label.png class 3 (sky)"


# -- dataset regions ---------------------------------------------------------------------------

def _cache_key(dataset: SegmentationDataset, min_pixels: int) -> str:
    items = []
    for pair in dataset.items:
        try:
            items.append([[str(path), (st := os.stat(path)).st_size, st.st_mtime_ns] for path in pair])
        except OSError as exc:
            raise RegionDataError(f"cannot read {exc.filename} of {dataset.name}: {exc.strerror}; "
                                  "reopen the dataset after it changed") from None
    payload = [_CACHE_FORMAT, dataset.name, dataset.split, list(dataset.class_names), int(dataset.ignore_label),
               int(min_pixels), items]
    return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()


def _read_cache(path: Path, key: str) -> list[RegionRecord] | None:
    """The cached records, or None when the file is missing, unreadable or for other inputs."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data["key"] != key:
            return None
        return [RegionRecord(**{**row, "box": tuple(int(v) for v in row["box"])}) for row in data["records"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _scan_regions(dataset: SegmentationDataset, min_pixels: int) -> list[RegionRecord]:
    records = []
    for image_path, label_path in dataset.items:
        label = read_label(label_path)
        values = label[label != dataset.ignore_label]
        bad = values[(values < 0) | (values >= dataset.num_classes)]
        if bad.size:
            raise RegionDataError(f"label {label_path} has value {int(bad[0])} outside the {dataset.num_classes} "
                                  f"classes of {dataset.name} (ignore {dataset.ignore_label}); fix the label")
        counts = np.bincount(values.ravel(), minlength=dataset.num_classes)
        for class_id in np.flatnonzero(counts >= min_pixels):
            mask = label == class_id
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
            name = dataset.class_names[class_id]
            records.append(RegionRecord(image=str(image_path), text=name, class_id=int(class_id),
                                        label=str(label_path), box=box,
                                        source=f"{label_path} class {int(class_id)} ({name})"))
    return records


def dataset_regions(dataset: SegmentationDataset, min_pixels: int = 256,
                    cache_dir: Path | None = None) -> list[RegionRecord]:
    """One record per (image, class with >= min_pixels pixels in its label), in item then class order."""
    if isinstance(min_pixels, bool) or not isinstance(min_pixels, (int, np.integer)) or min_pixels < 1:
        raise RegionDataError(f"min_pixels must be a positive integer (got {min_pixels!r})")
    cache = key = None
    if cache_dir is not None:
        key = _cache_key(dataset, int(min_pixels))
        cache = Path(cache_dir) / f"regions-{key[:32]}.json"
        cached = _read_cache(cache, key)
        if cached:  # an empty list is never written: a scan says why there is no region
            return cached
    records = _scan_regions(dataset, int(min_pixels))
    if not records:
        raise RegionDataError(f"no region of at least {min_pixels} pixels in {dataset.name} ({dataset.split}, "
                              f"{len(dataset.items)} images); lower min_pixels or check the labels")
    if cache is not None:
        text = json.dumps({"format": _CACHE_FORMAT, "key": key, "records": [asdict(r) for r in records]})
        try:
            atomic_write(cache, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        except OSError as exc:
            raise RegionDataError(f"cannot write the region cache {cache}: {exc.strerror}; "
                                  "pass a writable cache folder or none") from None
    return records


# -- ov-seg's mask-caption CSV -----------------------------------------------------------------

def _full_image(name: str, full_images: Path, found: dict[str, Path | None]) -> tuple[str, Path | None]:
    stem = name.split("_", 1)[0]
    if stem not in found:
        found[stem] = next((p for p in (full_images / (stem + s) for s in FULL_IMAGE_SUFFIXES) if p.is_file()), None)
    return stem, found[stem]


def read_ovseg_csv(csv_path: Path, full_images: Path) -> list[RegionRecord]:
    """Records of ov-seg's tab-separated `filepath`/`title` CSV, each with its full COCO image."""
    csv_path, full_images = Path(csv_path), Path(full_images)
    if not csv_path.is_file():
        raise RegionDataError(f"region CSV not found: {csv_path}; pass ov-seg's mask-caption CSV "
                              "(e.g. coco_proposal_1cap.csv)")
    if not full_images.is_dir():
        raise RegionDataError(f"full-image folder not found: {full_images}; pass the folder of the COCO images "
                              "(train2017) the regions were cut from")
    records, found = [], {}
    try:
        with open(csv_path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = [name.strip() for name in next(reader, [])]
            missing = [c for c in ("filepath", "title") if c not in header]
            if missing:
                raise RegionDataError(f"{csv_path} line 1: the header lacks the column(s) {', '.join(missing)} (it has "
                                      f"{', '.join(repr(h) for h in header) or 'none'}); write a tab-separated header "
                                      "with filepath and title")
            path_col, title_col = header.index("filepath"), header.index("title")
            for row in reader:
                where = f"{csv_path} line {reader.line_num}"
                if not row or row == [""]:
                    continue
                if len(row) != len(header):
                    raise RegionDataError(f"{where} has {len(row)} tab-separated field(s) but the header has "
                                          f"{len(header)}; separate filepath and title by one tab")
                filepath, title = row[path_col].strip(), row[title_col]
                if not filepath or not title.strip():
                    raise RegionDataError(f"{where}: empty {'filepath' if not filepath else 'title'}; "
                                          "fill it in or delete the row")
                region = Path(filepath) if Path(filepath).is_absolute() else csv_path.parent / filepath
                if not region.is_file():
                    raise RegionDataError(f"{where}: region file {region} not found; fix the path (relative paths "
                                          "are read from the CSV's folder)")
                if "_" not in region.name or region.name.startswith("_"):
                    raise RegionDataError(f"{where}: region name {region.name!r} has no COCO stem before a '_' "
                                          "(expected e.g. 000000000139_3.png); rename the crop")
                stem, image = _full_image(region.name, full_images, found)
                if image is None:
                    looked = ", ".join(str(full_images / (stem + s)) for s in FULL_IMAGE_SUFFIXES)
                    raise RegionDataError(f"{where}: no full image for {region.name} (looked for {looked}); "
                                          "pass the folder that holds the COCO images")
                records.append(RegionRecord(image=str(image), text=title, region=str(region), source=where))
    except UnicodeDecodeError as exc:
        raise RegionDataError(f"{csv_path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except csv.Error as exc:
        raise RegionDataError(f"{csv_path} is not a readable tab-separated file ({exc}); fix its quoting") from None
    if not records:
        raise RegionDataError(f"{csv_path} has no rows; it needs one region/text pair per line below the header")
    return records


# -- crops and samples -------------------------------------------------------------------------

def _empty_mask(record: RegionRecord) -> RegionDataError:
    return RegionDataError(f"empty mask in {record.source or record.region or record.image} (every pixel is the "
                           f"background fill (124,116,103)); drop this region or re-create its crop")


def _crop_and_image(record: RegionRecord) -> tuple[np.ndarray, np.ndarray | None]:
    """(the masked crop, the full image when it was loaded on the way)."""
    if record.region is not None:
        return load_image(record.region), None
    if record.label is None or record.box is None:
        raise RegionDataError(f"region record {record.source or record.image} has neither a region file nor a "
                              "label and box; build records with dataset_regions or read_ovseg_csv")
    image, label = load_image(record.image), read_label(Path(record.label))
    if image.shape[:2] != label.shape:
        raise RegionDataError(f"label {record.label} is {label.shape[1]}x{label.shape[0]} but its image "
                              f"{record.image} is {image.shape[1]}x{image.shape[0]}; re-create the label")
    x0, y0, x1, y1 = record.box
    crop = image[y0:y1, x0:x1].copy()
    crop[label[y0:y1, x0:x1] != record.class_id] = FILL
    return crop, image


def region_crop(record: RegionRecord) -> np.ndarray:
    """HxWx3 uint8: the CSV crop, or the image cut to the box with the pixels outside the mask = FILL."""
    crop = _crop_and_image(record)[0]
    if crop.size == 0 or not _foreground(crop).any():
        raise _empty_mask(record)
    return crop


def _foreground(pixels: np.ndarray) -> np.ndarray:
    return np.any(pixels != np.asarray(FILL, np.uint8), axis=-1)


def _normalise(pixels: np.ndarray) -> np.ndarray:
    """ToTensor then CLIP Normalize, in float32 as torchvision computes them: (3, H, W)."""
    scaled = pixels.astype(np.float32) / np.float32(255)
    mean, std = np.asarray(OPENAI_MEAN, np.float32), np.asarray(OPENAI_STD, np.float32)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(2, 0, 1))


def _random_resized_box(height: int, width: int, rng: np.random.Generator,
                        scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params drawing from `rng`: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # the central crop, clamped to the ratio range
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _resized(crop: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    picture = Image.fromarray(crop)
    if rng is not None:
        top, left, h, w = _random_resized_box(crop.shape[0], crop.shape[1], rng)
        picture = picture.crop((left, top, left + w, top + h))
    return np.asarray(picture.resize((size, size), Image.BICUBIC))


def region_sample(record: RegionRecord, rng: np.random.Generator | None, size: int = CLIP_INPUT) -> dict:
    """{"region": (3,S,S), "mask": (S,S) 0/1, "image": (3,S,S) float32, "text"}; rng None = evaluation."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise RegionDataError(f"size must be a positive integer (got {size!r})")
    crop, full = _crop_and_image(record)
    if crop.size == 0 or not _foreground(crop).any():
        raise _empty_mask(record)
    pixels = _resized(crop, size, rng)
    mask = _foreground(pixels)
    if not mask.any() and rng is not None:  # the random crop cut the region away: take the whole crop
        pixels = _resized(crop, size, None)
        mask = _foreground(pixels)
    if not mask.any():
        raise _empty_mask(record)
    full = load_image(record.image) if full is None else full
    squashed = np.asarray(Image.fromarray(full).resize((size, size), Image.BILINEAR))
    return {"region": _normalise(pixels), "mask": mask.astype(np.float32), "image": _normalise(squashed),
            "text": record.text}
