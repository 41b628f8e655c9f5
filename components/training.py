"""The one training loop both stages share: epochs over a loader, a step function, a progress bar, a history."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from statistics import fmean

from tqdm.auto import tqdm

Step = Callable[[dict], dict[str, float]]


def run_epochs(
    loader: Iterable[dict], epochs: int, step: Step, desc: str, progress: bool = True
) -> list[dict[str, float]]:
    """Run ``step`` on every batch for ``epochs`` epochs; return one dict of mean logs per epoch.

    Each epoch's record also holds ``images_per_s`` and ``loader_wait`` (the share of wall time spent waiting
    for data), so a starving data pipeline shows up in the history.
    """
    history: list[dict[str, float]] = []
    total = epochs * len(loader)  # type: ignore[arg-type]
    with tqdm(total=total, desc=desc, unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            logs: dict[str, list[float]] = {}
            images, waited, start = 0, 0.0, time.perf_counter()
            fetch = time.perf_counter()
            for batch in loader:
                waited += time.perf_counter() - fetch
                out = step(batch)
                images += len(batch["image"])
                for key, value in out.items():
                    logs.setdefault(key, []).append(value)
                bar.set_postfix({k: f"{v:.4f}" for k, v in out.items()}, refresh=False)
                bar.update()
                fetch = time.perf_counter()
            elapsed = max(time.perf_counter() - start, 1e-9)
            record = {k: fmean(v) for k, v in logs.items()}
            record.update(epoch=epoch, images_per_s=images / elapsed, loader_wait=waited / elapsed)
            history.append(record)
    return history


def make_loader(
    samples, image_size: int, batch_size: int, num_workers: int, shuffle: bool, seed: int, **limits
):
    """A DataLoader over ``samples`` that yields ImageDataset dicts; shuffling is seeded."""
    import torch
    from torch.utils.data import DataLoader

    from components.datasets import ImageDataset

    dataset = ImageDataset(samples, image_size, **limits)
    gen = torch.Generator().manual_seed(seed)
    drop_last = shuffle and len(dataset) > batch_size
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        generator=gen,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
