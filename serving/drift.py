"""Drift: the live input compared with the training-data profile stored in the bundle (``profile.json``).

Over a sliding window of the last N images:

- **PSI** of the normal-classed anomaly scores and of each image statistic (brightness, contrast, sharpness),
  in bins whose edges are the profile's quantiles (so each bin held the same share of training images);
- **KS** distance between the normal-classed scores and the training score distribution;
- the share of live patches whose nearest-neighbour distance is above the training p99 (about 1 % when the input
  looks like the training data).

PSI reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 a real shift.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

EPS = 1e-4
STATS = ("brightness", "contrast", "sharpness")


def psi(live: np.ndarray, quantiles: list[float], bins: int) -> float:
    """Population stability index of ``live`` against a distribution given by evenly spaced quantiles."""
    q = np.asarray(quantiles, dtype=np.float64)
    picks = np.linspace(0, len(q) - 1, bins + 1).round().astype(int)
    edges = np.unique(q[picks][1:-1])  # inner edges; the outer bins are open-ended
    levels = np.interp(edges, q, np.linspace(0.0, 1.0, len(q)))
    expected = np.diff(np.concatenate([[0.0], levels, [1.0]]))
    counts = np.bincount(np.searchsorted(edges, live, side="right"), minlength=len(edges) + 1)
    actual = counts / max(len(live), 1)
    expected, actual = np.maximum(expected, EPS), np.maximum(actual, EPS)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks(live: np.ndarray, quantiles: list[float]) -> float:
    """Largest gap between the live empirical CDF and the training CDF (interpolated from its quantiles)."""
    if len(live) == 0:
        return 0.0
    q = np.asarray(quantiles, dtype=np.float64)
    x = np.sort(live)
    train_cdf = np.interp(x, q, np.linspace(0.0, 1.0, len(q)))
    n = len(x)
    upper = np.arange(1, n + 1) / n
    return float(max(np.max(np.abs(upper - train_cdf)), np.max(np.abs(upper - 1.0 / n - train_cdf))))


class DriftMonitor:
    """Sliding windows of live scores, labels, statistics and NN exceedances; thread-safe."""

    def __init__(self, profile: dict[str, Any], window: int, bins: int = 10):
        self.profile, self.bins = profile, bins
        self.nn_p99 = float(profile.get("nn_distance_p99", np.inf))
        self._lock = threading.Lock()
        self._normal_scores: deque[float] = deque(maxlen=window)
        self._stats: dict[str, deque[float]] = {s: deque(maxlen=window) for s in STATS}
        self._exceed: deque[tuple[int, int]] = deque(maxlen=window)  # (patches above p99, patches) per image

    def add(self, raw_scores: np.ndarray, defective: np.ndarray, stats: dict[str, np.ndarray],
            patch_scores: np.ndarray) -> None:  # fmt: skip
        """Record one batch: raw image scores, labels, image statistics and patch NN distances ``[B, h, w]``."""
        with self._lock:
            for score, bad in zip(raw_scores, defective, strict=True):
                if not bad:
                    self._normal_scores.append(float(score))
            for name in STATS:
                self._stats[name].extend(float(v) for v in stats[name])
            flat = patch_scores.reshape(len(patch_scores), -1)
            for row in flat:
                self._exceed.append((int((row > self.nn_p99).sum()), int(row.size)))

    @property
    def size(self) -> int:
        """Images in the window."""
        return len(self._exceed)

    def snapshot(self) -> dict[str, float]:
        """Current gauges: ``psi_<feature>``, ``ks_score``, ``nn_exceedance``, ``window``."""
        with self._lock:
            scores = np.asarray(self._normal_scores)
            stats = {k: np.asarray(v) for k, v in self._stats.items()}
            above = sum(a for a, _ in self._exceed)
            total = sum(t for _, t in self._exceed)
        out = {"window": float(len(self._exceed)), "nn_exceedance": above / total if total else 0.0}
        if len(scores) and self.profile.get("normal_scores"):
            out["psi_score"] = psi(scores, self.profile["normal_scores"], self.bins)
            out["ks_score"] = ks(scores, self.profile["normal_scores"])
        for name, values in stats.items():
            quantiles = self.profile.get("image_stats", {}).get(name)
            if len(values) and quantiles:
                out[f"psi_{name}"] = psi(values, quantiles, self.bins)
        return out
