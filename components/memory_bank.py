"""The memory bank: F's patch embeddings of the normal training images, greedily subsampled to a coreset."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from components.backbone import FeatureExtractor
from components.config import BankConfig
from components.coreset import greedy_coreset
from components.patch_features import embed_images, flatten_patches


@torch.inference_mode()
def extract_embeddings(
    extractor: FeatureExtractor,
    loader,
    bank: BankConfig,
    device: torch.device,
    progress: bool = True,
    adaptor: torch.nn.Module | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Patch embeddings ``[N_images * h * w, C]`` (float32) of every image the loader yields, streamed batch-wise.

    When the loader knows its number of images (a DataLoader over a sized dataset), the batches are written
    straight into one array allocated after the first batch, so peak memory is the bank plus one batch.
    """
    total = len(loader.dataset) if hasattr(loader, "dataset") and hasattr(loader.dataset, "__len__") else None
    out: np.ndarray | None = None
    extra: list[np.ndarray] = []  # batches of an unsized loader, or past the size it announced
    grid, written = (0, 0), 0
    for batch in tqdm(loader, desc="features", unit="batch", disable=not progress, dynamic_ncols=True):
        images = batch["image"].to(device)
        emb = embed_images(extractor, images, bank.aggregation, bank.feature_dim, adaptor, bank.border)
        grid = tuple(emb.shape[-2:])
        flat = flatten_patches(emb).float().cpu().numpy()
        if total is not None and out is None:
            out = np.empty((total * grid[0] * grid[1], flat.shape[1]), dtype=np.float32)
        if out is not None and not extra and written + len(flat) <= len(out):
            out[written : written + len(flat)] = flat
            written += len(flat)
        else:
            extra.append(flat)
    parts = ([out[:written]] if written else []) + extra
    if not parts:
        raise ValueError("no training images to build the memory bank from")
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)), grid


def coreset_indices(
    embeddings: np.ndarray,
    bank: BankConfig,
    seed: int,
    progress: bool = True,
    initial: np.ndarray | None = None,
    n: int | None = None,
) -> np.ndarray:
    """Sorted row indices of the greedy coreset of ``embeddings`` (float32 ``[M, C]``): ``bank.coreset_ratio`` of
    the rows (or ``n`` of them), at least one, continuing from the centres ``initial`` when given. With
    ``bank.coreset_method="random"`` the rows beyond ``initial`` are a uniform sample drawn with ``seed``."""
    n = max(1, round(len(embeddings) * bank.coreset_ratio)) if n is None else n
    if n >= len(embeddings):
        return np.arange(len(embeddings))
    if bank.coreset_method == "random":
        keep = np.asarray([] if initial is None else initial, dtype=np.int64)
        rest = np.setdiff1d(np.arange(len(embeddings)), keep)
        drawn = np.random.default_rng(seed).choice(rest, size=max(0, n - len(keep)), replace=False)
        return np.sort(np.concatenate([keep, drawn]))
    idx = greedy_coreset(
        embeddings,
        n=n,
        projection_dim=bank.projection_dim or None,
        seed=seed,
        progress=progress,
        initial=initial,
    )
    return np.sort(idx)
