"""A memory bank split over shards: per-shard coresets that merge, and a k-NN search that fans out and merges.

This is the single-process model of a bank that outgrows one node (see ``docs/sharding.md``): each shard
stands for a predictor replica (or one faiss GPU index per device). Nothing here talks to the network; the
shards are searched one after the other where replicas would search in parallel.

* :func:`split_shards`: a seeded, balanced, random partition of the patch indices (optionally in whole
  blocks, e.g. one image's patches).
* :func:`two_level_coreset`: a greedy coreset per shard (each keeping a multiple of its share), then one
  global greedy pass over their union. Covering radius bound: see the function.
* :class:`ShardedIndex`: one faiss index per shard; :meth:`ShardedIndex.search` merges the shards' k best by
  distance (:func:`merge_knn`). With ``flat`` shards it returns what one flat index over the union returns
  (ids up to ties; distances up to float32 rounding, see :class:`ShardedIndex`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import faiss
import numpy as np

from components.coreset import coreset_size, greedy_coreset
from components.nn_index import build_index, search


def _check_count(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_features(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be a non-empty 2-D [N, D] array, got shape {x.shape}")
    return x


def split_shards(num: int, shards: int, seed: int, block: int = 1) -> list[np.ndarray]:
    """A seeded partition of ``range(num)`` into ``shards`` sorted int64 index arrays of near-equal size.

    The indices are cut into consecutive blocks of ``block`` (the last one may be shorter) and the blocks are
    dealt to the shards in a random order (``seed``), ``ceil`` / ``floor`` of ``blocks / shards`` each.
    ``block=1`` is a random partition of the patches; ``block = h * w`` keeps every image's patches on one
    shard, which is what a node gets when it extracts the features of its own images.

    Random rather than contiguous because training images are often ordered (capture time, lighting, batch):
    contiguous shards would then see different parts of the distribution, and a shard that holds an unusual
    slice needs more centres to cover it than its share. A random split makes every shard a sample of the
    whole bank, so equal per-shard coreset budgets give comparable per-shard radii.
    """
    num = _check_count(num, "num")
    shards = _check_count(shards, "shards")
    block = _check_count(block, "block")
    blocks = math.ceil(num / block)
    if shards > blocks:
        raise ValueError(
            f"cannot split {num} points into {shards} shards: only {blocks} block(s) of {block}, "
            "and every shard needs at least one"
        )
    order = np.random.default_rng(seed).permutation(blocks)
    parts = []
    for dealt in np.array_split(order, shards):
        ids = (np.sort(dealt)[:, None] * block + np.arange(block)).ravel()
        parts.append(ids[ids < num].astype(np.int64))
    return parts


def shard_quota(size: int, num: int, k: int, per_shard_factor: float) -> int:
    """Points a shard of ``size`` (out of ``num``) keeps for a global coreset of ``k``:
    ``ceil(per_shard_factor * k * size / num)``, at least 1 and at most ``size``."""
    keep = math.ceil(per_shard_factor * k * size / num - 1e-9)
    return max(1, min(size, keep))


def shard_coreset(
    features: np.ndarray, ids: np.ndarray, keep: int, projection_dim: int | None = None, seed: int = 0
) -> np.ndarray:
    """Global indices (int64, selection order) of a greedy coreset of ``keep`` points of the shard
    ``features[ids]``, as the node holding that shard would compute it."""
    ids = np.asarray(ids, dtype=np.int64)
    local = greedy_coreset(features[ids], n=keep, projection_dim=projection_dim, seed=seed)
    return ids[local]


def merge_coresets(
    features: np.ndarray,
    candidates: Sequence[np.ndarray],
    k: int,
    projection_dim: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Global indices (int64, selection order) of a greedy coreset of ``k`` points of the union of the
    shards' coresets ``candidates`` (global indices, disjoint); the whole union when it has ``<= k``."""
    if not candidates:
        raise ValueError("need at least one shard coreset to merge")
    union = np.concatenate([np.asarray(c, dtype=np.int64) for c in candidates])
    if len(np.unique(union)) != len(union):
        raise ValueError("shard coresets overlap: every point must belong to one shard")
    local = greedy_coreset(features[union], n=k, projection_dim=projection_dim, seed=seed)
    return union[local]


