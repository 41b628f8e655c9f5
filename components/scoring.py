"""Nearest-neighbour patch distances to anomaly maps and image scores (PatchCore)."""

from __future__ import annotations

import functools

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from components.nn_index import build_index, refine_farthest, search


def gaussian_kernel1d(sigma: float, radius: int) -> torch.Tensor:
    """Normalised Gaussian weights ``[2 * radius + 1]`` (float32)."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


@functools.lru_cache(maxsize=16)
def blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """``[size, size]`` matrix ``M`` with ``x @ M`` = 1-D Gaussian blur of ``x`` along its last axis, kernel
    radius ``round(4 sigma)`` (capped at ``size - 1``), reflect padding folded into the band."""
    radius = min(round(4 * sigma), size - 1)
    if radius == 0:
        return torch.eye(size)
    impulses = F.pad(torch.eye(size).unsqueeze(1), (radius, radius), mode="reflect")  # [size, 1, size + 2r]
    return F.conv1d(impulses, gaussian_kernel1d(sigma, radius).view(1, 1, -1)).squeeze(1)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` maps, kernel size ``2 * round(4 sigma) + 1``, reflect padding.

    Each 1-D pass is a product with a banded blur matrix (:func:`blur_matrix`): a batched GEMM, several times
    faster on CPU than single-channel ``conv2d`` at map sizes up to ~1k pixels, and identical to the padded
    convolution. ``sigma <= 0`` returns the maps unchanged.
    """
    if sigma <= 0:
        return maps
    mh = blur_matrix(maps.shape[-2], float(sigma)).to(maps)
    mw = blur_matrix(maps.shape[-1], float(sigma)).to(maps)
    return mh.T @ maps @ mw


def anomaly_map(patch_scores: torch.Tensor, out_size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Per-pixel anomaly maps ``[B, H, W]``: patch scores ``[B, h, w]`` bilinearly upsampled to ``out_size``
    (align_corners=False), then Gaussian-blurred with ``sigma`` (see :func:`gaussian_blur`)."""
    if patch_scores.ndim != 3:
        raise ValueError(f"patch_scores must be [B, h, w], got shape {tuple(patch_scores.shape)}")
    x = patch_scores if patch_scores.is_floating_point() else patch_scores.float()
    up = F.interpolate(x.unsqueeze(1), size=tuple(out_size), mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma)


def image_score(patch_scores: torch.Tensor) -> torch.Tensor:
    """Image scores ``[B]``: the largest patch score of each ``[h, w]`` map."""
    if patch_scores.ndim != 3:
        raise ValueError(f"patch_scores must be [B, h, w], got shape {tuple(patch_scores.shape)}")
    return patch_scores.flatten(1).amax(dim=1)


def reweighted_image_score(
    max_patch_features: np.ndarray, bank: np.ndarray, index: faiss.Index | None = None, b: int = 3
) -> np.ndarray:
    """PatchCore's density-reweighted image scores ``[B]`` (float64) from each image's most anomalous patch.

    For a test patch ``m`` with nearest bank item ``m*`` at ``s* = |m - m*|`` and ``N_b(m*)`` the ``b``
    nearest bank items of ``m*`` (``m*`` itself included, as the index returns it first):
    ``w = 1 - exp(|m - m*|) / sum_{n in N_b(m*)} exp(|m - n|)`` and the score is ``w * s*``, computed as
    ``1 - exp(s* - logsumexp)``. ``b`` (capped at the bank size) of 1 returns ``s*`` unweighted.
    ``index`` is the bank's faiss index (an exact flat one is built when None).
    """
    queries = np.ascontiguousarray(max_patch_features, dtype=np.float32)
    bank = np.ascontiguousarray(bank, dtype=np.float32)
    if queries.ndim != 2 or bank.ndim != 2 or queries.shape[1] != bank.shape[1]:
        raise ValueError(f"need [B, D] features and an [M, D] bank, got {queries.shape} and {bank.shape}")
    if b < 1:
        raise ValueError(f"b must be >= 1, got {b}")
    index = build_index(bank, "flat") if index is None else index
    s_star, nearest = search(index, queries, k=1)
    s_star = s_star[:, 0].astype(np.float64)
    b = min(b, len(bank))
    if b == 1:
        return s_star
    _, support = search(index, bank[nearest[:, 0]], k=b)
    d = np.linalg.norm(queries[:, None, :].astype(np.float64) - bank[support], axis=-1)  # [B, b]
    d[support < 0] = -np.inf  # neighbours an approximate index did not find drop out of the sum
    top = d.max(axis=1)
    lse = top + np.log(np.exp(d - top[:, None]).sum(axis=1))
    return (1.0 - np.exp(s_star - lse)) * s_star


def patch_distances(index: faiss.Index, queries: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Nearest-bank distances ``[B, h, w]`` (float32) of the patches ``queries`` ``[B * h * w, C]``, each image's
    farthest patches refined on approximate indexes (:func:`components.nn_index.refine_farthest`)."""
    h, w = grid
    dist, _ = search(index, queries, k=1)
    nearest = refine_farthest(index, queries, dist[:, 0], h * w)  # no-op for exact indexes
    return nearest.reshape(-1, h, w).astype(np.float32)


def image_scores(
    patch: np.ndarray, queries: np.ndarray, bank: np.ndarray, index: faiss.Index, reweight: bool
) -> np.ndarray:
    """Image scores ``[B]`` (float64) from patch distances ``[B, h, w]``: the largest, or PatchCore's
    density-reweighted score of the farthest patch when ``reweight``."""
    b = len(patch)
    flat = patch.reshape(b, -1)
    if not reweight:
        return flat.max(axis=1).astype(np.float64)
    worst = queries.reshape(b, flat.shape[1], -1)[np.arange(b), flat.argmax(axis=1)]
    return np.asarray(reweighted_image_score(worst, bank, index), dtype=np.float64)
