"""Anomaly detection metrics: image/pixel AUROC, AUPRO (MVTec AD) and F1-max."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = ["image_auroc", "pixel_auroc", "aupro", "f1_max", "pro_curve"]

# 8-connectivity, as in the official MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _to_numpy(value: Any, name: str) -> np.ndarray:
    """Converts a tensor / array / sequence to a float64 numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:
            value = value.float()
        value = value.numpy()
    try:
        array = np.asarray(value)
    except Exception as error:  # e.g. ragged nested lists
        raise ValueError(f"{name} could not be converted to an array: {error}") from error
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{name} must be numeric or boolean, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise ValueError(f"{name} must be real-valued, got dtype {array.dtype}")
    return array.astype(np.float64, copy=False)


def _check_scores(scores: np.ndarray, name: str) -> None:
    if scores.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(scores)):
        num_bad = int(np.sum(~np.isfinite(scores)))
        raise ValueError(f"{name} contains {num_bad} NaN or infinite value(s)")


def _check_binary(labels: np.ndarray, name: str) -> None:
    if labels.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all((labels == 0) | (labels == 1)):
        bad = np.unique(labels[(labels != 0) & (labels != 1)])[:5]
        raise ValueError(
            f"{name} must be binary (0/1 or bool), found other values such as "
            f"{bad.tolist()} (binarise first, e.g. `{name} > 0`)"
        )


def _check_same_shape(a: np.ndarray, a_name: str, b: np.ndarray, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} must have the same shape, got {a_name} {a.shape} and {b_name} {b.shape}"
        )


def _check_both_classes(labels: np.ndarray, name: str) -> None:
    num_positive = int(labels.sum())
    if num_positive == 0 or num_positive == labels.size:
        only = "1 (anomalous)" if num_positive else "0 (normal)"
        raise ValueError(
            f"{name} contains only class {only}; AUROC needs both normal (0) and anomalous (1) samples"
        )


def _image_level(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    labels_np = _to_numpy(labels, "labels")
    scores_np = _to_numpy(scores, "scores")
    if labels_np.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {labels_np.shape}")
    _check_same_shape(labels_np, "labels", scores_np, "scores")
    _check_binary(labels_np, "labels")
    _check_scores(scores_np, "scores")
    return labels_np, scores_np


def _pixel_level(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validates pixel-level inputs; accepts (N, H, W) or (N, 1, H, W)."""
    masks_np = _to_numpy(masks, "masks")
    maps_np = _to_numpy(maps, "maps")
    for name, array in (("masks", masks_np), ("maps", maps_np)):
        if not (array.ndim == 3 or (array.ndim == 4 and array.shape[1] == 1)):
            raise ValueError(f"{name} must have shape (N, H, W) or (N, 1, H, W), got {array.shape}")
    masks_np = masks_np.reshape(masks_np.shape[0], *masks_np.shape[-2:])
    maps_np = maps_np.reshape(maps_np.shape[0], *maps_np.shape[-2:])
    _check_same_shape(masks_np, "masks", maps_np, "maps")
    _check_binary(masks_np, "masks")
    _check_scores(maps_np, "maps")
    return masks_np, maps_np


def image_auroc(labels: Any, scores: Any) -> float:
    """Image-level area under the ROC curve.

    Args:
        labels: (N,) ground truth, 1 = anomalous, 0 = normal (array or tensor).
        scores: (N,) anomaly scores, higher = more anomalous.

    Returns:
        AUROC in [0, 1].

    Raises:
        ValueError: shapes differ, labels not binary, a class is missing, or
            scores contain NaN/inf.
    """
    labels_np, scores_np = _image_level(labels, scores)
    _check_both_classes(labels_np, "labels")
    return float(roc_auc_score(labels_np, scores_np))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level AUROC over all pixels of all images.

    Args:
        masks: (N, H, W) binary ground-truth masks (1 = anomalous pixel).
        maps: (N, H, W) anomaly maps, higher = more anomalous.

    Returns:
        AUROC in [0, 1].
    """
    masks_np, maps_np = _pixel_level(masks, maps)
    _check_both_classes(masks_np, "masks")
    return float(roc_auc_score(masks_np.ravel(), maps_np.ravel()))


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Per-pixel weight 1/size(region) on anomalous pixels, 0 on normal ones.

    Returns:
        (weights (N, H, W) float64, number of regions, number of normal pixels).
    """
    weights = np.zeros(masks.shape, dtype=np.float64)
    num_regions = 0
    for index, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if count == 0:
            continue
        sizes = np.bincount(labeled.ravel(), minlength=count + 1).astype(np.float64)
        inverse_sizes = np.zeros_like(sizes)
        inverse_sizes[1:] = 1.0 / sizes[1:]
        weights[index] = inverse_sizes[labeled]
        num_regions += count
    num_normal = int(masks.size - np.count_nonzero(masks))
    if num_regions == 0:
        raise ValueError("masks contain no anomalous pixel (no ground-truth region); AUPRO is undefined")
    if num_normal == 0:
        raise ValueError("masks contain no normal pixel (every pixel is anomalous); AUPRO is undefined")
    return weights, num_regions, num_normal


def pro_curve(masks: Any, maps: Any, num_thresholds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve (FPR, PRO) as in the MVTec AD evaluation code.

    A pixel is predicted anomalous at threshold t if its score is >= t. Regions
    are the 8-connected components of each mask. PRO(t) is the mean over all
    regions of all images of the fraction of the region predicted anomalous;
    FPR(t) is the fraction of all normal pixels (mask == 0, of every image)
    predicted anomalous.

    Args:
        masks: (N, H, W) binary ground-truth masks.
        maps: (N, H, W) anomaly maps, higher = more anomalous.
        num_thresholds: None = every distinct score is a threshold (exact).
            Otherwise this many thresholds evenly spaced between the minimum
            and maximum score (approximate, less memory).

    Returns:
        (fprs, pros), each (K,), FPR non-decreasing, starting at (0, 0) and
        ending at (1, 1).
    """
    masks_np, maps_np = _pixel_level(masks, maps)
    if num_thresholds is not None:
        if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)):
            raise ValueError(f"num_thresholds must be None or an int >= 2, got {num_thresholds!r}")
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be None or an int >= 2, got {num_thresholds}")
    weights, num_regions, num_normal = _region_weights(masks_np)
    scores = maps_np.ravel()
    region_weights = weights.ravel()
    normal = masks_np.ravel() == 0

    if num_thresholds is None:
        # Descending order; ties are resolved by keeping only the last pixel of
        # each run of equal scores (threshold "score >= t" takes all of them).
        order = np.argsort(scores, kind="stable")[::-1]
        sorted_scores = scores[order]
        false_positives = np.cumsum(normal[order], dtype=np.float64)
        overlaps = np.cumsum(region_weights[order])
        keep = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
        false_positives = false_positives[keep]
        overlaps = overlaps[keep]
    else:
        thresholds = np.linspace(scores.min(), scores.max(), int(num_thresholds))
        # bin k = index of the largest threshold <= score; a pixel is positive
        # at threshold k' iff k' <= k.
        bins = np.clip(np.searchsorted(thresholds, scores, side="right") - 1, 0, None)
        per_bin_normal = np.bincount(bins, weights=normal.astype(np.float64), minlength=len(thresholds))
        per_bin_overlap = np.bincount(bins, weights=region_weights, minlength=len(thresholds))
        false_positives = np.cumsum(per_bin_normal[::-1])
        overlaps = np.cumsum(per_bin_overlap[::-1])

    fprs = np.clip(false_positives / num_normal, None, 1.0)
    pros = np.clip(overlaps / num_regions, None, 1.0)
    fprs = np.concatenate(([0.0], fprs, [1.0]))
    pros = np.concatenate(([0.0], pros, [1.0]))
    return fprs, pros


