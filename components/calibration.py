"""Decision thresholds and score normalisation fitted without real defects.

Inputs are scores of NORMAL training images, each scored against a memory bank that does not hold it (out of fold,
see :mod:`components.out_of_fold`), and optionally scores of SYNTHETIC anomalies made from training images.

Threshold rule (same at image and pixel level)
----------------------------------------------
A plant chooses how many good parts it can afford to reject: the target false-alarm rate ``a``
(``calibration.false_alarm_rate``). The threshold is the ``q = 1 - a`` quantile of the normal scores (linear
interpolation, method ``"normal_quantile"``), so about ``a`` of good parts score at or above it. With fewer
normals than ``1 / a`` that quantile lies beyond the data and the largest normal score is used instead
(method ``"normal_max"``); a single normal gives its own score.

Training sets hold a few parts unlike the rest (odd poses, stains, mislabelled defects). Their out-of-fold scores
sit far above the others and would set a 1 % quantile on their own: on screw 5 of 320 training images scored above
Tukey's far-out fence ``Q3 + 3 IQR`` while the good test images' highest score stayed below it, and the threshold
caught 17 % of the defects where the test ROC allows 36 % at that false-alarm rate (bench/RESULTS.md section 8). With ``outlier_iqr = k > 0``
normal scores beyond ``Q3 + k IQR`` are left out of the quantile and counted (``n_outliers``); the pipeline names
those images so that someone can look at them. The threshold then targets the false-alarm rate on typical good
parts; parts as unusual as the fenced-off images will be flagged.

Synthetic anomalies never move the threshold: they are only a sanity check. Their share at or above the
threshold is stored as ``synthetic_recall`` (with the F1 of normals against synthetics at the threshold). The
previous rule set the threshold between normal and synthetic scores; Perlin blobs score far above real defects,
so that threshold missed most of them (bench/RESULTS.md section 8).

Pixel thresholds use the same rule with per-pixel scores of the normal maps at ``pixel_quantile`` (default
0.999: at 0.99 every normal 256x256 map would show ~650 flagged pixels); unmasked synthetic pixels join the
negatives and masked ones are the positives of the sanity figures. Pixel inputs are randomly subsampled (fixed
seed) to ``max_pixels`` per group to bound time and memory.

Normalisation maps raw scores piecewise-linearly to [0, 1] with the threshold at exactly 0.5:
``[lo, threshold] -> [0, 0.5]``, ``[threshold, hi] -> [0.5, 1]``, clipped, where ``lo``/``hi`` are the
min/max of all calibration scores. Without synthetics ``hi`` is at least ``2 * threshold - lo``
(symmetric) so that scores above the threshold do not all saturate at 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["Calibration", "LevelCalibration", "fit_calibration", "fit_level", "normal_bound"]

PROFILE_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)


@dataclass(frozen=True)
class LevelCalibration:
    """Threshold, normalisation anchors and normal-score profile for one level (image or pixel)."""

    threshold: float
    score_min: float
    score_max: float
    method: str
    normal_bound: float
    quantile: float
    normal_mean: float
    normal_std: float
    normal_quantiles: dict[str, float] = field(default_factory=dict)
    n_normal: int = 0
    n_synthetic: int = 0
    n_outliers: int = 0  # normal scores beyond the far-out fence, left out of the quantile
    f1: float | None = None  # F1 of the threshold on normals vs synthetics, if any
    synthetic_recall: float | None = None  # share of synthetic anomalies at or above the threshold

    def normalize(self, scores: np.ndarray | float) -> np.ndarray | float:
        """Map raw scores to [0, 1], threshold -> 0.5, monotonic, piecewise linear, clipped."""
        xp = [self.score_min, self.threshold, self.score_max]
        out = np.interp(np.asarray(scores, dtype=np.float64), xp, [0.0, 0.5, 1.0])
        return float(out) if np.ndim(scores) == 0 else out


@dataclass(frozen=True)
class Calibration:
    """Image-level calibration plus an optional pixel-level one (for segmentation masks)."""

    image: LevelCalibration
    pixel: LevelCalibration | None = None

    @property
    def threshold(self) -> float:
        return self.image.threshold

    @property
    def score_min(self) -> float:
        return self.image.score_min

    @property
    def score_max(self) -> float:
        return self.image.score_max

    @property
    def normal_quantiles(self) -> dict[str, float]:
        return self.image.normal_quantiles

    @property
    def pixel_threshold(self) -> float | None:
        return None if self.pixel is None else self.pixel.threshold

    @property
    def pixel_min(self) -> float | None:
        return None if self.pixel is None else self.pixel.score_min

    @property
    def pixel_max(self) -> float | None:
        return None if self.pixel is None else self.pixel.score_max

    def normalize(self, scores: np.ndarray | float) -> np.ndarray | float:
        """Normalise image scores (threshold -> 0.5)."""
        return self.image.normalize(scores)

    def normalize_pixels(self, maps: np.ndarray | float) -> np.ndarray | float:
        """Normalise anomaly maps with the pixel calibration (pixel threshold -> 0.5)."""
        if self.pixel is None:
            raise ValueError("no pixel calibration: fit_calibration got no normal_pixel_scores")
        return self.pixel.normalize(maps)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (finite Python floats, ints, strings and None only)."""
        return {
            "version": 1,
            "image": _level_to_dict(self.image),
            "pixel": None if self.pixel is None else _level_to_dict(self.pixel),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if data.get("version", 1) != 1:
            raise ValueError(f"unsupported calibration version {data.get('version')!r}")
        pixel = data.get("pixel")
        return cls(
            image=_level_from_dict(data["image"]),
            pixel=None if pixel is None else _level_from_dict(pixel),
        )


def _level_to_dict(level: LevelCalibration) -> dict[str, Any]:
    out = asdict(level)
    for key, value in out.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"calibration field {key} is not finite: {value}")
    return out


