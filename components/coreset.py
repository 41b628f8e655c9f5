"""Greedy k-centre coreset subsampling of a patch-feature bank, as in PatchCore.

The fast path is memory-bandwidth bound: the (optionally randomly projected) bank is centred and stored
feature-major, ``[p + 1, N]``, with a row of ones appended, so that one matrix-vector product per step gives
every point's squared distance to the newest centre,
``|x - c|^2 = |x|^2 - 2 [x, 1] . [c, -|c|^2 / 2]``, with ``|x|^2`` added in the same BLAS call (``addmv``).
Each step streams the bank once, updates the running minimum distances in place and takes their argmax.
Half-precision storage (``float16`` / ``bfloat16``) halves the memory and the bytes streamed; blocks are
widened to float32 in a cache-sized buffer, so accumulation is float32 and the distances are exact for the
rounded points. On CPUs without native half arithmetic (AVX2) the widening costs more than the bytes it saves,
so float32 storage is the default; see ``bench/coreset_speed.py``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.spatial.distance import cdist
from tqdm.auto import tqdm

Features = torch.Tensor | np.ndarray

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_BUFFER_BYTES = 1 << 21  # float32 conversion buffer for half-precision storage (L2/L3-resident)
_CHUNK_ROWS = 1 << 16  # rows per chunk when projecting / preparing the bank


def _as_tensor(features: Features) -> torch.Tensor:
    """A CPU tensor view of ``features`` ``[N, D]`` (no copy for contiguous CPU input)."""
    if isinstance(features, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(features))
    elif isinstance(features, torch.Tensor):
        t = features.detach().cpu()
    else:
        raise TypeError(f"features must be a torch.Tensor or np.ndarray, not {type(features).__name__}")
    if t.ndim != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"features must be non-empty, got shape {tuple(t.shape)}")
    return t


def _storage_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"storage dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"storage dtype must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def coreset_size(num: int, n: int | None = None, ratio: float | None = None) -> int:
    """The number of points to keep out of ``num``: exactly one of ``n`` (>= 1) or ``ratio`` (in (0, 1])."""
    if (n is None) == (ratio is None):
        raise ValueError("pass exactly one of n (a count) or ratio (a share of the points)")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return int(n)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")
    return max(1, math.floor(num * ratio + 1e-9))


def random_projection(features: Features, dim: int | None, seed: int = 0) -> torch.Tensor:
    """Johnson-Lindenstrauss projection ``[N, dim]`` float32 with a seeded Gaussian matrix (std 1/sqrt(dim)).

    ``dim`` None or 0, or not smaller than D, returns the features as float32 unprojected.
    """
    x = _as_tensor(features)
    num, d = x.shape
    if not dim or dim >= d:
        return x.float()
    if dim < 0:
        raise ValueError(f"projection_dim must be >= 0, got {dim}")
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, dim, generator=gen) / math.sqrt(dim)
    out = torch.empty(num, dim)
    for s in range(0, num, _CHUNK_ROWS):
        torch.matmul(x[s : s + _CHUNK_ROWS].float(), proj, out=out[s : s + _CHUNK_ROWS])
    return out


def _prepare(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred feature-major storage ``[p + 1, N]`` (last row ones) and float32 squared norms ``[N]``.

    The norms are those of the stored (rounded) points, so distances are consistent with the storage.
    """
    num, p = x.shape
    mean = x.double().mean(0).float() if num <= _CHUNK_ROWS else _chunked_mean(x)
    bank = torch.empty(p + 1, num, dtype=dtype)
    bank[p] = 1.0
    sqn = torch.empty(num)
    for s in range(0, num, _CHUNK_ROWS):
        e = min(s + _CHUNK_ROWS, num)
        bank[:p, s:e] = (x[s:e].float() - mean).T
        stored = bank[:p, s:e].double()  # float64: identical points get bit-identical norms
        sqn[s:e] = (stored * stored).sum(0)
    return bank, sqn


def _chunked_mean(x: torch.Tensor) -> torch.Tensor:
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    for s in range(0, x.shape[0], _CHUNK_ROWS):
        total += x[s : s + _CHUNK_ROWS].double().sum(0)
    return (total / x.shape[0]).float()


