"""Shared helpers of the benchmarks: the machine a result ran on, patch features of real data, AUROC from
nearest-neighbour distances. Imported by the scripts in ``bench/`` (run them as ``python bench/<name>.py``).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from components.backbone import FeatureExtractor, create_feature_extractor
from components.config import TocoadConfig
from components.datasets import Sample, discover
from components.metrics import image_auroc, pixel_auroc
from components.patch_features import flatten_patches, patch_embedding
from components.pipeline import data_loader
from components.scoring import anomaly_map


def machine() -> dict:
    """CPU model, core count, torch threads and load, so a result names the machine it ran on."""
    model = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in ln
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load": os.getloadavg(),
    }


def copy_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of the best of ``repeats`` numpy copies of a ``gib`` GiB float32 array (bytes copied,
    i.e. one read and one write of each byte), after one warm-up copy."""
    a = np.ones(int(gib * (1 << 28)), dtype=np.float32)
    b = np.empty_like(a)
    best = np.inf
    for _ in range(repeats + 1):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return a.nbytes / best


def frozen_extractor(cfg: TocoadConfig | None = None) -> FeatureExtractor:
    """The pretrained F of the default config (stage 2 off), in eval mode."""
    b = (cfg or TocoadConfig()).backbone
    return create_feature_extractor(b.name, b.weights, b.layers, b.mean, b.std).eval()


def _variant(images: torch.Tensor, v: int) -> torch.Tensor:
    """Augmentation ``v`` of a [0, 1] batch: rotation by v % 4 quarter turns, a flip for (v // 4) odd, and a
    gain from (1, 0.9, 1.1, 0.95, 1.05) by v // 8. Variant 0 is the image itself."""
    x = torch.rot90(images, v % 4, dims=(-2, -1))
    if (v // 4) % 2:
        x = torch.flip(x, dims=(-1,))
    gain = (1.0, 0.9, 1.1, 0.95, 1.05)[(v // 8) % 5]
    return (x * gain).clamp_(0, 1) if gain != 1.0 else x


@torch.inference_mode()
def patch_pool(data: Path, variants: int = 1, cfg: TocoadConfig | None = None) -> tuple[np.ndarray, float]:
    """Patch features ``[variants * images * h * w, C]`` of the training images and ``variants - 1``
    augmentations of each (see :func:`_variant`), with the seconds it took."""
    cfg = cfg or TocoadConfig()
    f = frozen_extractor(cfg)
    loader = data_loader(cfg.with_overrides(["runtime.num_workers=0"]), discover(data).train, 16, False)
    chunks, start = [], time.perf_counter()
    for batch in loader:
        for v in range(variants):
            emb = patch_embedding(
                f(_variant(batch["image"], v)), cfg.bank.aggregation, cfg.bank.feature_dim, cfg.bank.border
            )
            chunks.append(flatten_patches(emb).float().numpy())
    return np.concatenate(chunks), time.perf_counter() - start


def pick_test(samples: list[Sample], n: int | None, seed: int = 0) -> list[Sample]:
    """``n`` test samples with good and defective in their original proportion (all when n is None)."""
    if n is None or n >= len(samples):
        return samples
    rng = np.random.default_rng(seed)
    good = [s for s in samples if s.label == 0]
    bad = [s for s in samples if s.label == 1]
    n_good = max(1, round(n * len(good) / len(samples)))
    keep = [good[i] for i in rng.choice(len(good), n_good, replace=False)]
    keep += [bad[i] for i in rng.choice(len(bad), n - n_good, replace=False)]
    return sorted(keep, key=lambda s: s.path.as_posix())


@torch.inference_mode()
def test_queries(data: Path, n: int | None = None, cfg: TocoadConfig | None = None) -> dict:
    """Patch features of (a proportional subset of) the test split: ``queries`` ``[images, h * w, C]``,
    ``grid``, ``labels`` ``[images]`` and ``masks`` ``[images, H, W]`` (bool)."""
    cfg = cfg or TocoadConfig()
    f = frozen_extractor(cfg)
    test = pick_test(discover(data).test, n)
    loader = data_loader(cfg.with_overrides(["runtime.num_workers=0"]), test, 16, False)
    queries, labels, masks, grid = [], [], [], (0, 0)
    for batch in loader:
        emb = patch_embedding(f(batch["image"]), cfg.bank.aggregation, cfg.bank.feature_dim, cfg.bank.border)
        grid = tuple(emb.shape[-2:])
        queries.append(flatten_patches(emb).float().numpy().reshape(len(emb), -1, emb.shape[1]))
        labels.append(np.asarray(batch["label"]))
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return {
        "queries": np.concatenate(queries),
        "grid": grid,
        "labels": np.concatenate(labels),
        "masks": np.concatenate(masks),
    }


def auroc_from_distances(dist: np.ndarray, test: dict, cfg: TocoadConfig | None = None) -> dict[str, float]:
    """Image AUROC (max patch distance) and pixel AUROC (blurred, upsampled maps) in percent, from each test
    patch's nearest-neighbour distance ``[images * h * w]``."""
    cfg = cfg or TocoadConfig()
    n, (h, w) = len(test["labels"]), test["grid"]
    patch = torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32).reshape(n, h, w))
    maps = anomaly_map(patch, test["masks"].shape[-2:], cfg.bank.blur_sigma).numpy()
    return {
        "image_auroc": 100.0 * image_auroc(test["labels"], patch.view(n, -1).amax(1).numpy()),
        "pixel_auroc": 100.0 * pixel_auroc(test["masks"], maps),
    }
