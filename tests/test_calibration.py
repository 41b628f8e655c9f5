"""Threshold calibration from held-out normals and synthetic anomalies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.calibration import Calibration, fit_calibration

RNG = np.random.default_rng(0)
NORMAL = RNG.normal(1.0, 0.1, 200)


def test_overlapping_synthetics():
    synthetic = RNG.normal(1.35, 0.1, 80)  # overlaps the normal tail
    cal = fit_calibration(NORMAL, synthetic)
    assert np.isfinite(cal.threshold)
    assert np.median(NORMAL) < cal.threshold < np.median(synthetic)
    assert np.mean(cal.threshold <= NORMAL) <= 0.011  # never below the 0.99 normal quantile
    assert cal.image.method in {"f1", "normal_bound"} and 0 < cal.image.f1 <= 1


def test_separated_synthetics_cut_in_the_gap():
    synthetic = RNG.uniform(3.0, 4.0, 50)
    cal = fit_calibration(NORMAL, synthetic)
    assert cal.image.method == "separated"
    gap_mid = (max(NORMAL.max(), cal.image.normal_bound) + synthetic.min()) / 2
    assert cal.threshold == pytest.approx(gap_mid)
    assert cal.image.f1 == 1.0


@pytest.mark.parametrize("synthetic", [None, np.array([])])
def test_normal_only_fallback_does_not_flag_everything(synthetic):
    cal = fit_calibration(NORMAL, synthetic)
    assert cal.image.method == "normal_only" and cal.image.n_synthetic == 0
    gaussian = NORMAL.mean() + 2.3263 * NORMAL.std(ddof=1)
    assert cal.threshold == pytest.approx(max(np.quantile(NORMAL, 0.99), gaussian), rel=1e-4)
    fresh = np.random.default_rng(1).normal(1.0, 0.1, 5000)
    assert np.mean(fresh >= cal.threshold) < 0.03


def test_few_normals_extrapolate():
    few = NORMAL[:5]
    alone = fit_calibration(few)
    assert alone.threshold >= few.max()
    assert alone.threshold == pytest.approx(max(few.max(), few.mean() + 2.3263 * few.std(ddof=1)), rel=1e-4)
    cal = fit_calibration(few, RNG.normal(2.0, 0.1, 30))
    assert few.max() < cal.threshold < 1.7
    assert np.isfinite(fit_calibration(few[:1]).threshold)


def test_generator_scoring_like_normals_falls_back_to_normal_bound():
    cal = fit_calibration(NORMAL, RNG.normal(0.8, 0.1, 50))  # synthetics below normals
    assert cal.image.method == "normal_bound"
    assert cal.threshold == pytest.approx(fit_calibration(NORMAL).threshold)


def test_normalize_monotonic_clipped_and_threshold_at_half():
    for cal in (fit_calibration(NORMAL), fit_calibration(NORMAL, RNG.uniform(3, 4, 20))):
        assert cal.normalize(cal.threshold) == pytest.approx(0.5)
        assert isinstance(cal.normalize(1.0), float)
        grid = np.linspace(-10, 10, 2001)
        out = cal.normalize(grid)
        assert out.shape == grid.shape and np.all(np.diff(out) >= 0)
        assert out.min() == 0.0 and out.max() == 1.0
        assert cal.normalize(NORMAL.reshape(20, 10)).shape == (20, 10)
        assert cal.score_min < cal.threshold < cal.score_max


def test_pixel_calibration_and_dict_round_trip():
    rng = np.random.default_rng(2)
    normal_px = rng.normal(0.0, 1.0, (10, 16, 16))
    syn_labels = np.zeros((6, 16, 16), bool)
    syn_labels[:, 4:9, 4:9] = True
    syn_px = rng.normal(0.0, 1.0, syn_labels.shape) + 6.0 * syn_labels
    cal = fit_calibration(
        NORMAL,
        RNG.uniform(3, 4, 20),
        normal_pixel_scores=normal_px,
        synthetic_pixel_scores=syn_px,
        synthetic_pixel_labels=syn_labels,
    )
    assert np.quantile(normal_px, 0.99) < cal.pixel_threshold < np.median(syn_px[syn_labels])
    assert cal.normalize_pixels(cal.pixel_threshold) == pytest.approx(0.5)
    assert cal.pixel_min < cal.pixel_threshold < cal.pixel_max
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict(), allow_nan=False)))
    assert back == cal
    assert Calibration.from_dict(fit_calibration(NORMAL).to_dict()).pixel is None


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        fit_calibration([])
    with pytest.raises(ValueError, match="NaN"):
        fit_calibration([1.0, np.nan])
    with pytest.raises(ValueError, match="labels"):
        fit_calibration(NORMAL, None, np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="no pixel calibration"):
        fit_calibration(NORMAL).normalize_pixels(np.zeros(3))
