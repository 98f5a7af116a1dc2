"""Finetuning data (SPEC §4.1): dataset regions and their cache, ov-seg's CSV, masked crops and samples."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from runtime.datasets import open_dataset, read_label
from runtime.errors import ScanError
from runtime.images import load_image
from runtime.synthetic_data import write_synthetic_dataset
from scan_model.finetune.region_data import (
    CLIP_INPUT,
    FILL,
    OPENAI_MEAN,
    OPENAI_STD,
    RegionDataError,
    RegionRecord,
    dataset_regions,
    read_ovseg_csv,
    region_crop,
    region_sample,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    write_synthetic_dataset(root, images=8, size=(96, 128), seed=3)
    return open_dataset(root, split="train")


def test_region_constants_match_the_model():
    from scan_model import regions

    assert OPENAI_MEAN == regions.OPENAI_MEAN and OPENAI_STD == regions.OPENAI_STD


def test_dataset_regions_are_the_classes_of_each_label(synthetic):
    records = dataset_regions(synthetic, min_pixels=200)
    labels = {str(label): read_label(label) for _, label in synthetic.items}
    expected = []
    for image, label in synthetic.items:
        values, counts = np.unique(labels[str(label)], return_counts=True)
        expected += [(str(image), int(v)) for v, n in zip(values, counts) if v != 255 and n >= 200]
    assert [(r.image, r.class_id) for r in records] == expected  # item order, then ascending class id
    assert len({r.image for r in records}) == len(synthetic.items)
    for record in records:
        mask = labels[record.label] == record.class_id
        ys, xs = np.nonzero(mask)
        assert record.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert record.text == synthetic.class_names[record.class_id] and record.region is None
    assert len(dataset_regions(synthetic, min_pixels=3000)) < len(records)
    with pytest.raises(RegionDataError, match="no region of at least 1000000 pixels"):
        dataset_regions(synthetic, min_pixels=1_000_000)


def test_dataset_regions_cache_is_read_and_keyed(synthetic, tmp_path):
    cache = tmp_path / "cache"
    fresh = dataset_regions(synthetic, min_pixels=200)
    assert dataset_regions(synthetic, min_pixels=200, cache_dir=cache) == fresh
    (path,) = cache.glob("*.json")
    # The cache is what a second call returns: an edit of its records shows up.
    data = json.loads(path.read_text())
    data["records"][0]["text"] = "edited"
    path.write_text(json.dumps(data))
    assert dataset_regions(synthetic, min_pixels=200, cache_dir=cache)[0].text == "edited"
    # Another key inside, or a file that does not parse: rebuilt silently.
    path.write_text(json.dumps({**data, "key": "0" * 64}))
    assert dataset_regions(synthetic, min_pixels=200, cache_dir=cache) == fresh
    path.write_text("{not json")
    assert dataset_regions(synthetic, min_pixels=200, cache_dir=cache) == fresh
    assert json.loads(path.read_text())["records"][0]["text"] == fresh[0].text
    # Other inputs, other key: min_pixels and a touched label each make a new file.
    dataset_regions(synthetic, min_pixels=300, cache_dir=cache)
    assert len(list(cache.glob("*.json"))) == 2
    label = synthetic.items[0][1]
    stat = os.stat(label)
    os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        assert dataset_regions(synthetic, min_pixels=200, cache_dir=cache) == fresh
        assert len(list(cache.glob("*.json"))) == 3
    finally:
        os.utime(label, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_region_crop_of_a_dataset_record_masks_with_the_fill(synthetic):
    records = dataset_regions(synthetic, min_pixels=200)
    for record in records[:6]:
        crop = region_crop(record)
        x0, y0, x1, y1 = record.box
        image = load_image(record.image)[y0:y1, x0:x1]
        inside = read_label(Path(record.label))[y0:y1, x0:x1] == record.class_id
        assert crop.shape == image.shape and crop.dtype == np.uint8
        assert (crop[~inside] == FILL).all()
        assert np.array_equal(crop[inside], image[inside])


def _ovseg_folder(tmp_path: Path):
    """Two COCO-named full images, three FILL-background crops with drawn shapes, their shapes' masks."""
    images = tmp_path / "train2017"
    images.mkdir()
    rng = np.random.default_rng(0)
    for stem in ("000000000139", "000000000285"):
        Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(images / f"{stem}.jpg")
    crops = tmp_path / "crops"
    crops.mkdir()
    shapes = {}
    for name, (w, h), box in (("000000000139_3.png", (64, 48), (8, 6, 56, 42)),
                              ("000000000139_7.png", (40, 70), (10, 10, 30, 60)),
                              ("000000000285_1.png", (90, 90), (20, 20, 70, 70))):
        picture = Image.new("RGB", (w, h), FILL)
        ImageDraw.Draw(picture).ellipse(box, fill=(230, 40, 20))
        picture.save(crops / name)
        shapes[name] = np.any(np.asarray(picture) != FILL, axis=-1)
    rows = ["filepath\ttitle", "crops/000000000139_3.png\ta red ball",
            f"{crops / '000000000139_7.png'}\tkite", "crops/000000000285_1.png\tbear"]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path, images, shapes


