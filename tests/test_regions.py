"""Region preparation (scan_model/regions.py) against a per-region loop reference and the fixture.

The loop reference is the official sequence (SPEC.md §1.11 steps 3-7): boxes from ``torch.where``
per mask, then per region slice, ``crop * m + (1 - m) * fill``, normalise, ``F.interpolate``
bicubic for the crop and nearest for the mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scan_model.regions import (
    CLIP_MEAN_255,
    CLIP_STD_255,
    _cubic_taps,
    clip_pixel_stats,
    crop_regions,
    mask_boxes,
    prepare_regions,
)

from conftest import REL_TOL, rel_diff

REGION_ABS_TOL = 2e-5  # fp32 rounding of the bicubic sums (EXPORT_NOTES.md §3.6, row 6b)
MASK_THR = 0.4  # the fixture's MODEL.CLIP_ADAPTER.MASK_THR


def reference_boxes(binary: Tensor) -> tuple[Tensor, Tensor]:
    """detectron2 ``BitMasks.get_bounding_boxes`` loop; empty masks get the full image box."""
    N, H, W = binary.shape
    boxes = torch.tensor([[0, 0, W, H]] * N, dtype=torch.int64).reshape(N, 4)
    valid = torch.zeros(N, dtype=torch.bool)
    for k in range(N):
        xs = torch.where(binary[k].any(0))[0]
        ys = torch.where(binary[k].any(1))[0]
        if len(xs) > 0 and len(ys) > 0:
            boxes[k] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1])
            valid[k] = True
    return boxes, valid


def reference_crops(image, binary, boxes, mean, std, size=224, fill=None) -> tuple[Tensor, Tensor]:
    """The official per-region slicing + ``F.interpolate`` sequence."""
    fill = mean if fill is None else fill
    regions, masks = [], []
    for k in range(binary.shape[0]):
        x0, y0, x1, y1 = boxes[k].tolist()
        m = binary[k, y0:y1, x0:x1].float()
        crop = image[:, y0:y1, x0:x1] * m + (1 - m) * fill[:, None, None]
        crop = (crop - mean[:, None, None]) / std[:, None, None]
        regions.append(F.interpolate(crop[None], (size, size), mode="bicubic", align_corners=False))
        masks.append(F.interpolate(m[None, None], (size, size), mode="nearest"))
    return torch.cat(regions), torch.cat(masks)


def clip_stats() -> tuple[Tensor, Tensor]:
    return torch.tensor(CLIP_MEAN_255), torch.tensor(CLIP_STD_255)


def edge_case_masks(H: int, W: int, generator: torch.Generator) -> Tensor:
    """Empty, single pixels, full, edge-touching, lines, small and large random blobs."""
    masks = torch.zeros(14, H, W, dtype=torch.bool)
    masks[1, H // 2, W // 3] = True  # single pixel
    masks[2] = True  # full
    masks[3, 0, 0] = masks[3, H - 1, W - 1] = True  # opposite corners
    masks[4, H // 3, :] = True  # 1 x W row
    masks[5, :, W - 1] = True  # H x 1 column at the right edge
    masks[6, 2 : 2 + min(10, H - 2), 3 : 3 + min(37, W - 3)] = True  # upscaled box
    masks[7] = torch.rand(H, W, generator=generator) > 0.995  # sparse noise
    masks[8, H - 1, W // 2] = True  # bottom edge pixel
    masks[9, : H // 2, : W // 2] = torch.rand(H // 2, W // 2, generator=generator) > 0.5
    masks[10, H // 4 :, W // 5 :] = torch.rand(H - H // 4, W - W // 5, generator=generator) > 0.3
    masks[11, 1:-1, 1:-1] = True  # all but a 1-pixel border
    masks[12, :, 0] = True  # left edge column
    masks[13, 0, W // 2 :] = True  # top edge half row
    return masks


@pytest.mark.parametrize("H,W", [(37, 53), (64, 16), (1, 9)])
def test_mask_boxes_match_where_loop(H, W):
    g = torch.Generator().manual_seed(H * 1000 + W)
    masks = torch.cat([edge_case_masks(H, W, g), torch.rand(20, H, W, generator=g) > 0.97])
    boxes, valid = mask_boxes(masks)
    ref_boxes, ref_valid = reference_boxes(masks)
    assert boxes.dtype == torch.int64 and boxes.shape == (masks.shape[0], 4)
    assert torch.equal(valid, ref_valid)
    assert torch.equal(boxes, ref_boxes)
    assert not valid[0] and valid[1:6].all()


def test_cubic_taps_are_pytorchs_weights():
    """Extract F.interpolate's 1-D weights with one-hot rows; ours agree bit for bit (AVX2 build)."""
    for n in (1, 2, 3, 4, 8, 37, 223, 224, 225, 500, 641):
        eye = torch.eye(n)[:, None, None, :]  # basis along x
        theirs = F.interpolate(eye, (1, 224), mode="bicubic", align_corners=False)[:, 0, 0, :]
        index, weight = _cubic_taps(torch.tensor([0]), torch.tensor([n]), 224)
        ours = torch.zeros(n, 224)
        for tap in range(4):  # clamped taps that hit the same pixel add up, in tap order
            ours[index[0, :, tap], torch.arange(224)] += weight[0, :, tap]
        if torch.backends.cpu.get_cpu_capability() == "AVX2":
            assert torch.equal(ours, theirs), n
        else:  # other kernels may contract differently; the weights stay within rounding
            torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "H,W,official_fill",
    [(300, 500, False), (41, 29, True), (1, 9, False)],
)
def test_crop_regions_match_loop_reference(H, W, official_fill):
    g = torch.Generator().manual_seed(7 * H + W)
    image = torch.rand(3, H, W, generator=g) * 255
    masks = edge_case_masks(H, W, g)
    if official_fill:  # the official constants: fill 255*mean in float64, buffers in float32
        mean, std = clip_pixel_stats()
        fill = torch.tensor(CLIP_MEAN_255)
    else:
        (mean, std), fill = clip_stats(), None
    boxes, valid = mask_boxes(masks)
    regions, region_masks = crop_regions(image, masks, boxes, mean, std, fill=fill)
    assert regions.shape == (14, 3, 224, 224) and region_masks.shape == (14, 1, 224, 224)

    ref_regions, ref_masks = reference_crops(image, masks[valid], boxes[valid], mean, std, fill=fill)
    err = (regions[valid] - ref_regions).abs().max().item()
    assert err <= REGION_ABS_TOL, err
    assert torch.equal(region_masks[valid], ref_masks)
    # An empty mask (full-image box) is pure background: 0 with the default fill.
    assert torch.equal(region_masks[0], torch.zeros(1, 224, 224))
    if fill is None:
        assert torch.equal(regions[0], torch.zeros(3, 224, 224))


