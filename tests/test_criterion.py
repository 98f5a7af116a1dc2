"""Training losses (scan_model/training/: points, matcher, criterion) against hand and brute-force references.

SPEC.md §3.3: Hungarian matching on point-sampled masks, weighted cross-entropy with a 0.1
no-object weight, PointRend-sampled BCE and dice on matched pairs, deep supervision.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from scan_model.training.criterion import CriterionConfig, SetCriterion, dice_loss
from scan_model.training.matcher import MatcherConfig, hungarian_match, match_costs
from scan_model.training.points import point_sample, random_points, uncertainty_points


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_batch(seed: int, batch: int = 2, queries: int = 5, classes: int = 4, counts=(3, 2), low=8, high=16):
    """Random logits (B, Q, K+1) / (B, Q, low, low) and targets at the higher crop resolution."""
    g = _gen(seed)
    class_logits = torch.randn(batch, queries, classes + 1, generator=g)
    mask_logits = 3 * torch.randn(batch, queries, low, low, generator=g)
    targets = [
        {
            "labels": torch.randint(0, classes, (t,), generator=g),
            "masks": torch.rand(t, high, high, generator=g) > 0.5,
        }
        for t in counts
    ]
    return class_logits, mask_logits, targets


# --- points -------------------------------------------------------------------------------


def test_point_sample_at_pixel_centres_returns_the_pixels():
    inputs = torch.randn(2, 3, 5, 7)
    ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    coords = torch.stack([(xs + 0.5) / 7, (ys + 0.5) / 5], dim=-1).reshape(1, -1, 2).expand(2, -1, -1)
    torch.testing.assert_close(point_sample(inputs, coords), inputs.flatten(2), rtol=0, atol=1e-6)
    # (N, H, W) input -> (N, P)
    torch.testing.assert_close(point_sample(inputs[:, 0], coords), inputs[:, 0].flatten(1), rtol=0, atol=1e-6)


def test_point_sample_between_centres_is_bilinear():
    inputs = torch.randn(1, 1, 4, 6)
    # halfway between the centres of (y=1, x=2) and (y=1, x=3), and the middle of the 2x2 block at (1..2, 2..3)
    coords = torch.tensor([[[3.0 / 6, 1.5 / 4], [3.0 / 6, 2.0 / 4]]])
    out = point_sample(inputs, coords)[0, 0]
    img = inputs[0, 0]
    assert out[0] == pytest.approx(float(img[1, 2] + img[1, 3]) / 2, abs=1e-6)
    assert out[1] == pytest.approx(float(img[1:3, 2:4].mean()), abs=1e-6)


def test_point_sample_pads_with_zeros_outside():
    inputs = torch.ones(1, 1, 4, 4)
    # on the left border, half a pixel from the first centre: half image, half zero padding
    out = point_sample(inputs, torch.tensor([[[0.0, 0.5]]]))
    assert float(out) == pytest.approx(0.5, abs=1e-6)


def test_uncertainty_points_keeps_the_most_uncertain_candidates():
    # logit 10 * (x - 0.5): zero crossing at the vertical middle line
    xs = (torch.arange(16.0) + 0.5) / 16
    logits = (10 * (xs - 0.5)).expand(16, 16).reshape(1, 1, 16, 16).repeat(2, 1, 1, 1)
    num_points, oversample, importance = 16, 3.0, 0.75
    coords = uncertainty_points(logits, num_points, oversample, importance, generator=_gen(7))
    assert coords.shape == (2, num_points, 2)
    assert coords.min() >= 0 and coords.max() <= 1

    # The same generator draws the candidates first: rebuild them and rank by |logit|.
    candidates = random_points(2, int(num_points * oversample), "cpu", _gen(7))
    certainty = point_sample(logits, candidates)[:, 0].abs()
    kept = int(importance * num_points)
    for n in range(2):
        order = certainty[n].argsort()
        expected = {tuple(p) for p in candidates[n, order[:kept]].tolist()}
        assert {tuple(p) for p in coords[n, :kept].tolist()} == expected
        # and they lie near the zero crossing, unlike the uniform candidates
        assert (coords[n, :kept, 0] - 0.5).abs().max() < 0.3
        assert certainty[n, order[:kept]].max() <= certainty[n, order[kept:]].min()


# --- matcher ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_hungarian_match_equals_brute_force(seed):
    class_logits, mask_logits, targets = _random_batch(seed)
    cfg = MatcherConfig(num_points=64)
    indices = hungarian_match(class_logits, mask_logits, targets, cfg, generator=_gen(100 + seed))
    # match_costs in the same image order with the same seed draws the same points
    g = _gen(100 + seed)
    for b, (rows, cols) in enumerate(indices):
        cost = match_costs(class_logits[b], mask_logits[b], targets[b]["labels"], targets[b]["masks"], cfg, g)
        q, t = cost.shape
        assert rows.dtype == cols.dtype == torch.int64 and len(rows) == len(cols) == t
        best = min(itertools.permutations(range(q), t), key=lambda p: sum(float(cost[p[j], j]) for j in range(t)))
        ours = dict(zip(cols.tolist(), rows.tolist()))
        assert [ours[j] for j in range(t)] == list(best)


def test_hungarian_match_rejects_masks_that_do_not_fit_the_labels():
    class_logits, mask_logits, targets = _random_batch(0, batch=1, counts=(2,))
    targets[0]["masks"] = targets[0]["masks"][0]  # (Ht, Wt) instead of (T, Ht, Wt)
    with pytest.raises(ValueError, match="masks"):
        hungarian_match(class_logits, mask_logits, targets, MatcherConfig(num_points=8))


def test_hungarian_match_empty_image():
    class_logits, mask_logits, targets = _random_batch(0, batch=3, counts=(2, 0, 3))
    indices = hungarian_match(class_logits, mask_logits, targets, MatcherConfig(num_points=32), generator=_gen(1))
    assert [len(r) for r, _ in indices] == [2, 0, 3]
    assert indices[1][0].dtype == torch.int64 and indices[1][1].numel() == 0


def test_match_cost_terms_equal_a_per_pair_loop():
    class_logits, mask_logits, targets = _random_batch(3, batch=1, counts=(3,))
    logits, masks, labels = mask_logits[0], targets[0]["masks"], targets[0]["labels"]
    num_points = 50
    coords = random_points(1, num_points, "cpu", _gen(5))
    pred = point_sample(logits[:, None], coords.expand(5, -1, -1))[:, 0]  # (Q, P)
    tgt = point_sample(masks[:, None].float(), coords.expand(3, -1, -1))[:, 0]  # (T, P)

    bce = torch.empty(5, 3)
    dice = torch.empty(5, 3)
    for q in range(5):
        for t in range(3):
            bce[q, t] = F.binary_cross_entropy_with_logits(pred[q], tgt[t])
            p = pred[q].sigmoid()
            dice[q, t] = 1 - (2 * (p * tgt[t]).sum() + 1) / (p.sum() + tgt[t].sum() + 1)
    probs = class_logits[0].softmax(-1)
    cls = torch.stack([-probs[:, c] for c in labels.tolist()], dim=1)

    def costs(**weights):
        cfg = MatcherConfig(**{"cost_class": 0.0, "cost_mask": 0.0, "cost_dice": 0.0, **weights}, num_points=num_points)
        return match_costs(class_logits[0], logits, labels, masks, cfg, generator=_gen(5))

    torch.testing.assert_close(costs(cost_mask=1.0), bce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(costs(cost_dice=1.0), dice, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(costs(cost_class=1.0), cls, rtol=1e-5, atol=1e-6)
    full = MatcherConfig(num_points=num_points)  # 2 / 5 / 5
    total = match_costs(class_logits[0], logits, labels, masks, full, generator=_gen(5))
    torch.testing.assert_close(total, 2 * cls + 5 * bce + 5 * dice, rtol=1e-5, atol=1e-5)


# --- criterion ----------------------------------------------------------------------------


def _criterion(**kw) -> SetCriterion:
    kw = {"num_classes": 4, "num_points": 32, **kw}
    return SetCriterion(CriterionConfig(**kw))


def test_class_loss_by_hand():
    # 2 queries, classes {0, 1} + no-object (index 2), one target of class 1.
    class_logits = torch.tensor([[[2.0, 0.5, -1.0], [0.1, 0.3, 1.5]]])
    half = torch.zeros(8, 8)
    half[:, :4] = 1
    # query 0 predicts the target mask, query 1 its inverse: the masks decide the match
    mask_logits = torch.stack([20 * (2 * half - 1), -20 * (2 * half - 1)])[None]
    mask_logits = F.avg_pool2d(mask_logits, 2)  # 1/2 resolution, as the model's 1/4 masks
    targets = [{"labels": torch.tensor([1]), "masks": half[None].bool()}]
    criterion = _criterion(num_classes=2)
    losses = criterion([{"class_logits": class_logits, "mask_logits": mask_logits}], targets, generator=_gen(0))

    def nll(row, c):
        return -math.log(math.exp(row[c]) / sum(math.exp(v) for v in row))

    rows = class_logits[0].tolist()
    expected = (1.0 * nll(rows[0], 1) + 0.1 * nll(rows[1], 2)) / (1.0 + 0.1)
    assert float(losses["loss_ce"]) == pytest.approx(expected, rel=1e-6)
    # an unweighted no-object class would give a different value
    plain = (nll(rows[0], 1) + nll(rows[1], 2)) / 2
    assert abs(expected - plain) > 1e-3


def test_dice_loss_perfect_and_inverted():
    g = _gen(2)
    targets = (torch.rand(3, 200, generator=g) > 0.5).float()
    perfect = 50 * (2 * targets - 1)
    assert float(dice_loss(perfect, targets, 3)) == pytest.approx(0.0, abs=1e-6)
    inverted = -perfect
    # only the +1 smoothing is left: 1 - 1 / (P + 1) per mask
    assert float(dice_loss(inverted, targets, 3)) == pytest.approx(1 - 1 / 201, abs=1e-5)


def test_criterion_dice_on_masks_perfect_and_inverted():
    """End to end: 16x16 logits against a 64x64 target (different resolutions, no resize)."""
    target = torch.zeros(64, 64, dtype=torch.bool)
    target[:, :32] = True
    low = torch.full((16, 16), -50.0)
    low[:, :8] = 50.0
    criterion = _criterion(num_classes=1, num_points=400, importance_sample_ratio=0.0)
    targets = [{"labels": torch.tensor([0]), "masks": target[None]}]

    def dice_of(logit_map):
        pred = {"class_logits": torch.zeros(1, 1, 2), "mask_logits": logit_map[None, None]}
        return float(criterion([pred], targets, generator=_gen(4))["loss_dice"])

    # only points in the thin fractional band at the mask edges (bilinear targets) differ
    assert dice_of(low) < 0.03
    assert dice_of(-low) > 0.97


def test_deep_supervision_keys_total_and_gradients():
    criterion = _criterion()
    sets = []
    for s in range(3):
        class_logits, mask_logits, _ = _random_batch(10 + s, queries=4)
        sets.append({"class_logits": class_logits.requires_grad_(), "mask_logits": mask_logits.requires_grad_()})
    _, _, targets = _random_batch(20, queries=4)
    losses = criterion(sets, targets, generator=_gen(0))

    names = ("loss_ce", "loss_mask", "loss_dice")
    assert set(losses) == {n + s for n in names for s in ("", "_0", "_1")}
    weights = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    manual = sum(weights[n] * losses[n + s] for n in names for s in ("", "_0", "_1"))
    total = criterion.weighted_total(losses)
    assert total.item() == pytest.approx(manual.item(), rel=1e-6)

    total.backward()
    for pred in sets:
        for key in ("class_logits", "mask_logits"):
            assert pred[key].grad is not None and pred[key].grad.abs().sum() > 0

    # without deep supervision the aux sets are ignored
    plain = _criterion(deep_supervision=False)(sets, targets, generator=_gen(0))
    assert set(plain) == set(names)


def test_num_masks_divides_the_mask_losses():
    class_logits, mask_logits, targets = _random_batch(6)
    pred = [{"class_logits": class_logits, "mask_logits": mask_logits}]
    criterion = _criterion()
    two = criterion(pred, targets, num_masks=2.0, generator=_gen(9))
    four = criterion(pred, targets, num_masks=4.0, generator=_gen(9))
    for key in ("loss_mask", "loss_dice"):
        assert float(four[key]) == pytest.approx(float(two[key]) / 2, rel=1e-6)
        assert float(two[key]) > 0
    assert float(four["loss_ce"]) == pytest.approx(float(two["loss_ce"]), rel=1e-6)
    # default: the batch's mask count (3 + 2 = 5)
    default = criterion(pred, targets, generator=_gen(9))
    five = criterion(pred, targets, num_masks=5.0, generator=_gen(9))
    assert float(default["loss_mask"]) == pytest.approx(float(five["loss_mask"]), rel=1e-6)


def test_no_targets_gives_zero_mask_losses_with_a_graph():
    class_logits, mask_logits, targets = _random_batch(7, counts=(0, 0))
    mask_logits.requires_grad_()
    losses = _criterion()([{"class_logits": class_logits, "mask_logits": mask_logits}], targets, generator=_gen(0))
    assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    assert losses["loss_mask"].requires_grad
    # every query targets no-object: plain mean cross-entropy towards index K
    expected = F.cross_entropy(class_logits.flatten(0, 1), torch.full((10,), 4))
    assert float(losses["loss_ce"]) == pytest.approx(float(expected), rel=1e-6)
