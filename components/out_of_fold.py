"""Honest normal scores for calibration: every training image scored against a bank that does not hold it.

The training images are split into ``folds`` groups (seeded). For each group, the deployed coreset loses the centres
that came from the group's images and the greedy refills it to the same size from the other groups' patches; the
group's images are then scored against that bank. Each training image thus gives the score a new good part would
get from a bank like the deployed one, and the threshold is estimated from all of them instead of from a small
holdout that the bank must do without.

Why refill to the deployed size: nearest-neighbour distances to a coreset depend on how many centres it has and how
they were chosen. On screw (``bench/fold_banks.py``, bench/RESULTS.md section 8) the good test images' median score
against the deployed bank was 25.39; the training images' median out-of-fold score was 26.08 with a fresh coreset of
the other folds at the bank's *ratio* (80 % of the centres), 27.60 with the union of per-fold coresets, 25.29 with a
fresh coreset at the deployed *count* and 25.64 with the refill. Why refill instead of a fresh coreset per fold: the
surviving centres already cover the other folds, so only about ``1 / folds`` of the centres are chosen again; in the
same (loaded) run 5 fresh coresets at the deployed count took 486 s, the refills 115 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from components.config import BankConfig
from components.memory_bank import coreset_indices
from components.nn_index import build_index
from components.scoring import image_scores, patch_distances


@dataclass
class FoldScores:
    """Out-of-fold image scores ``[N]`` and patch distances ``[N, h, w]``, and each image's fold ``[N]``."""

    scores: np.ndarray
    patch: np.ndarray
    fold: np.ndarray
    extra_patch: np.ndarray | None = (
        None  # patch distances of the ``extra`` queries, each against its fold's bank
    )


def assign_folds(n_images: int, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each image: a seeded shuffle dealt round-robin, so fold sizes differ by <= 1."""
    if n_images < 2:
        raise ValueError(
            f"out-of-fold calibration needs at least 2 training images, got {n_images}; add normal images"
        )
    folds = min(folds, n_images)
    out = np.empty(n_images, dtype=np.int64)
    out[np.random.default_rng(seed).permutation(n_images)] = np.arange(n_images) % folds
    return out


def out_of_fold_scores(
    embeddings: np.ndarray,
    grid: tuple[int, int],
    bank: BankConfig,
    folds: int,
    seed: int,
    bank_rows: np.ndarray,
    progress: bool = True,
    extra: np.ndarray | None = None,
    extra_source: np.ndarray | None = None,
) -> FoldScores:
    """Score every image of ``embeddings`` ``[N * h * w, C]`` (images in order, ``grid`` = (h, w) patches each)
    against the deployed coreset (rows ``bank_rows``) refilled without the image's fold (module doc).

    ``extra`` ``[M * h * w, C]`` are further images made from training images (e.g. synthetic anomalies), image
    ``j`` from training image ``extra_source[j]``; each is scored against the bank of its source's fold.
    """
    per_image = grid[0] * grid[1]
    if len(embeddings) % per_image:
        raise ValueError(f"{len(embeddings)} patch embeddings do not split into images of {grid} patches")
    n = len(embeddings) // per_image
    fold = assign_folds(n, folds, seed)
    rows_fold = np.repeat(fold, per_image)
    patch = np.empty((n, *grid), dtype=np.float32)
    scores = np.empty(n, dtype=np.float64)
    bank_rows = np.asarray(bank_rows, dtype=np.int64)
    extra_patch, extra_fold = None, None
    if extra is not None:
        extra_fold = fold[np.asarray(extra_source, dtype=np.int64)]
        extra_patch = np.empty((len(extra_fold), *grid), dtype=np.float32)
        extra_rows = np.repeat(extra_fold, per_image)
    for f in tqdm(
        range(int(fold.max()) + 1), desc="calibration folds", disable=not progress, dynamic_ncols=True
    ):
        others = np.flatnonzero(rows_fold != f)
        kept = np.searchsorted(others, bank_rows[rows_fold[bank_rows] != f])  # surviving centres, renumbered
        rows = coreset_indices(embeddings[others], bank, seed, progress=False, initial=kept, n=len(bank_rows))
        fold_bank = np.ascontiguousarray(embeddings[others[rows]])
        index = build_index(fold_bank, kind=bank.index)
        queries = np.ascontiguousarray(embeddings[rows_fold == f])
        dist = patch_distances(index, queries, grid)
        patch[fold == f] = dist
        scores[fold == f] = image_scores(dist, queries, fold_bank, index, bank.reweight)
        if extra_patch is not None and (extra_fold == f).any():
            extra_patch[extra_fold == f] = patch_distances(
                index, np.ascontiguousarray(extra[extra_rows == f]), grid
            )
    return FoldScores(scores, patch, fold, extra_patch)
