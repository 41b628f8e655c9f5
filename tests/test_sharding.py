"""Sharded memory bank: the partition, the two-level coreset's radius bound, and sharded k-NN search."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from components.coreset import covering_radius, greedy_coreset
from components.nn_index import build_index, search
from components.sharding import (
    ShardedIndex,
    merge_coresets,
    merge_knn,
    shard_coreset,
    shard_quota,
    split_shards,
    two_level_coreset,
)


def _points(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _clusters(n: int = 4000, d: int = 16, centres: int = 40, seed: int = 0) -> np.ndarray:
    """Gaussian blobs of uneven spread, like patches of a few recurring textures."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(scale=6.0, size=(centres, d))
    label = rng.integers(centres, size=n)
    spread = rng.uniform(0.3, 1.5, size=centres)[label, None]
    return (mu[label] + spread * rng.normal(size=(n, d))).astype(np.float32)


# --- split_shards --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num", "shards", "block"), [(1000, 1, 1), (1000, 7, 1), (1003, 4, 10), (5, 5, 1)])
def test_split_is_a_balanced_seeded_partition(num, shards, block):
    parts = split_shards(num, shards, seed=3, block=block)
    assert len(parts) == shards
    every = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(every), np.arange(num))  # disjoint and covering
    blocks = [len(np.unique(p // block)) for p in parts]
    assert max(blocks) - min(blocks) <= 1
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)
        # whole blocks only: each block is entirely in one shard
        for b in np.unique(p // block):
            assert set(range(b * block, min((b + 1) * block, num))) <= set(p.tolist())
    again = split_shards(num, shards, seed=3, block=block)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_split_depends_on_the_seed_and_is_not_contiguous():
    a, b = split_shards(1000, 4, seed=0), split_shards(1000, 4, seed=1)
    assert not np.array_equal(a[0], b[0])
    assert np.ptp(a[0]) > 900  # spread over the whole range, not one block of 250


@pytest.mark.parametrize(
    ("num", "shards", "block", "match"),
    [
        (10, 0, 1, "shards must be >= 1"),
        (0, 1, 1, "num must be >= 1"),
        (5, 8, 1, "cannot split 5 points into 8 shards"),
        (100, 11, 10, "only 10 block"),
        (10, 2, 0, "block must be >= 1"),
        (10, 2.0, 1, "shards must be an int"),
        (10, True, 1, "shards must be an int"),
    ],
)
def test_split_rejects_bad_arguments(num, shards, block, match):
    with pytest.raises(ValueError, match=match):
        split_shards(num, shards, seed=0, block=block)


def test_shard_quota():
    assert shard_quota(250, 1000, 40, 2.0) == 20  # twice its share of 10
    assert shard_quota(251, 1000, 40, 1.0) == 11  # rounded up
    assert shard_quota(3, 1000, 40, 100.0) == 3  # never more than the shard
    assert shard_quota(1, 1000, 1, 1.0) == 1  # never less than one


# --- two-level coreset -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shards", "factor", "projection_dim"), [(4, 2.0, None), (8, 1.5, None), (4, 2.0, 8)]
)
def test_two_level_radius_bound_holds(shards, factor, projection_dim):
    x = _clusters()
    k = 80
    result = two_level_coreset(x, shards, n=k, per_shard_factor=factor, projection_dim=projection_dim, seed=1)
    assert result.dtype == np.int64 and len(result) == k and len(np.unique(result)) == k
    # the same per-shard coresets, recomputed step by step
    parts = split_shards(len(x), shards, seed=1)
    cands = [shard_coreset(x, p, shard_quota(len(p), len(x), k, factor), projection_dim, 1) for p in parts]
    np.testing.assert_array_equal(result, merge_coresets(x, cands, k, projection_dim, 1))
    union = np.concatenate(cands)
    assert len(union) >= factor * k and set(result.tolist()) <= set(union.tolist())
    r_shard = max(_radius_over(x, p, c) for p, c in zip(parts, cands, strict=True))
    r_union = _radius_over(x, union, result)
    r_merged = covering_radius(x, result)
    assert r_merged <= r_union + r_shard + 1e-9
    assert r_merged >= r_union  # the union is a subset of all points


def _radius_over(x: np.ndarray, points: np.ndarray, centres: np.ndarray) -> float:
    """Covering radius of ``x[centres]`` over ``x[points]``, brute force in float64."""
    return float(cdist(x[points].astype(np.float64), x[centres].astype(np.float64)).min(1).max())


def test_two_level_is_close_to_one_level_on_clustered_data():
    x = _clusters(seed=2)
    k = 80
    one = covering_radius(x, greedy_coreset(x, n=k, projection_dim=None, seed=0))
    for shards in (2, 4, 8):
        # default: each shard keeps k points; proven within 4x, in practice within a few per cent
        two = covering_radius(x, two_level_coreset(x, shards, n=k, seed=0))
        assert two <= 1.3 * one, (shards, two / one)
    # 20 points per shard for 40 blobs: shards miss blobs, the per-shard radius dominates
    starved = covering_radius(x, two_level_coreset(x, 8, n=k, per_shard_factor=2.0, seed=0))
    assert starved > 1.5 * one


def test_one_shard_with_factor_one_is_one_level_greedy():
    x = _points(500, 8)
    np.testing.assert_array_equal(
        two_level_coreset(x, 1, n=37, per_shard_factor=1.0, seed=4),
        greedy_coreset(x, n=37, projection_dim=None, seed=4),
    )


def test_two_level_ratio_and_whole_bank():
    x = _points(1000, 8)
    assert len(two_level_coreset(x, 4, ratio=0.05)) == 50
    np.testing.assert_array_equal(two_level_coreset(x[:10], 2, n=10), np.arange(10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shards": 0, "n": 5}, "shards must be >= 1"),
        ({"shards": 200, "n": 5}, "cannot split 100 points into 200 shards"),
        ({"shards": 2, "n": 5, "per_shard_factor": 0.5}, "per_shard_factor must be >= 1"),
        ({"shards": 2}, "exactly one of n"),
        ({"shards": 2, "n": 5, "ratio": 0.1}, "exactly one of n"),
        ({"shards": 2, "ratio": 1.5}, "ratio must be"),
    ],
)
def test_two_level_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        two_level_coreset(_points(100, 4), **kwargs)
    with pytest.raises(ValueError, match="2-D"):
        two_level_coreset(np.zeros(10, dtype=np.float32), 2, n=2)


def test_merge_rejects_overlapping_shard_coresets():
    with pytest.raises(ValueError, match="overlap"):
        merge_coresets(_points(10, 2), [np.array([0, 1]), np.array([1, 2])], 2)


# --- sharded search ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shards", "k"), [(1, 1), (3, 1), (4, 5), (7, 16)])
def test_sharded_flat_equals_single_flat(shards, k):
    bank, queries = _points(3000, 16, seed=1), _points(700, 16, seed=2)
    sharded = ShardedIndex(bank, split_shards(len(bank), shards, seed=5), kind="flat")
    assert sharded.ntotal == len(bank) and sharded.d == 16 and sharded.shards == shards
    dist, ids = sharded.search(queries, k)
    ref_dist, ref_ids = search(build_index(bank, "flat", use_gpu=False), queries, k)
    # bit for bit at these dims (OpenBLAS sums each dot product in the same order whatever the bank size)
    np.testing.assert_array_equal(dist, ref_dist)
    np.testing.assert_array_equal(ids, ref_ids)  # continuous random data: no ties


def test_sharded_flat_equals_single_up_to_ties():
    base = _points(400, 8, seed=3)
    bank = np.concatenate([base, base[:200]])  # rows 400..599 duplicate rows 0..199
    queries = np.concatenate([base[:50] + 0.01, _points(50, 8, seed=4)])
    sharded = ShardedIndex(bank, split_shards(len(bank), 4, seed=0))
    dist, ids = sharded.search(queries, 3)
    ref_dist, ref_ids = search(build_index(bank, "flat", use_gpu=False), queries, 3)
    np.testing.assert_array_equal(dist, ref_dist)
    differ = ids != ref_ids  # ids may differ between equal rows only
    np.testing.assert_array_equal(bank[ids[differ]], bank[ref_ids[differ]])
    # merged ties go to the lower global id
    both = dist[:, 0] == dist[:, 1]
    assert both.any() and np.all(ids[both, 0] < ids[both, 1])


def test_sharded_search_is_brute_force_k_best():
    bank, queries = _points(500, 8, seed=6), _points(40, 8, seed=7)
    parts = [
        np.array([3, 100]),
        np.arange(200, 500),
        np.arange(0, 3),
    ]  # a shard smaller than k, a partial cover
    dist, ids = ShardedIndex(bank, parts).search(queries, 6)
    covered = np.concatenate(parts)
    full = cdist(queries.astype(np.float64), bank[covered].astype(np.float64))
    want = covered[np.argsort(full, axis=1, kind="stable")[:, :6]]
    np.testing.assert_array_equal(ids, want)
    assert np.all(np.diff(dist, axis=1) >= 0)
    np.testing.assert_allclose(dist, np.take_along_axis(full, np.argsort(full, axis=1)[:, :6], 1), rtol=1e-5)


def test_merge_knn_orders_by_distance_then_id():
    a = (np.array([[0.5, 2.0]], np.float32), np.array([[7, 3]]))
    b = (np.array([[0.5, 1.0, np.inf]], np.float32), np.array([[2, 9, -1]]))
    dist, ids = merge_knn([a, b], 4)
    np.testing.assert_array_equal(dist, [[0.5, 0.5, 1.0, 2.0]])
    np.testing.assert_array_equal(ids, [[2, 7, 9, 3]])
    dist, ids = merge_knn([a, b], 5)
    assert ids[0, -1] == -1 and np.isinf(dist[0, -1])
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        merge_knn([a, b], 6)
    with pytest.raises(ValueError, match="at least one"):
        merge_knn([], 1)


def test_sharded_approximate_kinds_run():
    bank, queries = _points(2000, 16, seed=8), _points(100, 16, seed=9)
    for kind in ("ivf_flat", "hnsw"):
        dist, ids = ShardedIndex(bank, split_shards(len(bank), 2, seed=0), kind=kind).search(queries, 2)
        assert dist.shape == ids.shape == (100, 2) and np.all(ids >= 0)


@pytest.mark.parametrize(
    ("parts", "match"),
    [
        ([], "at least one shard"),
        ([np.array([0, 1]), np.array([], dtype=np.int64)], "shard 1 must be a non-empty"),
        ([np.array([0, 1]), np.array([1, 2])], "shards overlap"),
        ([np.array([0, 10])], r"outside \[0, 10\)"),
        ([np.array([-1, 2])], "outside"),
        ([np.array([0.0, 1.0])], "row indices"),
    ],
)
def test_sharded_index_rejects_bad_shards(parts, match):
    with pytest.raises(ValueError, match=match):
        ShardedIndex(_points(10, 4), parts)


def test_sharded_search_rejects_bad_queries():
    index = ShardedIndex(_points(10, 4), split_shards(10, 2, seed=0))
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        index.search(_points(3, 4), 11)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        index.search(_points(3, 4), 0)
    with pytest.raises(ValueError, match="has 5 dims, the index has 4"):
        index.search(_points(3, 5), 1)
