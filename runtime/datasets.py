"""Segmentation datasets on disk: the registered benchmarks (SPEC §5.1, §3.1) and the generic layout.

Torch-free on purpose: training, evaluation and `scan data` all list and read datasets
through this module, so a dataset problem surfaces as one clear line before any model loads.

Generic layout (DESIGN.md "CLI contract", also what `scan data synth` writes)::

    DIR/classes.json                 ["sky", "grass", ...] or {"classes": [...], "ignore_label": 255}
    DIR/images/<split>/<stem>.jpg    (.jpg, .jpeg or .png; or DIR/images/ directly, without splits)
    DIR/annotations/<split>/<stem>.png   class indices, ignore 255 unless classes.json says otherwise
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ScanError
from .files import atomic_write
from .images import load_image
from .vocab import benchmark_vocabularies


class DatasetError(ScanError, ValueError):
    """A dataset that cannot be used; the message names the file or folder and the fix."""


DATA_ROOT_ENV = "DETECTRON2_DATASETS"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_ROOT_HINT = f"set the root with --data-root DIR or {DATA_ROOT_ENV}=DIR"
_GENERIC_HINT = 'DIR/classes.json, DIR/images/<split>/*.jpg|png and DIR/annotations/<split>/<stem>.png'


def _root_and_source(explicit: str | Path | None) -> tuple[Path, str]:
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser(), "--data-root"
    env = os.environ.get(DATA_ROOT_ENV, "")
    if env:
        return Path(env).expanduser(), DATA_ROOT_ENV
    return Path("datasets"), "the default ./datasets"


def data_root(explicit: str | Path | None = None) -> Path:
    """--data-root, else $DETECTRON2_DATASETS, else ./datasets (detectron2's own rule)."""
    return _root_and_source(explicit)[0]


@dataclass(frozen=True)
class BenchmarkLayout:
    """Where one registered dataset lives under the data root (SPEC §5.1 table)."""

    name: str
    official_name: str
    vocabulary: str
    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    ignore_label: int
    split: str


def _layout(name, official, vocab, images, labels, label_suffix, ignore, split) -> BenchmarkLayout:
    return BenchmarkLayout(name, official, vocab, images, labels, ".jpg", label_suffix, ignore, split)


BENCHMARKS: dict[str, BenchmarkLayout] = {
    b.name: b
    for b in (
        _layout("coco171_train", "coco_2017_train_stuff_sem_seg", "coco171", "coco/train2017",
                "coco/stuffthingmaps_detectron2/train2017", ".png", 255, "train"),
        _layout("ade150_val", "ade20k_sem_seg_val", "ade150", "ADEChallengeData2016/images/validation",
                "ADEChallengeData2016/annotations_detectron2/validation", ".png", 255, "val"),
        _layout("ade847_val", "ade20k_full_sem_seg_val", "ade847", "ADE20K_2021_17_01/images_detectron2/validation",
                "ADE20K_2021_17_01/annotations_detectron2/validation", ".tif", 65535, "val"),
        _layout("pc59_val", "pascal_context_59_sem_seg_val", "pc59", "VOCdevkit/VOC2010/JPEGImages",
                "VOCdevkit/VOC2010/annotations_detectron2/pc59_val", ".png", 255, "val"),
        _layout("pc459_val", "pascal_context_459_sem_seg_val", "pc459", "VOCdevkit/VOC2010/JPEGImages",
                "VOCdevkit/VOC2010/annotations_detectron2/pc459_val", ".tif", 65535, "val"),
        _layout("voc20_val", "pascalvoc20_sem_seg_val", "voc20", "VOCdevkit/VOC2012/JPEGImages",
                "VOCdevkit/VOC2012/annotations_detectron2/val", ".png", 255, "val"),
    )
}

# The label folders are not shipped by the dataset authors; these scripts of the official repo write them.
_PREPARE = {"coco171": "prepare_coco_stuff_sem_seg.py", "ade150": "prepare_ade20k_sem_seg.py",
            "ade847": "prepare_ade20k_full_sem_seg.py", "pc59": "prepare_pascal_context.py",
            "pc459": "prepare_pascal_context.py", "voc20": "prepare_voc_sem_seg.py"}


def _benchmark(spec: str) -> BenchmarkLayout | None:
    """Our names, detectron2's names and the bare vocabulary names all name a benchmark."""
    for layout in BENCHMARKS.values():
        if spec in (layout.name, layout.official_name, layout.vocabulary):
            return layout
    return None


# -- labels ------------------------------------------------------------------------------------

def read_label(path: Path) -> np.ndarray:
    """A label map as int64: 8-bit or palette PNG, 16-bit PNG ("I;16"/"I"), 16-bit TIFF."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"label not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            # "P" keeps its palette indices: VOC-style labels are palette PNGs whose indices are the classes.
            if mode in ("L", "P", "1") or mode == "I" or mode.startswith("I;16"):
                return np.array(image).astype(np.int64)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"cannot read label {path}: {exc} (is it a complete PNG/TIFF file?)") from None
    raise DatasetError(
        f"label {path} has image mode {mode}: labels must be single-channel class indices "
        "(8/16-bit PNG or 16-bit TIFF), not colour or float images; convert it to class ids first"
    )


def write_label(path: Path, label: np.ndarray, ignore_label: int) -> None:
    """8-bit PNG when everything fits in a byte (ignore <= 255), else 16-bit PNG; written atomically."""
    label = np.asarray(label)
    if label.ndim != 2 or label.size == 0 or not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        raise DatasetError(f"cannot write label {path}: expected a non-empty HxW integer array, got "
                           f"{label.dtype} of shape {label.shape}")
    low, high = int(label.min()), int(label.max())
    if low < 0 or high > 65535 or not 0 <= ignore_label <= 65535:
        raise DatasetError(f"cannot write label {path}: values {low}..{high} (ignore {ignore_label}) do not fit "
                           "a 16-bit PNG; class ids and the ignore label must lie in 0..65535")
    if high <= 255 and ignore_label <= 255:
        image = Image.fromarray(label.astype(np.uint8))
    else:
        image = Image.fromarray(label.astype(np.uint16))  # mode "I;16": a 16-bit greyscale PNG
    atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))


# -- datasets ----------------------------------------------------------------------------------

@dataclass
class SegmentationDataset:
    """Image/label pairs sorted by file stem, with the class names the label values index."""

    name: str
    root: Path
    class_names: list[str]
    ignore_label: int
    split: str
    items: list[tuple[Path, Path]]
    benchmark: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.items)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(HxWx3 uint8 RGB image, HxW int64 label); a label of another size than its image is refused."""
        image_path, label_path = self.items[index]
        image, label = load_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise self._size_error(label_path, image_path, label.shape, image.shape[:2])
        return image, label

    def check_labels(self, limit: int | None = None) -> None:
        """Read the labels (all, or the first `limit`): values in [0, K) or the ignore label, sizes as the images."""
        count = len(self.items) if limit is None else min(limit, len(self.items))
        for image_path, label_path in self.items[:count]:
            label = read_label(label_path)
            values = np.unique(label)
            bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.ignore_label)]
            if bad.size:
                shown = ", ".join(str(int(v)) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
                raise DatasetError(
                    f"label {label_path} has values {shown} outside the {self.num_classes} classes of {self.name} "
                    f"(0..{self.num_classes - 1}) and its ignore label {self.ignore_label}: "
                    + self._relabel_fix()
                )
            try:
                with Image.open(image_path) as image:
                    width, height = image.size  # header only: no need to decode every image
            except (UnidentifiedImageError, OSError, SyntaxError) as exc:
                raise DatasetError(f"cannot read image {image_path}: {exc} (is it a complete JPEG/PNG file?)") from None
            if (height, width) != label.shape:
                raise self._size_error(label_path, image_path, label.shape, (height, width))

    def _relabel_fix(self) -> str:
        if self.benchmark is None:
            return "relabel the file, or list every class in classes.json (and set its ignore_label)"
        return f"re-create the labels with {_PREPARE[self.benchmark]} (SPEC §5.1)"

    def _size_error(self, label_path, image_path, label_hw, image_hw) -> DatasetError:
        return DatasetError(
            f"label {label_path} is {label_hw[1]}x{label_hw[0]} (WxH) but its image {image_path} is "
            f"{image_hw[1]}x{image_hw[0]}: a label must have its image's size; re-create it from the image"
        )


def _list_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> file for the visible files with one of `suffixes` (case-insensitive)."""
    found: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") or path.suffix.lower() not in suffixes or not entry.is_file():
                continue
            if path.stem in found:
                raise DatasetError(f"{found[path.stem]} and {path} share the stem {path.stem!r}: labels pair with "
                                   "images by stem, so keep only one of them")
            found[path.stem] = path
    return found


def _open_benchmark(layout: BenchmarkLayout, explicit_root, split: str | None) -> SegmentationDataset:
    if split is not None and split != layout.split:
        raise DatasetError(f"dataset {layout.name} has only the {layout.split!r} split registered (asked for "
                           f"{split!r}); drop the split or pick another dataset")
    root, source = _root_and_source(explicit_root)
    image_dir, label_dir = root / layout.image_dir, root / layout.label_dir
    missing = next((p for p in (root, image_dir, label_dir) if not p.is_dir()), None)
    if missing is not None:
        made_by = f" (the labels are written by {_PREPARE[layout.vocabulary]})" if missing == label_dir else ""
        raise DatasetError(
            f"dataset {layout.name} ({layout.official_name}) not found: expected {image_dir}/*{layout.image_suffix} "
            f"and {label_dir}/*{layout.label_suffix}, but {missing} does not exist{made_by}; the data root {root} "
            f"comes from {source}: {_ROOT_HINT}"
        )
    images = _list_files(image_dir, (layout.image_suffix,))
    labels = _list_files(label_dir, (layout.label_suffix,))
    # As detectron2's load_sem_seg: keep the stems present in both (COCO has no label for all-ignore images,
    # PASCAL-Context labels only the val ids of the shared JPEGImages folder).
    stems = sorted(images.keys() & labels.keys())
    if not stems:
        raise DatasetError(
            f"dataset {layout.name} has no image/label pairs: {len(images)} *{layout.image_suffix} in {image_dir} and "
            f"{len(labels)} *{layout.label_suffix} in {label_dir} share no file stem; check both folders"
        )
    return SegmentationDataset(
        name=layout.name, root=root, class_names=list(benchmark_vocabularies()[layout.vocabulary]),
        ignore_label=layout.ignore_label, split=layout.split,
        items=[(images[s], labels[s]) for s in stems], benchmark=layout.vocabulary,
    )


def _read_classes(path: Path) -> tuple[list[str], int]:
    fix = 'write a JSON list of class names, or {"classes": [...], "ignore_label": 255}'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path.parent} is not a dataset in the generic layout: {path} is missing; {fix} "
                           f"(expected {_GENERIC_HINT.replace('DIR', str(path.parent))})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc}): {fix}") from None
    names, ignore = (data.get("classes"), data.get("ignore_label", 255)) if isinstance(data, dict) else (data, 255)
    if not isinstance(names, list) or not names:
        raise DatasetError(f"{path} lists no class names: {fix}")
    for position, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{path}: class {position} is {name!r}, not a name: every class needs a non-empty name")
    names = [name.strip() for name in names]
    duplicate = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if duplicate is not None:
        raise DatasetError(f"{path} lists {duplicate!r} twice: class names must be unique (merge the two classes)")
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not len(names) <= ignore <= 65535:
        raise DatasetError(f"{path}: ignore_label {ignore!r} must be an integer from the number of classes "
                           f"({len(names)}) to 65535, e.g. 255 (or 65535 for more than 255 classes)")
    return names, ignore


def _open_generic(folder: Path, split: str) -> SegmentationDataset:
    names, ignore = _read_classes(folder / "classes.json")
    images_root = folder / "images"
    if not images_root.is_dir():
        raise DatasetError(f"{folder} is not a dataset in the generic layout: {images_root} does not exist "
                           f"(expected {_GENERIC_HINT.replace('DIR', str(folder))})")
    image_dir, label_dir = images_root / split, folder / "annotations" / split
    if not image_dir.is_dir():
        flat = _list_files(images_root, IMAGE_SUFFIXES)
        if not flat:
            splits = sorted(p.name for p in images_root.iterdir() if p.is_dir())
            raise DatasetError(f"dataset {folder} has no split {split!r}: {image_dir} does not exist "
                               f"(splits found: {', '.join(splits) or 'none'}); put the images in "
                               f"{image_dir}/ or, for a dataset without splits, directly in {images_root}/")
        image_dir, label_dir = images_root, folder / "annotations"  # a dataset without splits
    if not label_dir.is_dir():
        raise DatasetError(f"dataset {folder}: {label_dir} does not exist; put the PNG label of each image "
                           f"there, named <stem>.png (expected {_GENERIC_HINT.replace('DIR', str(folder))})")
    images = _list_files(image_dir, IMAGE_SUFFIXES)
    labels = _list_files(label_dir, (".png",))
    if not images:
        raise DatasetError(f"dataset {folder}: no .jpg/.jpeg/.png images in {image_dir}")
    stems = sorted(images)
    unlabelled = next((s for s in stems if s not in labels), None)
    if unlabelled is not None:
        raise DatasetError(f"image {images[unlabelled]} has no label {label_dir / (unlabelled + '.png')}: every "
                           "image of a generic dataset needs a PNG of class indices; add it or remove the image")
    return SegmentationDataset(name=folder.name, root=folder, class_names=names, ignore_label=ignore, split=split,
                               items=[(images[s], labels[s]) for s in stems], benchmark=None)


def open_dataset(spec: str | Path, data_root: str | Path | None = None, split: str | None = None) -> SegmentationDataset:
    """A registered benchmark (our, detectron2's or the vocabulary's name) or a folder in the generic layout."""
    if isinstance(spec, str):
        layout = _benchmark(spec.strip())
        if layout is not None:
            return _open_benchmark(layout, data_root, split)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _open_generic(path, split or "train")
    if path.exists():
        raise DatasetError(f"{path} is a file, not a dataset: pass a registered name or a folder ({_GENERIC_HINT})")
    raise DatasetError(
        f"unknown dataset {str(spec)!r}: not a registered name ({', '.join(BENCHMARKS)}, or their detectron2 or "
        f"vocabulary names) and no folder {path} exists; a folder in the generic layout ({_GENERIC_HINT}) works too"
    )