class _Distances:
    """Squared distances from every stored point to one centre, written into a reused float32 vector."""

    def __init__(self, bank: torch.Tensor, sqn: torch.Tensor) -> None:
        self.bank, self.sqn = bank, sqn
        self.out = torch.empty_like(sqn)
        self.centre = torch.empty(bank.shape[0])
        self.half = bank.dtype != torch.float32
        if self.half:
            self.block = max(64, _BUFFER_BYTES // (4 * bank.shape[0]))
            self.buffer = torch.empty(bank.shape[0], self.block)

    def __call__(self, idx: int) -> torch.Tensor:
        self.centre.copy_(self.bank[:, idx])
        self.centre[-1] = -0.5 * self.sqn[idx]
        if not self.half:
            return torch.addmv(self.sqn, self.bank.T, self.centre, alpha=-2.0, out=self.out)
        num = self.sqn.shape[0]
        for s in range(0, num, self.block):
            e = min(s + self.block, num)
            buf = self.buffer[:, : e - s]
            buf.copy_(self.bank[:, s:e])
            torch.addmv(self.sqn[s:e], buf.T, self.centre, alpha=-2.0, out=self.out[s:e])
        return self.out


def greedy_coreset(
    features: Features,
    n: int | None = None,
    ratio: float | None = None,
    projection_dim: int | None = None,
    seed: int = 0,
    start: int | None = None,
    progress: bool = False,
    storage_dtype: torch.dtype | str = torch.float32,
    initial: np.ndarray | None = None,
) -> np.ndarray:
    """Indices (int64, in selection order) of a greedy k-centre coreset of ``features`` ``[N, D]``.

    Give exactly one of ``n`` or ``ratio`` (kept count ``floor(N * ratio)``, at least 1). The features are
    first randomly projected to ``projection_dim`` dims (None/0, or >= D: no projection). The first centre
    is ``start`` (default: drawn with ``seed``); each next one is the point farthest from those chosen, the
    lowest index winning ties. Once every remaining point is within float32 rounding of a centre (exact
    duplicates), the lowest unchosen index is taken. ``n >= N`` returns ``arange(N)`` without selection.

    ``initial`` (distinct indices, at most the kept count) are centres chosen already, e.g. the part of a
    coreset that survives when some images leave the bank: they come first in the output and the greedy
    continues from them (``start`` is then unused). Continuing from a greedy run's first ``m`` centres gives
    exactly that run's remaining ones.
    """
    x = _as_tensor(features)
    num = x.shape[0]
    k = coreset_size(num, n, ratio)
    if start is not None and not 0 <= start < num:
        raise ValueError(f"start must be in [0, {num}), got {start}")
    if k >= num:
        return np.arange(num, dtype=np.int64)
    first = None if initial is None else np.asarray(initial, dtype=np.int64).ravel()
    if first is not None and first.size:
        if first.min() < 0 or first.max() >= num or np.unique(first).size != first.size or first.size > k:
            raise ValueError(f"initial must hold at most {k} distinct indices in [0, {num})")
        if first.size == k:
            return first
    else:
        first = np.array([int(np.random.default_rng(seed).integers(num)) if start is None else start])
    projected = random_projection(x, projection_dim, seed)
    bank, sqn = _prepare(projected, _storage_dtype(storage_dtype))
    dist = _Distances(bank, sqn)
    mins = dist(int(first[0])).clone() if first.size == 1 else _nearest_sq(projected, first)
    return _greedy(dist, sqn, k, first, mins, progress)


def _nearest_sq(x: torch.Tensor, centres: np.ndarray) -> torch.Tensor:
    """Squared distance ``[N]`` (float32) from every point of ``x`` to its nearest point among rows ``centres``."""
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(np.ascontiguousarray(x[torch.from_numpy(centres)].float().numpy()))
    out = torch.empty(x.shape[0])
    for s in range(0, x.shape[0], _CHUNK_ROWS):
        sq, _ = index.search(np.ascontiguousarray(x[s : s + _CHUNK_ROWS].float().numpy()), 1)
        out[s : s + len(sq)] = torch.from_numpy(sq[:, 0])
    return out.clamp_(min=0)


def _greedy(
    dist: _Distances, sqn: torch.Tensor, k: int, first: np.ndarray, mins: torch.Tensor, progress: bool
) -> np.ndarray:
    """Continue the greedy from the centres ``first``; ``mins`` holds every point's squared distance to them."""
    # distances below this are float32 rounding noise of |x|^2 - 2 x.c + |c|^2
    tol = 8.0 * math.sqrt(dist.bank.shape[0]) * torch.finfo(torch.float32).eps * float(sqn.max())
    selected = np.empty(k, dtype=np.int64)
    selected[: first.size] = first
    mins[torch.from_numpy(first)] = -math.inf
    with tqdm(total=k, desc="coreset", unit="pt", disable=not progress, dynamic_ncols=True) as bar:
        bar.update(first.size)
        for i in range(first.size, k):
            idx = int(torch.argmax(mins))
            if float(mins[idx]) <= tol:  # only duplicates of centres are left: take them in index order
                idx = int(torch.argmax(torch.isfinite(mins).to(torch.uint8)))
            selected[i] = idx
            torch.minimum(mins, dist(idx), out=mins)
            mins[idx] = -math.inf
            bar.update(1)
    return selected


def greedy_coreset_reference(features: Features, n: int, start: int = 0) -> np.ndarray:
    """Brute-force greedy k-centre on the full float64 distance matrix (small inputs only; no projection)."""
    x = _as_tensor(features).double().numpy()
    num = x.shape[0]
    k = coreset_size(num, n, None)
    if k >= num:
        return np.arange(num, dtype=np.int64)
    dmat = cdist(x, x)  # float64, from coordinate differences
    mins = dmat[start].copy()
    selected = [start]
    for _ in range(1, k):
        mins[selected] = -np.inf
        idx = int(np.argmax(mins))
        selected.append(idx)
        mins = np.minimum(mins, dmat[idx])
    return np.asarray(selected, dtype=np.int64)


def covering_radius(features: Features, selected_indices: np.ndarray, chunk_elems: int = 1 << 22) -> float:
    """Exact covering radius: the largest distance from any point to its nearest selected point (float64)."""
    x = _as_tensor(features)
    sel = np.asarray(selected_indices, dtype=np.int64)
    if sel.ndim != 1 or sel.size == 0:
        raise ValueError("selected_indices must be a non-empty 1-D array of indices")
    centres = x[torch.from_numpy(sel)].double()
    csq = (centres * centres).sum(1)
    rows = max(1, chunk_elems // len(sel))
    worst = 0.0
    for s in range(0, x.shape[0], rows):
        pts = x[s : s + rows].double()
        d2 = (pts * pts).sum(1, keepdim=True) - 2.0 * pts @ centres.T + csq
        worst = max(worst, float(d2.amin(1).clamp_min(0).max()))
    return math.sqrt(worst)
