"""Compare image-score rules on saved patch maps (``bench/patch_maps.py``), paired by coreset seed.

    python bench/score_rules.py runs/patch_maps --sets tire,screw,bottle,capsules

For each set, border rule and coreset ratio, every rule's image AUROC per coreset seed, its mean, and the paired
delta against ``max`` (PatchCore's rule: the largest patch distance). Test labels are read only to compute AUROC.
Also prints, for defective test images, the share whose ground-truth mask reaches the outer 8 pixels, to tell
whether the edge patches (``ring1``) can see the defects themselves.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from components.metrics import image_auroc
from components.scoring import gaussian_blur


def top_mean(maps: np.ndarray, k: int) -> np.ndarray:
    flat = np.sort(maps.reshape(len(maps), -1), axis=1)
    return flat[:, -k:].mean(axis=1)


def blurred_max(maps: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian_blur(torch.from_numpy(maps), sigma).flatten(1).amax(1).numpy()


def inner_max(maps: np.ndarray, ring: int) -> np.ndarray:
    return maps[:, ring:-ring, ring:-ring].reshape(len(maps), -1).max(axis=1)


def ring_max(maps: np.ndarray, ring: int) -> np.ndarray:
    """Largest distance among the patches within ``ring`` of the map's edge (a diagnostic, not a rule)."""
    edge = np.ones(maps.shape[1:], bool)
    edge[ring:-ring, ring:-ring] = False
    return maps[:, edge].max(axis=1)


RULES = {
    "max": lambda m: m.reshape(len(m), -1).max(axis=1),
    "top3": lambda m: top_mean(m, 3),
    "top10": lambda m: top_mean(m, 10),
    "blur0.5": lambda m: blurred_max(m, 0.5),
    "blur1": lambda m: blurred_max(m, 1.0),
    "blur2": lambda m: blurred_max(m, 2.0),
    "inner1": lambda m: inner_max(m, 1),
    "ring1": lambda m: ring_max(m, 1),  # diagnostic: the edge patches alone
    "mean": lambda m: m.reshape(len(m), -1).mean(axis=1),  # diagnostic: the whole image at once
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--sets", default="bottle,tire,screw,capsules")
    args = p.parse_args()
    groups: dict[tuple[str, str, str], dict[int, Path]] = defaultdict(dict)
    for f in sorted(args.folder.glob("*.npz")):
        m = re.fullmatch(r"(.+)_(valid|zeros)_([0-9.]+)_(\d+)\.npz", f.name)
        if m and m.group(1) in args.sets.split(","):
            groups[m.group(1), m.group(2), m.group(3)][int(m.group(4))] = f
    for (name, border, ratio), files in sorted(groups.items()):
        per_rule: dict[str, list[float]] = defaultdict(list)
        for seed in sorted(files):
            d = np.load(files[seed])
            for rule, fn in RULES.items():
                per_rule[rule].append(100 * image_auroc(d["labels"], fn(d["maps"].astype(np.float32))))
        base = np.asarray(per_rule["max"])
        frame = np.ones(d["masks"].shape[1:], bool)
        frame[8:-8, 8:-8] = False
        touching = (d["masks"][d["labels"] == 1] & frame).any(axis=(1, 2)).mean()
        print(
            f"{name} border={border} ratio={ratio} coreset seeds {sorted(files)}; "
            f"defect masks reaching the outer 8 px: {100 * touching:.0f} %"
        )
        for rule, values in per_rule.items():
            v = np.asarray(values)
            delta = v - base
            print(
                f"  {rule:8s} {v.mean():6.2f} ± {v.std(ddof=1) if len(v) > 1 else 0:4.2f}"
                f"  Δ {delta.mean():+5.2f} ± {delta.std(ddof=1) if len(v) > 1 else 0:4.2f}"
                f"  per seed {' '.join(f'{x:.2f}' for x in v)}"
            )


if __name__ == "__main__":
    main()
