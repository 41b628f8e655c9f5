"""faiss nearest-neighbour index over the memory bank: build, search (Euclidean distances), serialise.

Kinds: ``flat`` (exact, IndexFlatL2), ``ivf_flat`` (inverted lists, exact distances within probed lists),
``ivf_pq`` (inverted lists + product quantisation: compressed, approximate distances) and ``hnsw``
(IndexHNSWFlat graph, CPU only).

``auto`` picks by bank size, from the scale curve in ``bench/RESULTS.md`` (``bench/scale.py``: real patch
features, 10k to 4M patches, 1,024 queries per image, 2 CPU cores):

* CPU: ``flat`` below ``AUTO_FLAT_MAX`` (20k) patches, where exact search costs at most a few tens of ms per
  image and needs no build (PatchCore's coreset banks almost always fall here); ``hnsw`` from there on. HNSW
  (efSearch 64) answered a 40k bank 3.6-4.4x faster than flat and a 4M bank in 1.2x flat-40k's time; IVF's
  per-list scans were slower than HNSW at every size, and IVF-PQ's approximate distances cost recall (it
  stays available by name when memory is the limit: ~12x smaller).
* GPU: ``flat`` up to ``AUTO_GPU_FLAT_MAX`` (4M) patches, where brute force on the device is cheap, then
  ``ivf_flat`` (faiss has no GPU HNSW). Not measured here (no GPU on this machine).

Approximate search misses most often for the queries farthest from the bank, which are exactly the patches
that set an image's score: on tire, plain HNSW at 1M patches lost 23 points of image AUROC at recall@1 0.996.
:func:`refine_farthest` (used by ``AnomalyModel.predict``) searches each image's farthest patches again with
8x the effort; with it the loss was 0.00 image / 0.01 pixel points, for 14 % more query time.

Threads: faiss uses OpenMP. When torch is imported before faiss (as in this project) both share one OpenMP
runtime, so ``faiss.omp_set_num_threads`` also changes torch's thread count; use :func:`faiss_threads`
(or the ``threads`` argument), which restores both afterwards. Nothing here changes threads by default.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import faiss
import numpy as np
import torch

KINDS = ("auto", "flat", "ivf_flat", "ivf_pq", "hnsw")
AUTO_FLAT_MAX = 20_000
AUTO_GPU_FLAT_MAX = 4_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
IVF_NPROBE = 16
IVF_TRAIN_PER_LIST = 64  # k-means of the coarse quantiser sees at most this many points per list
_MIN_POINTS_PER_CENTROID = 39  # faiss warns when k-means gets fewer training points than this per centroid
_PQ_POINTS_PER_CENTROID = 8  # enough for PQ's low-dimensional sub-spaces; 8 bits from 2048 vectors


@contextlib.contextmanager
def faiss_threads(n: int | None) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads inside the block (None: leave as is); restores faiss and torch."""
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    prev_faiss, prev_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(prev_faiss)
        if torch.get_num_threads() != prev_torch:
            torch.set_num_threads(prev_torch)