def _trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under y(x) for x in [0, x_max], interpolating at x_max.

    x must be non-decreasing (same convention as the MVTec AD `trapezoid`).
    """
    correction = 0.0
    if not np.any(x == x_max):
        insert_at = int(np.searchsorted(x, x_max, side="right"))
        if not 0 < insert_at < len(x):
            raise ValueError(f"x_max={x_max} is outside the curve's range [{x[0]}, {x[-1]}]")
        x0, x1 = x[insert_at - 1], x[insert_at]
        y0, y1 = y[insert_at - 1], y[insert_at]
        y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        correction = 0.5 * (y_interp + y0) * (x_max - x0)
    inside = x <= x_max
    x, y = x[inside], y[inside]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def aupro(
    masks: Any,
    maps: Any,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD AUPRO).

    Follows the official MVTec AD evaluation code (Bergmann et al.): the PRO
    curve (see :func:`pro_curve`) is integrated over FPR in [0, fpr_limit]
    with the trapezoidal rule, interpolating at exactly ``fpr_limit``, and
    divided by ``fpr_limit``.

    Args:
        masks: (N, H, W) binary ground-truth masks (needs >= 1 anomalous and
            >= 1 normal pixel overall).
        maps: (N, H, W) anomaly maps, higher = more anomalous.
        fpr_limit: upper FPR integration limit, in (0, 1].
        num_thresholds: None for the exact curve (every distinct score), or a
            number of evenly spaced thresholds for a faster approximation.

    Returns:
        AUPRO in [0, 1].
    """
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float, np.floating, np.integer)):
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
    if not 0.0 < float(fpr_limit) <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fprs, pros = pro_curve(masks, maps, num_thresholds=num_thresholds)
    area = _trapezoid_up_to(fprs, pros, float(fpr_limit))
    return float(min(max(area / float(fpr_limit), 0.0), 1.0))


def f1_max(labels: Any, scores: Any) -> tuple[float, float]:
    """Maximum F1 score over all thresholds.

    A sample is predicted anomalous if ``score >= threshold``.

    Args:
        labels: binary ground truth of any shape, e.g. (N,) image labels or
            (N, H, W) masks (flattened); needs at least one positive.
        scores: anomaly scores of the same shape, higher = more anomalous.

    Returns:
        (best F1, threshold achieving it).
    """
    labels_np = _to_numpy(labels, "labels")
    scores_np = _to_numpy(scores, "scores")
    _check_same_shape(labels_np, "labels", scores_np, "scores")
    _check_binary(labels_np, "labels")
    _check_scores(scores_np, "scores")
    if not np.any(labels_np == 1):
        raise ValueError("labels contain no positive (anomalous, 1) sample; F1 is undefined")
    precision, recall, thresholds = precision_recall_curve(labels_np.ravel(), scores_np.ravel())
    # The last (precision=1, recall=0) point has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2.0 * precision * recall,
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])
