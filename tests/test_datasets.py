"""Datasets on disk: the registered benchmarks, the generic layout, label files and the synthetic set."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.datasets import (
    BENCHMARKS,
    DATA_ROOT_ENV,
    DatasetError,
    data_root,
    open_dataset,
    read_label,
    write_label,
)
from runtime.errors import ScanError
from runtime.synthetic_data import SYNTH_CLASSES, synthetic_sample, write_synthetic_dataset
from runtime.vocab import benchmark_vocabularies


def _image(path: Path, height: int = 12, width: int = 16, suffix_format: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(str(path))).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=suffix_format)


def _fake_benchmark(root: Path, name: str, stems, labels: dict) -> None:
    """Images for every stem, and labels (HxW arrays) for the stems in `labels`, where SPEC §5.1 puts them."""
    layout = BENCHMARKS[name]
    for stem in stems:
        _image(root / layout.image_dir / f"{stem}.jpg")
    for stem, label in labels.items():
        path = root / layout.label_dir / f"{stem}{layout.label_suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if layout.label_suffix == ".tif":
            Image.fromarray(label.astype(np.uint16)).save(path, format="TIFF")
        else:
            write_label(path, label, layout.ignore_label)


def _generic(root: Path, classes, labels: dict, split: str | None = "train", size=(12, 16)) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "classes.json").write_text(json.dumps(classes))
    image_dir = root / "images" / split if split else root / "images"
    label_dir = root / "annotations" / split if split else root / "annotations"
    for stem, label in labels.items():
        _image(image_dir / f"{stem}.png", *size, suffix_format="PNG")
        if label is not None:
            label_dir.mkdir(parents=True, exist_ok=True)
            write_label(label_dir / f"{stem}.png", label, 255)
    return root


def test_registry_matches_the_spec_table():
    assert set(BENCHMARKS) == {"coco171_train", "ade150_val", "ade847_val", "pc59_val", "pc459_val", "voc20_val"}
    assert BENCHMARKS["ade847_val"].label_suffix == ".tif" and BENCHMARKS["ade847_val"].ignore_label == 65535
    assert BENCHMARKS["pc459_val"].label_dir == "VOCdevkit/VOC2010/annotations_detectron2/pc459_val"
    assert BENCHMARKS["coco171_train"].split == "train"
    for layout in BENCHMARKS.values():
        assert layout.vocabulary in benchmark_vocabularies()


def test_fake_ade150_opens_by_every_name_and_from_the_environment(tmp_path, monkeypatch):
    label = np.full((12, 16), 255, np.int64)
    label[:6] = 149
    # "c" has no label: detectron2 keeps only the stems present in both folders.
    _fake_benchmark(tmp_path, "ade150_val", ["b", "a", "c"], {"a": label, "b": label * 0})
    dataset = open_dataset("ade150_val", data_root=tmp_path)
    assert dataset.class_names == benchmark_vocabularies()["ade150"] and dataset.ignore_label == 255
    assert dataset.split == "val" and dataset.benchmark == "ade150" and len(dataset) == 2
    assert [image.stem for image, _ in dataset.items] == ["a", "b"]
    assert dataset.items[0][1] == tmp_path / "ADEChallengeData2016/annotations_detectron2/validation/a.png"
    image, read = dataset.read(0)
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8
    assert read.dtype == np.int64 and np.array_equal(read, label)
    dataset.check_labels()
    for alias in ("ade20k_sem_seg_val", "ade150"):
        assert open_dataset(alias, data_root=tmp_path).items == dataset.items
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert open_dataset("ade150_val").items == dataset.items
    monkeypatch.delenv(DATA_ROOT_ENV)
    assert data_root() == Path("datasets") and data_root(tmp_path / "x") == tmp_path / "x"


def test_fake_ade847_reads_16_bit_tiff_with_65535(tmp_path):
    label = np.array([[0, 846, 65535, 400]] * 12, np.int64).repeat(4, axis=1)
    _fake_benchmark(tmp_path, "ade847_val", ["x"], {"x": label})
    dataset = open_dataset("ade847", data_root=tmp_path)
    assert dataset.ignore_label == 65535 and len(dataset.class_names) == 847
    read = read_label(dataset.items[0][1])
    assert read.dtype == np.int64 and np.array_equal(read, label) and read.max() == 65535
    dataset.check_labels()


def test_missing_benchmark_names_the_layout_and_the_root_flag(tmp_path):
    with pytest.raises(DatasetError) as error:
        open_dataset("pc59_val", data_root=tmp_path)
    message = str(error.value)
    assert f"{tmp_path}/VOCdevkit/VOC2010/JPEGImages/*.jpg" in message
    assert f"{tmp_path}/VOCdevkit/VOC2010/annotations_detectron2/pc59_val/*.png" in message
    assert "--data-root" in message and DATA_ROOT_ENV in message and "\n" not in message
    assert isinstance(error.value, ScanError) and isinstance(error.value, ValueError)


def test_benchmark_with_images_but_no_labels_or_wrong_split(tmp_path):
    _fake_benchmark(tmp_path, "voc20_val", ["a"], {})
    with pytest.raises(DatasetError, match="prepare_voc_sem_seg.py"):
        open_dataset("voc20_val", data_root=tmp_path)
    (tmp_path / BENCHMARKS["voc20_val"].label_dir).mkdir(parents=True)
    with pytest.raises(DatasetError, match="no image/label pairs"):
        open_dataset("voc20_val", data_root=tmp_path)
    with pytest.raises(DatasetError, match="only the 'val' split"):
        open_dataset("voc20_val", data_root=tmp_path, split="train")


def test_unknown_name_lists_the_registered_ones(tmp_path):
    with pytest.raises(DatasetError) as error:
        open_dataset(str(tmp_path / "nope"))
    assert "ade150_val" in str(error.value) and "generic layout" in str(error.value)


def test_generic_layout_with_and_without_splits(tmp_path):
    label = np.zeros((12, 16), np.int64)
    label[3:, 5:] = 2
    label[0] = 255
    split = _generic(tmp_path / "split", {"classes": ["a", "b", "c"], "ignore_label": 255},
                     {"y": label, "x": label}, split="val")
    dataset = open_dataset(split, split="val")
    assert dataset.class_names == ["a", "b", "c"] and dataset.benchmark is None and dataset.split == "val"
    assert [image.stem for image, _ in dataset.items] == ["x", "y"]
    assert np.array_equal(dataset.read(1)[1], label)
    dataset.check_labels()
    with pytest.raises(DatasetError, match="no split 'train'.*splits found: val"):
        open_dataset(split)
    flat = _generic(tmp_path / "flat", [" a ", "b", "c"], {"x": label}, split=None)
    dataset = open_dataset(str(flat))
    assert len(dataset) == 1 and dataset.class_names == ["a", "b", "c"]


def test_generic_image_without_label_is_named(tmp_path):
    folder = _generic(tmp_path / "d", ["a", "b"], {"x": np.zeros((12, 16), np.int64), "y": None})
    with pytest.raises(DatasetError) as error:
        open_dataset(folder)
    assert str(folder / "images" / "train" / "y.png") in str(error.value)


def test_check_labels_names_the_file_and_the_value(tmp_path):
    bad = np.zeros((12, 16), np.int64)
    bad[2, 2] = 7
    folder = _generic(tmp_path / "d", ["a", "b"], {"x": np.ones((12, 16), np.int64), "y": bad})
    dataset = open_dataset(folder)
    dataset.check_labels(limit=1)  # only "x", which is fine
    with pytest.raises(DatasetError) as error:
        dataset.check_labels()
    message = str(error.value)
    assert str(folder / "annotations" / "train" / "y.png") in message and "values 7 " in message
    assert "255" in message and "2 classes" in message


def test_label_of_another_size_is_refused(tmp_path):
    folder = _generic(tmp_path / "d", ["a", "b"], {"x": np.zeros((12, 16), np.int64)})
    write_label(folder / "annotations" / "train" / "x.png", np.zeros((10, 16), np.int64), 255)
    dataset = open_dataset(folder)
    for call in (dataset.check_labels, lambda: dataset.read(0)):
        with pytest.raises(DatasetError, match="16x10.*16x12"):
            call()


@pytest.mark.parametrize("content", ["{not json", "[]", '["a", "a"]', '["a", ""]', '{"names": ["a"]}',
                                     '{"classes": ["a", "b"], "ignore_label": 1}'])
def test_malformed_classes_json_names_the_file(tmp_path, content):
    folder = _generic(tmp_path / "d", ["a", "b"], {"x": np.zeros((12, 16), np.int64)})
    (folder / "classes.json").write_text(content)
    with pytest.raises(DatasetError) as error:
        open_dataset(folder)
    assert str(folder / "classes.json") in str(error.value)


def test_label_files_8_and_16_bit(tmp_path):
    small = np.array([[0, 254], [255, 3]])
    write_label(tmp_path / "s.png", small, 255)
    with Image.open(tmp_path / "s.png") as image:
        assert image.mode == "L"
    big = np.array([[0, 300], [65535, 3]])
    write_label(tmp_path / "b.png", big, 65535)
    with Image.open(tmp_path / "b.png") as image:
        assert image.mode in ("I;16", "I")
    assert np.array_equal(read_label(tmp_path / "s.png"), small)
    assert np.array_equal(read_label(tmp_path / "b.png"), big) and read_label(tmp_path / "b.png").dtype == np.int64
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DatasetError, match="single-channel class indices"):
        read_label(tmp_path / "rgb.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="cannot read label"):
        read_label(tmp_path / "broken.png")
    with pytest.raises(DatasetError):
        write_label(tmp_path / "neg.png", np.array([[-1, 0]]), 255)


# -- synthetic data ------------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_synthetic_sample_is_deterministic_and_labelled():
    image, label = synthetic_sample(64, 80, seed=3)
    again, label_again = synthetic_sample(64, 80, seed=3)
    assert image.shape == (64, 80, 3) and image.dtype == np.uint8 and label.dtype == np.int64
    assert np.array_equal(image, again) and np.array_equal(label, label_again)
    assert not np.array_equal(image, synthetic_sample(64, 80, seed=4)[0])
    values = set(np.unique(label).tolist())
    assert 255 in values and values - {255} <= set(range(len(SYNTH_CLASSES)))
    for name in ("wall", "road", "flower"):
        assert SYNTH_CLASSES.index(name) in synthetic_sample(64, 80, seed=5, include=name)[1]


def test_synthetic_dataset_is_reproducible_and_opens(tmp_path):
    summary = write_synthetic_dataset(tmp_path / "a", images=40, size=(64, 64), seed=1)
    write_synthetic_dataset(tmp_path / "b", images=40, size=(64, 64), seed=1)
    write_synthetic_dataset(tmp_path / "c", images=40, size=(64, 64), seed=2)
    first = _files(tmp_path / "a")
    assert first == _files(tmp_path / "b")
    assert first != _files(tmp_path / "c") and first.keys() == _files(tmp_path / "c").keys()
    assert summary["images"] == {"train": 30, "val": 10} and summary["classes"] == SYNTH_CLASSES
    for split in ("train", "val"):
        assert summary["splits"][split]["missing_classes"] == []
        assert 0 < summary["splits"][split]["ignore_share"] < 0.1
        dataset = open_dataset(tmp_path / "a", split=split)
        assert len(dataset) == summary["images"][split] and dataset.class_names == SYNTH_CLASSES
        dataset.check_labels()
        assert dataset.read(0)[0].shape == (64, 64, 3)
    assert json.loads(first["classes.json"]) == {"classes": SYNTH_CLASSES, "ignore_label": 255}
    assert json.loads(first["synthetic.json"])["seed"] == 1


def test_synthetic_dataset_replaces_only_its_own_kind(tmp_path):
    write_synthetic_dataset(tmp_path / "s", images=4, size=(32, 48), seed=0)
    before = _files(tmp_path / "s")
    write_synthetic_dataset(tmp_path / "s", images=6, size=(32, 48), seed=1)
    after = _files(tmp_path / "s")
    assert after != before and len([k for k in after if k.startswith("images/")]) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary siblings left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        write_synthetic_dataset(foreign, images=4, size=(32, 32))
    assert _files(foreign) == {"notes.txt": b"keep me"}
    (tmp_path / "empty").mkdir()
    write_synthetic_dataset(tmp_path / "empty", images=2, size=(32, 32))
    assert len(open_dataset(tmp_path / "empty", split="val")) == 1


@pytest.mark.parametrize("kwargs", [{"images": 1}, {"size": (16, 64)}, {"size": 64}, {"val_fraction": 1.0},
                                    {"seed": -1}])
def test_synthetic_dataset_arguments_are_checked(tmp_path, kwargs):
    with pytest.raises(DatasetError):
        write_synthetic_dataset(tmp_path / "s", **kwargs)
    assert not (tmp_path / "s").exists()


def test_synthetic_generation_is_quick(tmp_path):
    start = time.perf_counter()
    write_synthetic_dataset(tmp_path / "s", images=16, size=(128, 128))
    assert time.perf_counter() - start < 5.0