def _scaled(mask: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(mask).resize((CLIP_INPUT, CLIP_INPUT), Image.NEAREST))


def _dilated(mask: np.ndarray, steps: int) -> np.ndarray:
    padded = np.pad(mask, steps)
    out = np.zeros_like(mask)
    for dy in range(2 * steps + 1):
        for dx in range(2 * steps + 1):
            out |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


def test_ovseg_csv_records_and_samples(tmp_path):
    csv_path, images, shapes = _ovseg_folder(tmp_path)
    records = read_ovseg_csv(csv_path, images)
    assert [r.text for r in records] == ["a red ball", "kite", "bear"]
    assert [Path(r.image).name for r in records] == ["000000000139.jpg"] * 2 + ["000000000285.jpg"]
    assert [Path(r.region).name for r in records] == list(shapes)
    assert all(Path(r.region).is_file() and r.class_id == -1 for r in records)
    assert "line 3" in records[1].source
    for record in records:
        crop = region_crop(record)
        sample = region_sample(record, None)
        resized = np.asarray(Image.fromarray(crop).resize((CLIP_INPUT, CLIP_INPUT), Image.BICUBIC))
        assert np.array_equal(sample["mask"], np.any(resized != FILL, axis=-1).astype(np.float32))
        # The drawn shape scaled to 224 lies inside the mask, which adds only the bicubic rim: the
        # pixels within the 2-source-pixel support of the shape.
        drawn = shapes[Path(record.region).name]
        mask = sample["mask"].astype(bool)
        assert mask[_scaled(drawn)].all() and not mask[~_scaled(_dilated(drawn, 2))].any()
        assert mask.sum() > 1.02 * _scaled(drawn).sum()
        # Inside the shape the region holds the normalised red; far outside the normalised fill.
        assert sample["region"][:, 112, 112] == pytest.approx(
            [(230 / 255 - OPENAI_MEAN[0]) / OPENAI_STD[0], (40 / 255 - OPENAI_MEAN[1]) / OPENAI_STD[1],
             (20 / 255 - OPENAI_MEAN[2]) / OPENAI_STD[2]], abs=1e-5)
        assert sample["region"][:, 0, 0] == pytest.approx(
            [(f / 255 - m) / s for f, m, s in zip(FILL, OPENAI_MEAN, OPENAI_STD)], abs=1e-5)
        assert sample["text"] == record.text


def test_region_sample_is_seeded_and_normalised(tmp_path):
    csv_path, images, _ = _ovseg_folder(tmp_path)
    record = read_ovseg_csv(csv_path, images)[0]
    first = region_sample(record, np.random.default_rng(7))
    again = region_sample(record, np.random.default_rng(7))
    for key in ("region", "mask", "image"):
        assert np.array_equal(first[key], again[key])
    others = [region_sample(record, np.random.default_rng(seed))["region"] for seed in range(1, 6)]
    assert any(not np.array_equal(first["region"], other) for other in others)
    assert first["region"].shape == first["image"].shape == (3, CLIP_INPUT, CLIP_INPUT)
    assert first["mask"].shape == (CLIP_INPUT, CLIP_INPUT)
    assert {first[k].dtype for k in ("region", "mask", "image")} == {np.dtype(np.float32)}
    assert set(np.unique(first["mask"])) == {0.0, 1.0}
    small = region_sample(record, None, size=32)
    assert small["region"].shape == (3, 32, 32) and small["mask"].shape == (32, 32)
    # A uniform full image of the CLIP mean maps to ~0 (only the 8-bit rounding of the mean is left).
    mean_colour = np.round(255 * np.asarray(OPENAI_MEAN)).astype(np.uint8)
    Image.fromarray(np.broadcast_to(mean_colour, (50, 70, 3)).copy()).save(images / "000000000139.png")
    (images / "000000000139.jpg").unlink()  # .jpg is looked for first; without it the .png is found
    uniform = read_ovseg_csv(csv_path, images)[0]
    assert uniform.image.endswith(".png")
    assert np.abs(region_sample(uniform, None)["image"]).max() < 0.01


def _csv_error(tmp_path, text: str, images: Path) -> str:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(RegionDataError) as caught:
        read_ovseg_csv(path, images)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and isinstance(caught.value, ScanError)
    return message


