"""Threshold calibration: a quantile of normal scores for a target false-alarm rate; synthetics as a check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.calibration import Calibration, fit_calibration

RNG = np.random.default_rng(0)
NORMAL = RNG.normal(1.0, 0.1, 200)


def test_threshold_is_the_target_quantile_of_normal_scores():
    cal = fit_calibration(NORMAL, normal_quantile=0.95)
    assert cal.image.method == "normal_quantile"
    assert cal.threshold == pytest.approx(np.quantile(NORMAL, 0.95))
    fresh = np.random.default_rng(1).normal(1.0, 0.1, 20000)
    assert 0.025 < np.mean(fresh >= cal.threshold) < 0.1  # close to the 5 % target on new normals


@pytest.mark.parametrize(
    "synthetic", [RNG.uniform(3.0, 4.0, 50), RNG.normal(1.05, 0.1, 50), RNG.normal(0.8, 0.1, 9)]
)
def test_synthetics_never_move_the_threshold(synthetic):
    alone = fit_calibration(NORMAL)
    cal = fit_calibration(NORMAL, synthetic)
    assert cal.threshold == alone.threshold and cal.image.n_synthetic == synthetic.size
    assert cal.image.synthetic_recall == pytest.approx(np.mean(synthetic >= cal.threshold))
    assert 0 <= cal.image.f1 <= 1
    assert alone.image.synthetic_recall is None and alone.image.f1 is None


def test_separated_synthetics_are_all_caught():
    cal = fit_calibration(NORMAL, RNG.uniform(3.0, 4.0, 50))
    assert cal.image.synthetic_recall == 1.0


def test_few_normals_use_the_largest():
    few = NORMAL[:5]
    cal = fit_calibration(few)
    assert cal.image.method == "normal_max" and cal.threshold == few.max()
    assert np.isfinite(fit_calibration(few[:1]).threshold)
    assert fit_calibration(NORMAL[:99]).image.method == "normal_max"  # q = 0.99 needs 100
    assert fit_calibration(NORMAL[:100]).image.method == "normal_quantile"


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
    assert cal.pixel_threshold == pytest.approx(np.quantile(normal_px, 0.999), rel=1e-6)
    assert cal.pixel.synthetic_recall > 0.9
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


def test_far_out_training_scores_are_fenced_off_and_counted():
    contaminated = np.concatenate([NORMAL, [3.0, 3.5, 4.0]])  # three parts unlike the rest
    plain = fit_calibration(contaminated, normal_quantile=0.99)
    fenced = fit_calibration(contaminated, normal_quantile=0.99, outlier_iqr=3.0)
    assert plain.threshold > 2.0 and plain.image.n_outliers == 0
    assert fenced.image.n_outliers == 3 and fenced.image.n_normal == NORMAL.size
    assert fenced.threshold == pytest.approx(np.quantile(NORMAL, 0.99))
    assert (
        fit_calibration(NORMAL, outlier_iqr=3.0).threshold == fit_calibration(NORMAL).threshold
    )  # nothing fenced
