"""Save the test images' patch-distance maps of frozen F's bank, per set, border rule and coreset seed.

    PYTHONPATH=. python bench/patch_maps.py --data ../shared/data/mvtec_3d_rgb/tire --cache runs/protocol/tire \
        --border zeros --ratio 0.05 --seeds 0,1,2 --out runs/patch_maps

Each run writes ``<out>/<set>_<border>_<ratio>_<seed>.npz`` with the maps ``[N, h, w]``, the labels and the
masks, so that image-score rules (``bench/score_rules.py``) can be compared on the same banks without building
them again. It reuses ``bench/protocol.py``'s cached embeddings and its bank rule.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.protocol import _flat, build_bank, frozen_embeddings, load_test
from components.config import TocoadConfig
from components.datasets import discover
from components.pipeline import training_split
from components.scoring import patch_distances


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True, help="the protocol's output folder of this set")
    p.add_argument("--border", choices=("valid", "zeros"), default="valid")
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, default=Path("runs/patch_maps"))
    args = p.parse_args()
    cfg = TocoadConfig().with_overrides(
        [
            f"bank.border={args.border}",
            f"bank.coreset_ratio={args.ratio}",
            "runtime.progress=false",
            "runtime.num_workers=0",
        ]
    )
    data = discover(args.data, cfg.data.layout)
    train, _ = training_split(cfg, data)
    _, train_emb, test_emb = frozen_embeddings(cfg, args.cache, train, data.test)
    test = load_test(cfg, data.test)
    grid = tuple(train_emb.shape[-2:])
    flat, queries = _flat(train_emb), _flat(test_emb)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        target = args.out / f"{args.data.name}_{args.border}_{args.ratio}_{seed}.npz"
        if target.is_file():
            continue
        _, bank, index, bank_s = build_bank(cfg, flat, seed)
        maps = patch_distances(index, queries, grid)
        np.savez_compressed(target, maps=maps, labels=test["labels"], masks=test["masks"])
        print(f"{target.name}: bank {len(bank)} in {bank_s:.0f} s", time.strftime("%H:%M:%S"), flush=True)


if __name__ == "__main__":
    main()