def test_csv_errors_name_the_row_and_the_fix(tmp_path):
    _, images, _ = _ovseg_folder(tmp_path)
    good = "crops/000000000139_3.png\tball\n"
    assert "lacks the column(s) filepath, title" in _csv_error(tmp_path, "path\tcaption\n" + good, images)
    assert "line 3" in _csv_error(tmp_path, "filepath\ttitle\n" + good + "crops/000000000139_3.png\n", images)
    assert "line 2: empty title" in _csv_error(tmp_path, "filepath\ttitle\ncrops/000000000139_3.png\t \n", images)
    message = _csv_error(tmp_path, "filepath\ttitle\n" + good + "crops/000000000139_9.png\tcat\n", images)
    assert "line 3" in message and "000000000139_9.png not found" in message
    (tmp_path / "crops" / "000000000999_1.png").write_bytes((tmp_path / "crops" / "000000000139_3.png").read_bytes())
    message = _csv_error(tmp_path, "filepath\ttitle\ncrops/000000000999_1.png\tdog\n", images)
    assert "line 2" in message and str(images / "000000000999.jpg") in message
    (tmp_path / "crops" / "nostem.png").write_bytes(b"x")
    assert "line 2" in _csv_error(tmp_path, "filepath\ttitle\ncrops/nostem.png\tdog\n", images)
    assert "has no rows" in _csv_error(tmp_path, "title\tfilepath\n", images)  # any column order
    with pytest.raises(RegionDataError, match="full-image folder not found"):
        read_ovseg_csv(tmp_path / "bad.csv", tmp_path / "missing")
    with pytest.raises(RegionDataError, match="region CSV not found"):
        read_ovseg_csv(tmp_path / "missing.csv", images)


def test_an_all_fill_crop_is_an_empty_mask(tmp_path):
    _, images, _ = _ovseg_folder(tmp_path)
    blank = tmp_path / "crops" / "000000000285_4.png"
    Image.new("RGB", (30, 20), FILL).save(blank)
    record = RegionRecord(image=str(images / "000000000285.jpg"), text="void", region=str(blank),
                          source="pairs.csv line 9")
    for call in (lambda: region_crop(record), lambda: region_sample(record, np.random.default_rng(0))):
        with pytest.raises(RegionDataError, match=r"empty mask in pairs.csv line 9 .*\(124,116,103\)"):
            call()


def test_a_random_crop_that_loses_the_region_falls_back_to_the_whole_crop(tmp_path):
    from scan_model.finetune.region_data import _random_resized_box

    _, images, _ = _ovseg_folder(tmp_path)
    corner = np.zeros((100, 100, 3), np.uint8) + np.asarray(FILL, np.uint8)
    corner[0, 0] = (255, 255, 255)  # one foreground pixel, which most random crops cut away
    path = tmp_path / "crops" / "000000000285_5.png"
    Image.fromarray(corner).save(path)
    record = RegionRecord(image=str(images / "000000000285.jpg"), text="speck", region=str(path), source="corner")
    seed = next(s for s in range(50) if max(_random_resized_box(100, 100, np.random.default_rng(s))[:2]) > 0)
    whole = region_sample(record, None)
    assert whole["mask"].any()
    fallback = region_sample(record, np.random.default_rng(seed))
    assert np.array_equal(fallback["mask"], whole["mask"]) and np.array_equal(fallback["region"], whole["region"])


def test_transforms_equal_torchvision(tmp_path):
    """The numpy transforms against torchvision's (SPEC §4.1): same crop box, same pixels, same float32."""
    import torch
    from torchvision.transforms import InterpolationMode, Normalize, Resize, ToTensor
    from torchvision.transforms import functional as TF

    from scan_model.finetune.region_data import _random_resized_box

    csv_path, images, _ = _ovseg_folder(tmp_path)
    record = read_ovseg_csv(csv_path, images)[1]
    normalise = Normalize(OPENAI_MEAN, OPENAI_STD)
    crop = Image.fromarray(region_crop(record))
    full = Image.open(record.image).convert("RGB")

    sample = region_sample(record, None)
    expected_image = normalise(ToTensor()(Resize((CLIP_INPUT, CLIP_INPUT))(full)))
    expected_region = normalise(ToTensor()(Resize((CLIP_INPUT, CLIP_INPUT), InterpolationMode.BICUBIC)(crop)))
    assert torch.equal(torch.from_numpy(sample["image"]), expected_image)
    assert torch.equal(torch.from_numpy(sample["region"]), expected_region)

    record = read_ovseg_csv(csv_path, images)[2]  # 90x90: the random path (40x70 would take the fallback)
    crop = Image.fromarray(region_crop(record))
    top, left, h, w = _random_resized_box(crop.height, crop.width, np.random.default_rng(11))
    trained = region_sample(record, np.random.default_rng(11))
    expected = TF.resized_crop(crop, top, left, h, w, [CLIP_INPUT, CLIP_INPUT], InterpolationMode.BICUBIC)
    assert torch.equal(torch.from_numpy(trained["region"]), normalise(ToTensor()(expected)))
    assert (h, w) != (crop.height, crop.width)


def test_random_resized_box_follows_scale_ratio_and_fallback():
    from scan_model.finetune.region_data import _random_resized_box

    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = _random_resized_box(90, 120, rng)
        assert 0 <= top <= 90 - h and 0 <= left <= 120 - w
        assert 0.85 <= h * w / (90 * 120) <= 1.0 and 0.7 <= w / h <= 1.4
    # No box of >= 90% area fits a 10x200 strip: torchvision's central crop at the widest ratio.
    assert _random_resized_box(10, 200, np.random.default_rng(0)) == (0, (200 - 13) // 2, 10, 13)
    assert _random_resized_box(200, 10, np.random.default_rng(0)) == ((200 - 13) // 2, 0, 13, 10)
