"""Metrics against sklearn and slow brute-force references on tiny random data."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from components.metrics import (
    aupro,
    f1_max,
    image_auroc,
    pixel_auroc,
    pixel_roc_curve,
    pro_curve,
    roc_curve,
)


def _random_masks(rng: np.random.Generator, n: int = 6, size: int = 16) -> np.ndarray:
    """Blobby masks with several regions per image; a third of the images are defect-free."""
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y : y + h, x : x + w] = True
    return masks


def _brute_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    regions = []
    for mask, amap in zip(masks, maps, strict=True):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labeled == k] for k in range(1, n + 1)]
    normal = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs + [1.0]), np.array(pros + [1.0])
    grid_pro = np.interp(limit, fprs, pros)  # fprs non-decreasing; interp takes the last equal x
    keep = fprs <= limit
    x, y = np.append(fprs[keep], limit), np.append(pros[keep], grid_pro)
    return float(np.trapezoid(y, x) / limit)


def test_image_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels
    scores[:100] = np.round(scores[:100])  # ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, thr = roc_curve(labels, scores)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.isinf(thr[0])


def test_pixel_auroc_matches_sklearn():
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, n=9, size=32)
    maps = (rng.random(masks.shape) + 0.4 * masks).astype(np.float32)
    maps[0, :4] = np.round(maps[0, :4], 1)  # ties
    maps[1, :2] = -maps[1, :2]  # negatives
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)
    assert pixel_auroc(masks.astype(np.uint8) * 255, maps) == pytest.approx(expected, abs=1e-9)
    fpr, tpr, _ = pixel_roc_curve(masks, maps)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_brute_force(seed: int):
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng)
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    if seed == 2:
        maps = np.round(maps * 8) / 8  # heavy ties
    expected = _brute_aupro(masks, maps.astype(np.float64))
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-6)  # exact up to rounding
    assert aupro(masks, maps, num_thresholds=2000) == pytest.approx(expected, abs=2e-3)


def test_aupro_other_limit_and_curve_shape():
    rng = np.random.default_rng(3)
    masks = _random_masks(rng)
    maps = (rng.random(masks.shape) + 0.3 * masks).astype(np.float32)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(_brute_aupro(masks, maps, 0.05), abs=1e-3)
    fpr, pro, thr = pro_curve(masks, maps)
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0) and np.all(np.diff(thr) <= 0)


def test_aupro_perfect_and_uncorrelated():
    rng = np.random.default_rng(4)
    masks = _random_masks(rng, n=8, size=32)
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert pixel_auroc(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    noise = rng.random(masks.shape).astype(np.float32)
    assert aupro(masks, noise) < 0.25  # random maps: PRO ~ FPR, so ~0.15


def test_f1_max_matches_brute_force():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 80)
    scores = np.round(rng.normal(size=80) + labels, 1)
    best = max(
        (2 * np.sum((scores >= t) & (labels == 1)) / (np.sum(scores >= t) + labels.sum()), t)
        for t in np.unique(scores)
    )
    f1, thr = f1_max(labels, scores)
    assert f1 == pytest.approx(best[0])
    pred = scores >= thr
    assert 2 * np.sum(pred & (labels == 1)) / (pred.sum() + labels.sum()) == pytest.approx(f1)


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda: image_auroc(np.zeros(5), np.arange(5.0)), "image AUROC needs both"),
        (lambda: f1_max(np.zeros(5), np.arange(5.0)), "F1 needs both"),
        (lambda: pixel_auroc(np.ones((2, 4, 4)), np.zeros((2, 4, 4))), "pixel AUROC needs both"),
        (lambda: aupro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4))), "at least one defect region"),
        (lambda: aupro(np.ones((1, 4, 4)), np.zeros((1, 4, 4))), "needs normal pixels"),
        (lambda: pixel_auroc(np.ones((2, 4, 4)), np.zeros((2, 4, 5))), r"\[N,H,W\]"),
        (lambda: image_auroc([0, 1], [0.0, np.nan]), "NaN"),
    ],
)
def test_errors(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()