def two_level_coreset(
    features: np.ndarray,
    shards: int,
    n: int | None = None,
    ratio: float | None = None,
    per_shard_factor: float | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    block: int = 1,
) -> np.ndarray:
    """Global indices (int64, selection order) of a two-level greedy coreset of ``features`` ``[N, D]``.

    The ``k`` points to keep come from exactly one of ``n`` or ``ratio`` (as in ``greedy_coreset``). The
    features are split with :func:`split_shards` (``seed``, ``block``); shard ``s`` of ``N_s`` points keeps a
    greedy coreset ``C_s`` of :func:`shard_quota` points (``per_shard_factor`` times its share ``k N_s / N``,
    so the union has at least ``k``; None: ``shards``, i.e. each shard keeps about ``k``), and one global
    greedy pass picks ``k`` points ``G`` out of ``U = U_s C_s``. ``projection_dim`` is the random projection
    used only to pick points (None: exact distances).

    Guarantee (triangle inequality, any metric, with or without projection): a point ``x`` of shard ``s`` is
    within ``r_s`` of some ``c`` in ``C_s`` and ``c`` is within ``R_U`` of ``G``, so
    ``radius(G over all points) <= R_U + max_s r_s``, where ``r_s`` is the covering radius of ``C_s`` over
    shard ``s`` and ``R_U`` that of ``G`` over ``U``. When every shard keeps at least ``k`` points
    (``per_shard_factor >= shards`` with equal shards) and there is no projection, both terms are at most
    twice the optimal ``k``-centre radius of all the points (greedy is a 2-approximation, and a subset needs
    no larger radius), so the result is within 4x the optimum, and so within 4x one-level greedy's radius.
    ``shards=1`` with ``per_shard_factor=1`` is one-level greedy.

    In practice: a shard that keeps fewer points than the data has modes (textures, parts) misses some of
    them, and ``max_s r_s`` dominates. On 40 Gaussian blobs with ``k=80`` and 8 shards, a factor of 2 (20 per
    shard) gave 2.6-2.9x the one-level radius, factors 4 and 8 1.0-1.15x; hence the default.
    """
    x = _check_features(features)
    num = len(x)
    parts = split_shards(num, shards, seed, block)
    factor = float(shards) if per_shard_factor is None else per_shard_factor
    if not factor >= 1.0:
        raise ValueError(f"per_shard_factor must be >= 1 (the union needs k points), got {factor}")
    k = coreset_size(num, n, ratio)
    if k >= num:
        return np.arange(num, dtype=np.int64)
    candidates = [
        shard_coreset(x, ids, shard_quota(len(ids), num, k, factor), projection_dim, seed) for ids in parts
    ]
    return merge_coresets(x, candidates, k, projection_dim, seed)


def merge_knn(results: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of the shards' ``(distances [Q, k_s], global ids [Q, k_s])``, nearest first; equal
    distances go to the lower global id (missing neighbours, id -1 at distance inf, come last).

    This is the router's merge step: per patch, the minimum distance over replicas (for ``k=1``).
    """
    if not results:
        raise ValueError("need at least one shard's search results to merge")
    dist = np.concatenate([np.asarray(d, dtype=np.float32) for d, _ in results], axis=1)
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for _, i in results], axis=1)
    if not 1 <= k <= dist.shape[1]:
        raise ValueError(f"k must be in [1, {dist.shape[1]}] (the neighbours the shards returned), got {k}")
    order = np.lexsort((ids, dist), axis=1)[:, :k]
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(ids, order, axis=1)


class ShardedIndex:
    """One faiss index per shard of ``bank`` ``[M, D]`` plus each shard's global ids (rows of ``bank``).

    ``parts`` are disjoint, non-empty arrays of row indices (they need not cover the bank). Each shard's
    index is ``build_index(bank[ids], kind, use_gpu, threads)``; all GPU indexes land on GPU 0 here (a real
    deployment puts one per device, e.g. faiss ``IndexShards``). :meth:`search` queries the shards in turn
    (replicas would do it in parallel) and keeps the k best with :func:`merge_knn`.

    With ``flat`` shards the result is the exact k-NN over the union, as one flat index gives it. Distances
    are bit-identical when OpenBLAS sums each ``x . y`` in the same order for every bank size (seen here up
    to 64 dims); above that they can differ by float32 rounding of ``|x|^2 + |y|^2 - 2 x . y`` (about 1e-6 on
    unit-scale 128-D data, 1e-3 on 152-D patch features at nearest distances ~10), as they already do
    between one index's calls with different batch sizes.
    """

    def __init__(
        self,
        bank: np.ndarray,
        parts: Sequence[np.ndarray],
        kind: str = "flat",
        use_gpu: bool | None = False,
        threads: int | None = None,
    ) -> None:
        bank = np.ascontiguousarray(_check_features(bank), dtype=np.float32)
        if not parts:
            raise ValueError("need at least one shard")
        self.ids: list[np.ndarray] = []
        for s, part in enumerate(parts):
            ids = np.asarray(part)
            if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"shard {s} must be a non-empty 1-D array of row indices, got {ids!r:.80}")
            if ids.min() < 0 or ids.max() >= len(bank):
                raise ValueError(f"shard {s} has row indices outside [0, {len(bank)})")
            self.ids.append(ids.astype(np.int64))
        every = np.concatenate(self.ids)
        if len(np.unique(every)) != len(every):
            raise ValueError("shards overlap: every bank row must belong to at most one shard")
        self.indexes: list[faiss.Index] = [build_index(bank[ids], kind, use_gpu, threads) for ids in self.ids]

    @property
    def shards(self) -> int:
        return len(self.indexes)

    @property
    def ntotal(self) -> int:
        return sum(index.ntotal for index in self.indexes)

    @property
    def d(self) -> int:
        return self.indexes[0].d

    def search_shard(
        self, shard: int, queries: np.ndarray, k: int = 1, threads: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One shard's ``min(k, shard size)`` nearest: distances and global ids (-1 where none was found)."""
        index = self.indexes[shard]
        dist, local = search(index, queries, min(k, index.ntotal), threads)
        ids = np.where(local >= 0, self.ids[shard][np.maximum(local, 0)], -1)
        return dist, ids

    def search(
        self, queries: np.ndarray, k: int = 1, threads: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances ``[Q, k]`` (float32) and global ids ``[Q, k]`` of the ``k`` nearest over all
        shards, nearest first (as :func:`components.nn_index.search` for one index over the union)."""
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be in [1, {self.ntotal}] (the sharded bank size), got {k}")
        return merge_knn([self.search_shard(s, queries, k, threads) for s in range(self.shards)], k)