def _level_from_dict(data: dict[str, Any]) -> LevelCalibration:
    data = dict(data)
    data["normal_quantiles"] = {str(k): float(v) for k, v in data.get("normal_quantiles", {}).items()}
    for key in (
        "threshold",
        "score_min",
        "score_max",
        "normal_bound",
        "quantile",
        "normal_mean",
        "normal_std",
    ):
        data[key] = float(data[key])
    for key in ("f1", "synthetic_recall"):
        data[key] = None if data.get(key) is None else float(data[key])
    return LevelCalibration(**data)


# --------------------------------------------------------------------------- fitting


def _finite_1d(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contain NaN or infinite values")
    return arr


def normal_bound(normal: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of normal scores, or their maximum when there are too few to estimate it (module doc)."""
    normal = np.asarray(normal, dtype=np.float64).ravel()
    if _too_few(normal.size, quantile):
        return float(normal.max())
    return float(np.quantile(normal, quantile))


def _too_few(n: int, quantile: float) -> bool:
    """Fewer than ``1 / (1 - quantile)`` scores: the quantile lies beyond the data."""
    return n < math.ceil(1.0 / (1.0 - quantile) - 1e-9)


def _anchors(threshold: float, lo: float, hi: float, symmetric_min: bool) -> tuple[float, float]:
    """Normalisation anchors with lo < threshold < hi."""
    below, above = threshold - lo, hi - threshold
    if symmetric_min:
        above = max(above, below)
    if below <= 0 and above <= 0:
        below = above = max(abs(threshold), 1e-6)
    below = below if below > 0 else above
    above = above if above > 0 else below
    return threshold - below, threshold + above


def outlier_fence(normal: np.ndarray, k: float) -> float:
    """Tukey's far-out fence ``Q3 + k * (Q3 - Q1)`` of the normal scores (``k <= 0``: no fence, +inf)."""
    if k <= 0:
        return math.inf
    q1, q3 = np.quantile(normal, [0.25, 0.75])
    return float(q3 + k * (q3 - q1))


def fit_level(
    normal: Any,
    synthetic: Any | None = None,
    quantile: float = 0.99,
    synthetic_negatives: Any | None = None,
    fence: float = 0.0,
) -> LevelCalibration:
    """Fit one level at ``quantile`` = 1 - target false-alarm rate. Synthetic scores (and the extra negatives
    ``synthetic_negatives``, unmasked synthetic pixels) only give the sanity figures ``f1`` and ``synthetic_recall``.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    normal = _finite_1d(normal, "normal scores")
    if normal.size == 0:
        raise ValueError("calibration needs at least one held-out normal score")
    outliers = normal > outlier_fence(normal, fence)
    normal = normal[~outliers]
    syn = np.empty(0) if synthetic is None else _finite_1d(synthetic, "synthetic scores")
    extra = np.empty(0) if synthetic_negatives is None else _finite_1d(synthetic_negatives, "scores")
    threshold = normal_bound(normal, quantile)
    method = "normal_max" if _too_few(normal.size, quantile) else "normal_quantile"
    f1 = recall = None
    if syn.size:
        negatives = np.concatenate([normal, extra])
        tp = np.count_nonzero(syn >= threshold)
        f1 = float(2 * tp / (tp + np.count_nonzero(negatives >= threshold) + syn.size))
        recall = float(tp / syn.size)
    everything = np.concatenate([normal, syn, extra])
    lo, hi = _anchors(threshold, everything.min(), everything.max(), symmetric_min=syn.size == 0)
    return LevelCalibration(
        threshold=float(threshold),
        score_min=float(lo),
        score_max=float(hi),
        method=method,
        normal_bound=threshold,
        quantile=float(quantile),
        normal_mean=float(normal.mean()),
        normal_std=float(normal.std()),
        normal_quantiles=_profile(normal),
        n_normal=int(normal.size),
        n_outliers=int(outliers.sum()),
        n_synthetic=int(syn.size),
        f1=f1,
        synthetic_recall=recall,
    )


def _profile(normal: np.ndarray) -> dict[str, float]:
    values = np.quantile(normal, PROFILE_QUANTILES)
    return {f"{q:g}": float(v) for q, v in zip(PROFILE_QUANTILES, values, strict=True)}


def _subsample(values: np.ndarray, max_n: int, rng: np.random.Generator) -> np.ndarray:
    return values if values.size <= max_n else values[rng.integers(0, values.size, max_n)]


def fit_calibration(
    normal_scores: Any,
    synthetic_scores: Any | None = None,
    normal_pixel_scores: Any | None = None,
    synthetic_pixel_scores: Any | None = None,
    synthetic_pixel_labels: Any | None = None,
    normal_quantile: float = 0.99,
    pixel_quantile: float = 0.999,
    max_pixels: int = 1_000_000,
    outlier_iqr: float = 0.0,
) -> Calibration:
    """Fit image- and (when pixel maps are given) pixel-level calibration; rule in the module doc.

    Pixel arguments are anomaly maps of any shape (flattened); ``synthetic_pixel_labels`` must match
    ``synthetic_pixel_scores`` in size (values > 0.5 are synthetic-defect pixels).
    """
    image = fit_level(normal_scores, synthetic_scores, normal_quantile, fence=outlier_iqr)
    if normal_pixel_scores is None:
        return Calibration(image=image)
    rng = np.random.default_rng(0)
    normal_px = _subsample(np.asarray(normal_pixel_scores, dtype=np.float32).ravel(), max_pixels, rng)
    pos = neg = None
    if synthetic_pixel_scores is not None:
        if synthetic_pixel_labels is None:
            raise ValueError("synthetic_pixel_scores need synthetic_pixel_labels (the synthetic masks)")
        scores = np.asarray(synthetic_pixel_scores, dtype=np.float32).ravel()
        labels = np.asarray(synthetic_pixel_labels).ravel() > 0.5
        if labels.size != scores.size:
            raise ValueError(
                f"synthetic pixel scores ({scores.size}) and labels ({labels.size}) differ in size"
            )
        pos = _subsample(scores[labels], max_pixels, rng)
        neg = _subsample(scores[~labels], max_pixels, rng)
    pixel = fit_level(normal_px, pos, pixel_quantile, synthetic_negatives=neg)
    return Calibration(image=image, pixel=pixel)
