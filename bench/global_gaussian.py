"""Image AUROC of a whole-image score: a Gaussian on F's globally pooled features (Rippel et al., 2020).

    PYTHONPATH=. python bench/global_gaussian.py ../shared/data/mvtec_3d_rgb/tire

A check of whether the image score could gain from a global view of the part (issue 11: tire's image AUROC): for
each of Lite0's feature levels 1-4 (strides 4-32), a Ledoit-Wolf Gaussian on the training images' average- and
max-pooled features, and the Mahalanobis distance of each test image; ``sum avg`` adds the four average-pooled
levels, each divided by its training images' median distance. Test labels are read only to compute AUROC.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

from components.backbone import create_feature_extractor
from components.config import TocoadConfig
from components.datasets import discover
from components.metrics import image_auroc
from components.pipeline import data_loader, training_split

LEVELS = (1, 2, 3, 4)


def pooled(extractor, cfg: TocoadConfig, samples) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per level, average- and max-pooled features ``[N, C]`` of ``samples``, and their labels."""
    parts: dict[str, list[torch.Tensor]] = {}
    labels: list[int] = []
    with torch.no_grad():
        for batch in data_loader(cfg, samples, 16, shuffle=False):
            for level, x in zip(LEVELS, extractor(batch["image"]), strict=True):
                parts.setdefault(f"avg{level}", []).append(x.mean((2, 3)))
                parts.setdefault(f"max{level}", []).append(x.amax((2, 3)))
            labels.extend(int(v) for v in batch["label"])
    return {k: torch.cat(v).numpy() for k, v in parts.items()}, np.asarray(labels)


def main() -> None:
    root = sys.argv[1]
    cfg = TocoadConfig().with_overrides(["runtime.progress=false", "runtime.num_workers=0"])
    data = discover(root, cfg.data.layout)
    train, _ = training_split(cfg, data)
    extractor = create_feature_extractor(cfg.backbone.name, cfg.backbone.weights, LEVELS)
    train_f, _ = pooled(extractor, cfg, train)
    test_f, labels = pooled(extractor, cfg, data.test)
    total = np.zeros(len(labels))
    for name in train_f:
        gauss = LedoitWolf().fit(train_f[name])
        scores = gauss.mahalanobis(test_f[name])
        if name.startswith("avg"):
            total += scores / np.median(gauss.mahalanobis(train_f[name]))
        print(f"{name:8s} image AUROC {100 * image_auroc(labels, scores):.2f}")
    print(f"sum avg  image AUROC {100 * image_auroc(labels, total):.2f}")


if __name__ == "__main__":
    main()