def test_crop_regions_other_output_size():
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 50, 70, generator=g) * 255
    masks = edge_case_masks(50, 70, g)[1:]
    boxes, _ = mask_boxes(masks)
    mean, std = clip_stats()
    for size in (16, 97):
        regions, region_masks = crop_regions(image, masks, boxes, mean, std, size=size)
        ref_regions, ref_masks = reference_crops(image, masks, boxes, mean, std, size=size)
        assert (regions - ref_regions).abs().max().item() <= REGION_ABS_TOL
        assert torch.equal(region_masks, ref_masks)


def test_prepare_regions_chunking_and_empty():
    g = torch.Generator().manual_seed(11)
    image = torch.rand(3, 60, 90, generator=g) * 255
    probs = torch.rand(10, 60, 90, generator=g) ** 8  # sparse foreground above 0.4
    probs[[2, 5]] = 0.4  # exactly at the threshold: not foreground (strict >)
    mean, std = clip_stats()
    small = prepare_regions(image, probs, MASK_THR, mean, std, chunk_size=3)
    large = prepare_regions(image, probs, MASK_THR, mean, std, chunk_size=100)
    assert small.valid.sum() == 8 and not small.valid[[2, 5]].any()
    for name in ("valid", "boxes", "regions", "region_masks", "areas"):
        assert torch.equal(getattr(small, name), getattr(large, name)), name
    assert torch.equal(small.areas, (probs > MASK_THR).sum((1, 2)))
    assert small.regions.shape == (8, 3, 224, 224) and small.boxes.shape == (8, 4)

    empty = prepare_regions(image, torch.full((5, 60, 90), 0.1), MASK_THR, mean, std)
    assert empty.valid.shape == (5,) and not empty.valid.any()
    assert empty.boxes.shape == (0, 4) and empty.boxes.dtype == torch.int64
    assert empty.regions.shape == (0, 3, 224, 224) and empty.region_masks.shape == (0, 1, 224, 224)
    assert torch.equal(empty.areas, torch.zeros(5, dtype=torch.int64))


