"""faiss index over the memory bank: exactness, recall of approximate kinds, serialisation, threads."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from components.nn_index import (
    AUTO_FLAT_MAX,
    AUTO_GPU_FLAT_MAX,
    auto_kind,
    build_index,
    faiss_threads,
    index_from_bytes,
    index_to_bytes,
    ivf_params,
    search,
)

APPROXIMATE = ["ivf_flat", "ivf_pq", "hnsw"]


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    """A bank of 40 Gaussian clusters x 50 points in 16-D, and 200 queries near bank points."""
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=10.0, size=(40, 16))
    bank = (np.repeat(centres, 50, axis=0) + rng.normal(size=(2000, 16))).astype(np.float32)
    queries = bank[rng.choice(2000, 200, replace=False)] + rng.normal(scale=0.2, size=(200, 16))
    return bank, queries.astype(np.float32)


@pytest.fixture(scope="module")
def indexes(clustered) -> dict[str, faiss.Index]:
    """One index of each kind over the clustered bank, built once (1 thread: the CPU is shared)."""
    return {kind: build_index(clustered[0], kind, threads=1) for kind in ["flat", *APPROXIMATE]}


def test_flat_is_exact(clustered, indexes):
    bank, queries = clustered
    dist, idx = search(indexes["flat"], queries, k=5)
    exact = cdist(queries, bank)
    order = np.argsort(exact, axis=1)[:, :5]
    np.testing.assert_array_equal(idx, order)
    np.testing.assert_allclose(dist, np.take_along_axis(exact, order, axis=1), rtol=1e-4, atol=1e-4)
    assert dist.dtype == np.float32 and idx.dtype == np.int64 and dist.shape == idx.shape == (200, 5)


@pytest.mark.parametrize("kind", APPROXIMATE)
def test_approximate_kinds_recall(clustered, indexes, kind):
    bank, queries = clustered
    truth = cdist(queries, bank).argmin(1)
    dist, idx = search(indexes[kind], queries, k=1, threads=1)
    assert (idx[:, 0] == truth).mean() >= 0.9
    if kind != "ivf_pq":  # exact distances to whatever was found
        found = np.linalg.norm(queries - bank[idx[:, 0]], axis=1)
        np.testing.assert_allclose(dist[:, 0], found, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["flat", *APPROXIMATE])
def test_serialisation_round_trip(clustered, indexes, kind):
    queries = clustered[1]
    index = indexes[kind]
    data = index_to_bytes(index)
    assert isinstance(data, bytes)
    restored = index_from_bytes(data)
    assert restored.ntotal == index.ntotal and type(restored) is type(index)
    for a, b in zip(
        search(index, queries, k=3, threads=1), search(restored, queries, k=3, threads=1), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_auto_rule(clustered):
    assert isinstance(build_index(clustered[0]), faiss.IndexFlatL2)
    assert auto_kind(AUTO_FLAT_MAX - 1) == "flat"
    assert auto_kind(AUTO_FLAT_MAX) == "hnsw"
    assert auto_kind(AUTO_FLAT_MAX, use_gpu=True) == "flat"
    assert auto_kind(AUTO_GPU_FLAT_MAX - 1, use_gpu=True) == "flat"
    assert auto_kind(AUTO_GPU_FLAT_MAX, use_gpu=True) == "ivf_flat"


def test_ivf_params_are_sane():
    for num in (50, 2000, 200_000, 5_000_000):
        nlist, nprobe = ivf_params(num)
        assert 1 <= nprobe <= nlist and nlist * 39 <= max(num, 39)


def test_self_queries_have_zero_distance(clustered):
    bank = clustered[0].astype(np.float64)  # other dtypes are converted
    dist, idx = search(build_index(bank, "flat"), bank[:20], k=1)
    np.testing.assert_array_equal(idx[:, 0], np.arange(20))
    assert (dist >= 0).all() and dist.max() < 1e-3


def test_argument_errors(clustered):
    bank, queries = clustered
    index = build_index(bank[:10], "flat")
    with pytest.raises(ValueError, match="kind"):
        build_index(bank, "lsh")
    with pytest.raises(ValueError, match="k must be"):
        search(index, queries, k=11)
    with pytest.raises(ValueError, match="dims"):
        search(index, queries[:, :8])
    with pytest.raises(ValueError, match="2-D"):
        build_index(bank[0])
    with pytest.raises(ValueError, match="empty"):
        index_from_bytes(b"")
    with pytest.raises(ValueError, match="HNSW"):
        build_index(bank, "hnsw", use_gpu=True)


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the no-GPU error")
def test_use_gpu_without_gpu_is_an_error(clustered):
    with pytest.raises(RuntimeError, match="no GPU"):
        build_index(clustered[0], "flat", use_gpu=True)
    assert isinstance(build_index(clustered[0], "flat", use_gpu=None), faiss.IndexFlatL2)


def test_faiss_threads_restore_torch_and_faiss(clustered):
    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before
    bank, queries = clustered
    search(build_index(bank, "flat", threads=1), queries, threads=1)
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before


def test_auto_picks_hnsw_for_large_cpu_banks_and_ivf_trains_on_a_sample():
    """Above AUTO_FLAT_MAX the auto index is HNSW; IVF on a bank larger than its training cap trains on a
    seeded sample. Both still find the exact nearest neighbour for nearly every query."""
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=10.0, size=(200, 16))
    bank = (np.repeat(centres, AUTO_FLAT_MAX // 200 + 1, axis=0) + rng.normal(size=(1, 16))).astype(
        np.float32
    )
    bank += rng.normal(size=bank.shape).astype(np.float32)
    queries = bank[rng.choice(len(bank), 300, replace=False)] + 0.1 * rng.normal(size=(300, 16))
    truth = search(build_index(bank, "flat", threads=1), queries, k=1, threads=1)[1][:, 0]
    auto = build_index(bank, threads=1)
    assert isinstance(auto, faiss.IndexHNSWFlat)
    ivf = build_index(bank, "ivf_flat", threads=1)
    assert len(bank) > 64 * ivf_params(len(bank))[0]  # the sampled-training path ran
    for index in (auto, ivf):
        assert (search(index, queries, k=1, threads=1)[1][:, 0] == truth).mean() >= 0.95


@pytest.mark.parametrize("kind", ["hnsw", "ivf_flat"])
def test_refine_farthest_moves_the_worst_queries_towards_exact(clustered, kind):
    """With a starved search effort, re-searching each group's farthest queries never increases a distance,
    never goes below the exact one, and recovers the exact distance for those queries; flat is untouched."""
    from components.nn_index import refine_farthest, search_effort

    bank, queries = clustered
    rng = np.random.default_rng(3)
    queries = np.concatenate([queries, rng.normal(scale=12.0, size=(56, 16))]).astype(np.float32)  # 256 rows
    exact = cdist(queries, bank).min(1)
    index = build_index(bank, kind, threads=1)
    if kind == "hnsw":
        index.hnsw.efSearch = 1
    else:
        index.nprobe = 1
    assert search_effort(index) == 1
    plain = search(index, queries, k=1, threads=1)[0][:, 0]
    refined = refine_farthest(index, queries, plain, group=64, top=16, factor=64)
    assert refined.shape == plain.shape and (refined <= plain).all()
    assert (refined >= exact - 1e-3).all()
    worst = (np.argsort(-plain.reshape(4, 64), axis=1)[:, :16] + 64 * np.arange(4)[:, None]).ravel()
    hit_plain = np.isclose(plain[worst], exact[worst], rtol=1e-3, atol=1e-3).mean()
    hit_refined = np.isclose(refined[worst], exact[worst], rtol=1e-3, atol=1e-3).mean()
    assert hit_refined >= 0.95 and hit_refined > hit_plain  # HNSW may still miss an isolated far query
    assert search_effort(build_index(bank, "flat")) is None
    np.testing.assert_array_equal(refine_farthest(build_index(bank, "flat"), queries, plain, 64), plain)
    with pytest.raises(ValueError, match="groups of 60"):
        refine_farthest(index, queries, plain, group=60)
