"""Greedy k-centre coreset: the fast path against the brute-force reference, storage precision, arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from components.coreset import (
    coreset_size,
    covering_radius,
    greedy_coreset,
    greedy_coreset_reference,
    random_projection,
)


def _points(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize(("num", "dim", "k", "start"), [(200, 8, 60, 0), (150, 32, 149, 7), (97, 3, 40, 96)])
def test_fast_equals_reference_without_projection(num, dim, k, start):
    x = _points(num, dim, seed=num)
    fast = greedy_coreset(x, n=k, projection_dim=None, start=start)
    np.testing.assert_array_equal(fast, greedy_coreset_reference(x, k, start))
    assert fast.dtype == np.int64 and fast[0] == start and len(np.unique(fast)) == k


def test_ties_go_to_the_lowest_index():
    # every point but the origin is at distance 1 from it; later ties stay at distance 1
    x = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=np.float32)
    np.testing.assert_array_equal(greedy_coreset(x, n=4, projection_dim=None, start=0), [0, 1, 2, 3])
    np.testing.assert_array_equal(greedy_coreset_reference(x, 4, 0), [0, 1, 2, 3])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_exact_duplicates_are_taken_in_index_order(dtype):
    x = _points(60, 6)
    doubled = np.concatenate([x, x])
    fast = greedy_coreset(doubled, n=119, projection_dim=None, start=3, storage_dtype=dtype)
    np.testing.assert_array_equal(np.sort(fast[:60]), np.arange(60))  # originals win ties with their copies
    np.testing.assert_array_equal(fast[60:], np.arange(60, 119))  # then the copies, all at distance 0
    if dtype == "float32":
        np.testing.assert_array_equal(fast, greedy_coreset_reference(doubled, 119, 3))


def test_projection_is_applied_before_selection():
    x = _points(120, 40)
    fast = greedy_coreset(x, n=30, projection_dim=8, seed=5, start=2)
    np.testing.assert_array_equal(fast, greedy_coreset_reference(random_projection(x, 8, seed=5), 30, 2))


def test_random_projection_shape_and_passthrough():
    x = _points(10, 16)
    assert random_projection(x, 4).shape == (10, 4)
    for dim in (None, 0, 16, 64):
        np.testing.assert_array_equal(random_projection(x, dim).numpy(), x)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", torch.float16])
def test_half_storage_covering_radius_close_to_exact(dtype):
    x = _points(1500, 24, seed=1)
    exact = covering_radius(x, greedy_coreset_reference(x, 60, 0))
    half = covering_radius(x, greedy_coreset(x, n=60, projection_dim=None, start=0, storage_dtype=dtype))
    assert half == pytest.approx(exact, rel=0.04)


def test_covering_radius_matches_brute_force():
    x = _points(300, 5)
    sel = np.array([0, 10, 20, 299])
    assert covering_radius(x, sel, chunk_elems=64) == pytest.approx(cdist(x, x[sel]).min(1).max(), rel=1e-9)
    assert covering_radius(x, np.arange(300)) == pytest.approx(0.0, abs=1e-5)


def test_radius_at_most_last_pick_distance():
    # greedy picks the farthest point, so no point is farther from the centres than the last pick was
    x = _points(400, 4)
    sel = greedy_coreset(x, n=20, projection_dim=None, start=0)
    chosen_at = cdist(x[sel[-1:]], x[sel[:-1]]).min()
    assert covering_radius(x, sel) <= chosen_at + 1e-6


def test_inputs_torch_and_half_numpy():
    x = _points(80, 6)
    ref = greedy_coreset(x, n=10, projection_dim=None, start=1)
    np.testing.assert_array_equal(
        greedy_coreset(torch.from_numpy(x), n=10, projection_dim=None, start=1), ref
    )
    half = greedy_coreset(x.astype(np.float16), n=10, projection_dim=None, start=1)
    assert half.shape == (10,) and half[0] == 1


def test_seeded_start_is_deterministic():
    x = _points(100, 6)
    a = greedy_coreset(x, ratio=0.1, seed=3)
    np.testing.assert_array_equal(a, greedy_coreset(x, ratio=0.1, seed=3))
    assert len(a) == 10


def test_progress_bar(capsys):
    greedy_coreset(_points(50, 4), n=5, progress=True)
    assert "coreset" in capsys.readouterr().err


@pytest.mark.parametrize("kw", [{"n": 100}, {"n": 1000}, {"ratio": 1.0}])
def test_n_at_least_num_returns_all(kw):
    np.testing.assert_array_equal(greedy_coreset(_points(100, 3), **kw), np.arange(100))


def test_coreset_size():
    assert coreset_size(200_000, ratio=0.01) == 2000
    assert coreset_size(100, ratio=0.29) == 29
    assert coreset_size(10, ratio=0.01) == 1
    assert coreset_size(10, n=3) == 3


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({}, ValueError, "exactly one"),
        ({"n": 5, "ratio": 0.1}, ValueError, "exactly one"),
        ({"n": 0}, ValueError, "n must be >= 1"),
        ({"n": 2.5}, TypeError, "n must be an int"),
        ({"n": True}, TypeError, "n must be an int"),
        ({"ratio": 0.0}, ValueError, "ratio must be"),
        ({"ratio": 1.5}, ValueError, "ratio must be"),
        ({"n": 3, "start": 50}, ValueError, "start must be"),
        ({"n": 3, "storage_dtype": "int8"}, ValueError, "storage dtype"),
        ({"n": 3, "projection_dim": -1}, ValueError, "projection_dim"),
    ],
)
def test_argument_validation(kw, err, match):
    with pytest.raises(err, match=match):
        greedy_coreset(_points(20, 4), **kw)


def test_feature_shape_validation():
    with pytest.raises(ValueError, match="2-D"):
        greedy_coreset(np.zeros(5, np.float32), n=2)
    with pytest.raises(ValueError, match="non-empty"):
        greedy_coreset(np.zeros((0, 4), np.float32), n=2)
    with pytest.raises(TypeError, match="torch.Tensor or np.ndarray"):
        greedy_coreset([[0.0, 1.0]], n=1)


def test_continuing_from_initial_centres():
    x = np.random.default_rng(5).normal(size=(400, 12)).astype(np.float32)
    full = greedy_coreset(x, n=40, start=7)
    # continuing from the first m centres of a run gives exactly that run's remaining centres
    for m in (2, 15, 39):
        assert np.array_equal(greedy_coreset(x, n=40, initial=full[:m]), full)
    # centres that survive a removal come first, the greedy fills the rest with the farthest points
    kept = full[full % 2 == 0][:10]
    out = greedy_coreset(x, n=40, initial=kept)
    assert np.array_equal(out[:10], kept) and len(set(out.tolist())) == 40
    assert covering_radius(x, out) <= covering_radius(x, kept)
    assert np.array_equal(greedy_coreset(x, n=40, initial=full), full)  # nothing left to choose
    for bad in ([1, 1], [400], list(range(41))):
        with pytest.raises(ValueError, match="initial"):
            greedy_coreset(x, n=40, initial=np.array(bad))


def test_random_subsample_ablation_keeps_initial_rows_and_covers_worse():
    """bank.coreset_method=random (the paper's ablation): same size, seeded, keeps the surviving centres when a
    fold bank is refilled, and covers the points worse than the greedy on clustered data."""
    from components.config import BankConfig
    from components.memory_bank import coreset_indices

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(900, 8)), rng.normal(loc=8, size=(12, 8))]).astype(np.float32)
    greedy = coreset_indices(x, BankConfig(coreset_ratio=0.02), seed=1, progress=False)
    random = coreset_indices(
        x, BankConfig(coreset_ratio=0.02, coreset_method="random"), seed=1, progress=False
    )
    assert len(random) == len(greedy) == 18 and len(np.unique(random)) == 18
    again = coreset_indices(
        x, BankConfig(coreset_ratio=0.02, coreset_method="random"), seed=1, progress=False
    )
    np.testing.assert_array_equal(random, again)
    assert covering_radius(x, random) > 1.5 * covering_radius(x, greedy)
    initial = np.array([3, 5, 905])
    refill = coreset_indices(
        x, BankConfig(coreset_method="random"), seed=2, progress=False, initial=initial, n=10
    )
    assert len(refill) == 10 and set(initial) <= set(refill.tolist())
