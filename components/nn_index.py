"""faiss nearest-neighbour index over the memory bank: build, search (Euclidean distances), serialise.

Kinds: ``flat`` (exact, IndexFlatL2), ``ivf_flat`` (inverted lists, exact distances within probed lists),
``ivf_pq`` (inverted lists + product quantisation: compressed, approximate distances) and ``hnsw``
(IndexHNSWFlat graph, CPU only). ``auto`` picks ``flat`` below ``AUTO_FLAT_MAX`` (1M) vectors, where exact
search is affordable and PatchCore's coreset banks almost always fall; above it ``ivf_flat`` when the index
goes to a GPU and ``hnsw`` on CPU (no training, high recall).

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
AUTO_FLAT_MAX = 1_000_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 64
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
    """The kind ``auto`` picks for ``num`` vectors: flat below AUTO_FLAT_MAX, else ivf_flat (GPU) / hnsw."""
    if num < AUTO_FLAT_MAX:
        return "flat"
    return "ivf_flat" if use_gpu else "hnsw"


def ivf_params(num: int) -> tuple[int, int]:
    """(nlist, nprobe): about 4 sqrt(M) lists, each trained on >= 39 points; probe 1/8 of them (>= 8)."""
    nlist = max(1, min(round(4 * math.sqrt(num)), num // _MIN_POINTS_PER_CENTROID))
    return nlist, min(nlist, max(8, nlist // 8))


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
        index.train(bank)
        index.nprobe = nprobe
        index.referenced_objects = [quantizer]  # keep the quantizer alive with the index
    index.add(bank)
    return index


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