def test_against_official_fixture(official_dev):
    from PIL import Image

    exp = official_dev.expected
    image = np.array(Image.open(official_dev.root / "image.png").convert("RGB"))
    image = torch.from_numpy(image).permute(2, 0, 1).float()
    H, W = image.shape[-2:]
    assert (H, W) == (320, 480)

    # The official constants: the state dict's buffers are float32(mean) * 255 ...
    mean, std = clip_pixel_stats()
    assert torch.equal(official_dev.state_dict["clip_adapter.pixel_mean"].flatten(), mean)
    assert torch.equal(official_dev.state_dict["clip_adapter.pixel_std"].flatten(), std)
    fill = torch.tensor(CLIP_MEAN_255)  # ... and the fill is 255 * mean in float64 (SPEC.md §1.11)

    logits = F.interpolate(exp["decoder.pred_masks"], (H, W), mode="bilinear", align_corners=False)[0]
    assert rel_diff(logits[:3], exp["semantic_inference.mask_pred_logits.first3"]) <= REL_TOL
    probs = logits.sigmoid()
    assert rel_diff(probs.sum((1, 2)), exp["clip_adapter.mask_prob.sum"]) <= REL_TOL

    batch = prepare_regions(image, probs, MASK_THR, mean, std, fill=fill)
    # Threshold flips: only pixels within ~1e-6 of MASK_THR may land on the other side.
    near = ((probs - MASK_THR).abs() < 1e-6).sum((1, 2))
    area_diff = (batch.areas - exp["clip_adapter.mask_bin.area"]).abs()
    print(f"pixels within 1e-6 of the threshold: {int(near.sum())}, area flips: {int(area_diff.sum())}")
    assert (area_diff <= near).all()
    assert torch.equal(batch.valid, exp["clip_adapter.valid_flag"])

    same = (area_diff == 0)[batch.valid]
    assert torch.equal(batch.boxes[same].float(), exp["clip_adapter.bboxes"][same])
    assert same[:4].all(), "a threshold flip in the first 4 regions; compare them by hand"
    ref_regions = exp["clip_adapter.regions.firstN"]
    assert rel_diff(batch.regions[:4], ref_regions) <= REL_TOL
    assert (batch.regions[:4] - ref_regions).abs().max().item() <= REGION_ABS_TOL
    assert torch.equal(batch.region_masks[:4], exp["clip_adapter.region_masks.firstN"])


class _RegionGraph(nn.Module):
    """mask_boxes + crop_regions as one export graph (the region-classifier input stage)."""

    def __init__(self, size: int = 224):
        super().__init__()
        self.size = size
        mean, std = clip_pixel_stats()
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.register_buffer("fill", torch.tensor(CLIP_MEAN_255), persistent=False)

    def forward(self, image: Tensor, binary: Tensor):
        boxes, valid = mask_boxes(binary)
        regions, region_masks = crop_regions(image, binary, boxes, self.mean, self.std, self.size, self.fill)
        return boxes, valid, regions, region_masks


def test_torch_export_dynamic_shapes():
    g = torch.Generator().manual_seed(5)
    model = _RegionGraph()
    image = torch.rand(3, 40, 50, generator=g) * 255
    binary = torch.rand(3, 40, 50, generator=g) > 0.97
    n, h, w = (torch.export.Dim(name, min=2) for name in ("N", "H", "W"))
    program = torch.export.export(
        model,
        (image, binary),
        dynamic_shapes={"image": {1: h, 2: w}, "binary": {0: n, 1: h, 2: w}},
        strict=False,
    )
    image2 = torch.rand(3, 33, 61, generator=g) * 255
    binary2 = edge_case_masks(33, 61, g)
    for ours, eager in zip(program.module()(image2, binary2), model(image2, binary2)):
        assert ours.shape == eager.shape
        assert torch.equal(ours, eager)
