"""Tests for pyanomaly.metrics against independent brute-force computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from pyanomaly.metrics import aupro, f1_max, image_auroc, pixel_auroc, pro_curve

# ---------------------------------------------------------------------------
# Independent reference implementations (deliberately slow and simple).
# ---------------------------------------------------------------------------


def brute_force_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney: P(score_pos > score_neg) + 0.5 P(tie), over all pairs."""
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    wins = 0.0
    for positive in positives:
        wins += np.sum(positive > negatives) + 0.5 * np.sum(positive == negatives)
    return wins / (len(positives) * len(negatives))


def slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Loop over every distinct score as threshold; region overlaps via ndimage.label."""
    regions = []
    for index, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for region_id in range(1, count + 1):
            regions.append((index, labeled == region_id))
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for threshold in sorted(set(maps.ravel().tolist()), reverse=True):
        predicted = maps >= threshold
        fprs.append(np.sum(predicted & normal) / np.sum(normal))
        pros.append(
            np.mean([np.sum(predicted[index] & region) / np.sum(region) for index, region in regions])
        )
    fprs.append(1.0)
    pros.append(1.0)
    area = 0.0
    for step in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[step - 1], fprs[step], pros[step - 1], pros[step]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2.0
    return area / fpr_limit


def brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for threshold in np.unique(scores):
        best = max(best, f1_at(labels, scores, threshold))
    return best


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    predicted = scores >= threshold
    true_positives = np.sum(predicted & (labels == 1))
    false_positives = np.sum(predicted & (labels == 0))
    false_negatives = np.sum(~predicted & (labels == 1))
    return 2 * true_positives / (2 * true_positives + false_positives + false_negatives)


def random_masks(rng: np.random.Generator, count: int, size: int) -> np.ndarray:
    """Blobby masks with several regions, some touching only diagonally."""
    masks = np.zeros((count, size, size), dtype=np.uint8)
    for index in range(1, count):  # image 0 stays defect-free
        for _ in range(rng.integers(1, 4)):
            row, col = rng.integers(0, size - 3, size=2)
            height, width = rng.integers(1, 4, size=2)
            masks[index, row : row + height, col : col + width] = 1
    # A diagonal chain: one 8-connected region, three 4-connected ones.
    masks[1, size - 3, 0] = masks[1, size - 2, 1] = masks[1, size - 1, 2] = 1
    return masks


# ---------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_pairwise_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=60)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounding creates ties
    assert image_auroc(labels, scores) == pytest.approx(brute_force_auroc(labels, scores), abs=1e-12)


def test_image_auroc_accepts_tensors_and_bools() -> None:
    labels = torch.tensor([False, True, False, True])
    scores = torch.tensor([0.1, 0.9, 0.4, 0.3], dtype=torch.float32)
    assert image_auroc(labels, scores) == pytest.approx(0.75)
    assert image_auroc([0, 1], [0.0, 1.0]) == 1.0


def test_pixel_auroc_matches_pairwise_count() -> None:
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 3, 10)
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 2)
    expected = brute_force_auroc(masks, maps)
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # (N, 1, H, W) tensors are accepted too.
    assert pixel_auroc(torch.from_numpy(masks)[:, None], torch.from_numpy(maps)[:, None]) == pytest.approx(
        expected
    )


# ---------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 4, 12)
    # Few distinct levels (ties) and a mild signal, so the curve crosses 0.3 in between points.
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2)
    assert aupro(masks, maps) == pytest.approx(slow_aupro(masks, maps), abs=1e-12)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(slow_aupro(masks, maps, 0.05), abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(slow_aupro(masks, maps, 1.0), abs=1e-12)


def test_aupro_continuous_scores_match_slow_reference() -> None:
    rng = np.random.default_rng(7)
    masks = random_masks(rng, 3, 10)
    maps = rng.random(masks.shape) + 0.3 * masks
    assert aupro(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(
        slow_aupro(masks, maps), abs=1e-12
    )


def test_diagonal_pixels_form_one_region() -> None:
    mask = np.zeros((1, 4, 4), dtype=np.uint8)
    mask[0, 0, 0] = mask[0, 1, 1] = 1  # diagonal neighbours: one 8-connected region of size 2
    mask[0, 3, 3] = 1  # a second region
    anomaly_map = np.zeros((1, 4, 4))
    anomaly_map[0, 0, 0] = 1.0
    fprs, pros = pro_curve(mask, anomaly_map)
    # At threshold 1.0 only (0, 0) is predicted: PRO = mean(1/2, 0) = 0.25 (with 4-connectivity it'd be 1/3).
    np.testing.assert_allclose(fprs, [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(pros, [0.0, 0.25, 1.0, 1.0])
    # Curve (0,0) (0,.25) (1,1): PRO(0.3) = 0.475, area = 0.5 * (0.25 + 0.475) * 0.3.
    assert aupro(mask, anomaly_map) == pytest.approx(0.5 * (0.25 + 0.475))
    assert aupro(mask, anomaly_map) == pytest.approx(slow_aupro(mask, anomaly_map))


def test_aupro_fpr_counts_normal_pixels_of_defective_images() -> None:
    masks = np.zeros((2, 2, 2), dtype=np.uint8)
    masks[0, 0, 0] = 1  # 7 normal pixels in total, 3 of them in the defective image
    maps = np.zeros((2, 2, 2))
    maps[0, 0, 1] = 0.9  # a false positive inside the defective image
    maps[0, 0, 0] = 0.5
    # Curve (0,0) (1/7,0) (1/7,1) (1,1): area up to 0.3 is 0.3 - 1/7.
    assert aupro(masks, maps) == pytest.approx((0.3 - 1 / 7) / 0.3)


def test_aupro_perfect_and_inverted_maps() -> None:
    rng = np.random.default_rng(5)
    masks = random_masks(rng, 4, 16)
    perfect = masks + 0.1 * rng.random(masks.shape)  # every anomalous pixel above every normal one
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert aupro(masks, -perfect) == pytest.approx(0.0, abs=1e-12)
    assert aupro(masks, 1.0 - masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_approximate_thresholds() -> None:
    rng = np.random.default_rng(11)
    masks = random_masks(rng, 4, 16)
    integer_maps = rng.integers(0, 21, size=masks.shape) + 5 * masks
    levels = int(integer_maps.max() - integer_maps.min() + 1)
    # When the threshold grid contains every distinct score, the result is exact.
    assert aupro(masks, integer_maps, num_thresholds=levels) == pytest.approx(
        aupro(masks, integer_maps), abs=1e-12
    )
    continuous = rng.random(masks.shape) + 0.5 * masks
    assert aupro(masks, continuous, num_thresholds=2000) == pytest.approx(aupro(masks, continuous), abs=0.01)


# ---------------------------------------------------------------------------
# F1-max
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_max_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=50)
    labels[0] = 1
    scores = np.round(rng.normal(size=50) + labels, 1)
    best_f1, threshold = f1_max(labels, scores)
    assert best_f1 == pytest.approx(brute_force_f1_max(labels, scores), abs=1e-12)
    assert f1_at(labels, scores, threshold) == pytest.approx(best_f1, abs=1e-12)


def test_f1_max_perfect_and_pixel_level() -> None:
    assert f1_max([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 0.8)
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[1, 1, 1] = True
    best_f1, threshold = f1_max(torch.from_numpy(masks), torch.from_numpy(masks.astype(np.float32)))
    assert (best_f1, threshold) == (1.0, 1.0)


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], r"labels and scores must have the same shape"),
        ([0, 2, 1], [0.1, 0.2, 0.3], r"labels must be binary"),
        ([1, 1, 1], [0.1, 0.2, 0.3], r"labels contains only class 1"),
        ([0, 0], [0.1, 0.2], r"labels contains only class 0"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], r"scores contains 1 NaN"),
        ([0, 1], [0.1, float("inf")], r"scores contains 1 NaN or infinite"),
        ([[0, 1]], [[0.1, 0.2]], r"labels must have shape \(N,\)"),
        ([], [], r"labels is empty"),
        (["a", "b"], [0.1, 0.2], r"labels must be numeric"),
    ],
)
def test_image_auroc_rejects_bad_input(labels: list, scores: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        image_auroc(labels, scores)


def test_pixel_metrics_reject_bad_input() -> None:
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[1, 1, 1] = 1
    maps = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match=r"masks must have shape \(N, H, W\)"):
        pixel_auroc(masks[0], maps[0])
    with pytest.raises(ValueError, match=r"masks and maps must have the same shape"):
        aupro(masks, maps[:, :3])
    with pytest.raises(ValueError, match=r"masks must be binary .*masks > 0"):
        aupro(masks * 255, maps)
    bad_maps = maps.copy()
    bad_maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"maps contains 1 NaN"):
        aupro(masks, bad_maps)
    with pytest.raises(ValueError, match=r"masks contains only class 0"):
        pixel_auroc(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match=r"no anomalous pixel"):
        aupro(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match=r"no normal pixel"):
        aupro(np.ones_like(masks), maps)
    for limit in (0.0, 1.5, -0.1, "0.3"):
        with pytest.raises(ValueError, match=r"fpr_limit"):
            aupro(masks, maps, fpr_limit=limit)
    for count in (1, 0, 2.5):
        with pytest.raises(ValueError, match=r"num_thresholds"):
            aupro(masks, maps, num_thresholds=count)


def test_f1_max_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"no positive"):
        f1_max([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"labels and scores must have the same shape"):
        f1_max([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"scores contains 1 NaN"):
        f1_max([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match=r"labels must be binary"):
        f1_max([0, 3], [0.1, 0.2])