def _as_matrix(x: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """A C-contiguous float32 ``[N, D]`` copy-if-needed of ``x``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, D] array, got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} dims, the index has {dim}")
    return x


def auto_kind(num: int, use_gpu: bool = False) -> str:
    """The kind ``auto`` picks for ``num`` vectors (see the module doc): CPU flat below AUTO_FLAT_MAX, else
    hnsw; GPU flat below AUTO_GPU_FLAT_MAX, else ivf_flat."""
    if use_gpu:
        return "flat" if num < AUTO_GPU_FLAT_MAX else "ivf_flat"
    return "flat" if num < AUTO_FLAT_MAX else "hnsw"


def ivf_params(num: int) -> tuple[int, int]:
    """(nlist, nprobe): about sqrt(M) lists (each trained on >= 39 points), of which IVF_NPROBE are probed."""
    nlist = max(1, min(round(math.sqrt(num)), num // _MIN_POINTS_PER_CENTROID))
    return nlist, min(nlist, IVF_NPROBE)


def pq_params(num: int, dim: int) -> tuple[int, int]:
    """(m, nbits): m <= 64 sub-quantisers of the fewest dims (>= 2) dividing D; 8 bits, fewer when the bank
    has under ``_PQ_POINTS_PER_CENTROID`` points per centroid to train them."""
    sub = next((s for s in range(2, dim + 1) if dim % s == 0 and dim // s <= 64), dim)
    nbits = max(1, min(8, int(math.log2(max(2, num // _PQ_POINTS_PER_CENTROID)))))
    return dim // sub, nbits


def _want_gpu(kind: str, use_gpu: bool | None) -> bool:
    available = faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")
    if use_gpu is None:
        return available and kind != "hnsw"
    if use_gpu and kind == "hnsw":
        raise ValueError("faiss has no GPU HNSW index; use kind='flat' or 'ivf_flat' on GPU")
    if use_gpu and not available:
        raise RuntimeError("use_gpu=True but faiss sees no GPU (faiss-cpu installed, or no CUDA device)")
    return use_gpu


def _cpu_index(bank: np.ndarray, kind: str) -> faiss.Index:
    num, dim = bank.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        nlist, nprobe = ivf_params(num)
        quantizer = faiss.IndexFlatL2(dim)
        if kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L2)
        else:
            m, nbits = pq_params(num, dim)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, nbits)
            index.pq.cp.min_points_per_centroid = _PQ_POINTS_PER_CENTROID  # no under-training warning
        index.train(_training_sample(bank, nlist))
        index.nprobe = nprobe
        index.referenced_objects = [quantizer]  # keep the quantizer alive with the index
    index.add(bank)
    return index


def _training_sample(bank: np.ndarray, nlist: int) -> np.ndarray:
    """At most IVF_TRAIN_PER_LIST points per list, drawn with a fixed seed (k-means cost grows with points)."""
    cap = IVF_TRAIN_PER_LIST * nlist
    if len(bank) <= cap:
        return bank
    rows = np.sort(np.random.default_rng(0).choice(len(bank), cap, replace=False))
    return bank[rows]


def build_index(
    bank: np.ndarray, kind: str = "auto", use_gpu: bool | None = None, threads: int | None = None
) -> faiss.Index:
    """A faiss L2 index holding ``bank`` ``[M, D]`` (float32); see the module doc for kinds and ``auto``.

    ``use_gpu`` None moves the index to GPU 0 when faiss has a GPU and the kind supports it (not hnsw);
    True requires a GPU; False keeps it on the CPU.
    """
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, got {kind!r}")
    bank = _as_matrix(bank, "bank")
    if kind == "auto":
        kind = auto_kind(len(bank), _want_gpu("flat", use_gpu))
    gpu = _want_gpu(kind, use_gpu)
    with faiss_threads(threads):
        index = _cpu_index(bank, kind)
    return _to_gpu(index) if gpu else index


def _to_gpu(index: faiss.Index) -> faiss.Index:
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    gpu_index.referenced_objects = [res]  # the resources must outlive the index
    return gpu_index


def is_gpu_index(index: faiss.Index) -> bool:
    """True for faiss GPU indexes (always False with faiss-cpu)."""
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def search(
    index: faiss.Index, queries: np.ndarray, k: int = 1, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances ``[Q, k]`` (float32, not squared) and bank indices ``[Q, k]`` (int64) of the
    ``k`` nearest bank vectors, nearest first. Neighbours an approximate index could not find have index -1
    and distance inf."""
    if not 1 <= k <= index.ntotal:
        raise ValueError(f"k must be in [1, {index.ntotal}] (the bank size), got {k}")
    queries = _as_matrix(queries, "queries", index.d)
    with faiss_threads(threads):
        sq, idx = index.search(queries, k)
    dist = np.sqrt(np.maximum(sq, 0.0), dtype=np.float32) if index.metric_type == faiss.METRIC_L2 else sq
    dist[idx < 0] = np.inf
    return dist, idx


REFINE_TOP = 16  # queries per image searched again
REFINE_FACTOR = 8  # with this many times the default search effort


def search_effort(index: faiss.Index) -> int | None:
    """The default search effort of an approximate index (HNSW efSearch, IVF nprobe); None for exact ones."""
    if isinstance(index, faiss.IndexHNSW):
        return int(index.hnsw.efSearch)
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else int(ivf.nprobe)


def refine_farthest(
    index: faiss.Index,
    queries: np.ndarray,
    dist: np.ndarray,
    group: int,
    top: int = REFINE_TOP,
    factor: int = REFINE_FACTOR,
) -> np.ndarray:
    """Nearest distances ``[Q]`` with the ``top`` farthest queries of every ``group`` consecutive rows (one
    image's patches) searched again with ``factor`` x the index's search effort; the smaller distance wins.

    An approximate index misses the true neighbour most often for the queries farthest from the bank, and an
    image's score is its farthest patch: a miss there inflates a normal image's score. Approximate distances
    are never below the true ones, so taking the minimum only moves them towards the exact values. Exact
    indexes are returned unchanged. Thread-safe: the effort is passed per call, the index is not modified.
    """
    effort = None if is_gpu_index(index) else search_effort(index)  # GPU indexes: not refined
    if effort is None or top <= 0:
        return dist
    if len(dist) % group:
        raise ValueError(f"{len(dist)} distances do not split into groups of {group}")
    top = min(top, group)
    per_group = dist.reshape(-1, group)
    worst = np.argpartition(-per_group, top - 1, axis=1)[:, :top] + group * np.arange(len(per_group))[:, None]
    rows = worst.ravel()
    if isinstance(index, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW(efSearch=effort * factor)
    else:
        params = faiss.SearchParametersIVF(nprobe=min(effort * factor, faiss.extract_index_ivf(index).nlist))
    sq, idx = index.search(_as_matrix(queries[rows], "queries", index.d), 1, params=params)
    again = np.where(idx[:, 0] >= 0, np.sqrt(np.maximum(sq[:, 0], 0.0)), np.inf).astype(np.float32)
    out = dist.copy()
    out[rows] = np.minimum(out[rows], again)
    return out


def index_to_bytes(index: faiss.Index) -> bytes:
    """The faiss serialisation of ``index`` (GPU indexes are copied to CPU first); no pickle involved."""
    if is_gpu_index(index):
        index = faiss.index_gpu_to_cpu(index)
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(data: bytes, use_gpu: bool = False) -> faiss.Index:
    """The index :func:`index_to_bytes` wrote, on the CPU unless ``use_gpu`` (which needs a faiss GPU)."""
    if not data:
        raise ValueError("empty index data")
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8).copy())
    if use_gpu:
        _want_gpu("flat", True)
        if isinstance(index, faiss.IndexHNSW):
            raise ValueError("faiss has no GPU HNSW index")
        return _to_gpu(index)
    return index
