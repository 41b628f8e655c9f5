"""Which fold bank gives out-of-fold scores that match what good test parts get from the deployed bank?

    python bench/fold_banks.py --cache runs/protocol/screw/cache.pt --data ../shared/data/mvtec_ad/screw

Uses the frozen embeddings that bench/protocol.py cached. For each fold-bank rule it prints the time, the median,
0.9 and 0.99 quantiles of the out-of-fold scores of the training images, beside the quantiles of the good test
images' scores against the deployed bank (coreset seed 0, 5 folds):

* ``fresh_ratio``  -- a fresh coreset of the other folds at the bank's ratio (80 % of the deployed centres);
* ``fresh_count``  -- a fresh coreset of the other folds with the deployed bank's number of centres;
* ``union``        -- the union of the other folds' own coresets at the bank's ratio;
* ``refill``       -- the deployed coreset without the fold's centres, refilled by the greedy (the product's rule).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol import load_test  # noqa: E402

from components.config import BankConfig, TocoadConfig  # noqa: E402
from components.datasets import discover  # noqa: E402
from components.memory_bank import coreset_indices  # noqa: E402
from components.nn_index import build_index  # noqa: E402
from components.out_of_fold import assign_folds, out_of_fold_scores  # noqa: E402
from components.scoring import image_scores, patch_distances  # noqa: E402


def _scores(bank: np.ndarray, queries: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    index = build_index(bank, kind="flat")
    return image_scores(patch_distances(index, queries, grid), queries, bank, index, False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, required=True, help="cache.pt written by bench/protocol.py")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args()
    cfg = TocoadConfig().with_overrides(["runtime.num_workers=0"])
    stored = torch.load(args.cache, weights_only=True)
    train, test_emb = stored["train"], stored["test"]
    grid = tuple(train.shape[-2:])
    per_image = grid[0] * grid[1]
    flat = np.ascontiguousarray(train.permute(0, 2, 3, 1).reshape(-1, train.shape[1]).numpy())
    queries = np.ascontiguousarray(test_emb.permute(0, 2, 3, 1).reshape(-1, test_emb.shape[1]).numpy())
    test = load_test(cfg, discover(args.data).test)
    rows = coreset_indices(flat, cfg.bank, 0, progress=False)
    good = _scores(np.ascontiguousarray(flat[rows]), queries, grid)[test["labels"] == 0]
    levels = (0.5, 0.9, 0.99)
    print(
        f"good test images, deployed bank: quantiles {levels} = {np.quantile(good, levels).round(2).tolist()}"
    )
    fold = assign_folds(len(train), args.folds, 0)
    rows_fold = np.repeat(fold, per_image)
    k = args.folds

    def per_fold(make_bank) -> np.ndarray:
        out = np.empty(len(train))
        for f in range(k):
            out[fold == f] = _scores(make_bank(f), np.ascontiguousarray(flat[rows_fold == f]), grid)
        return out

    def fresh(ratio: float):
        return lambda f: flat[rows_fold != f][coreset_indices(flat[rows_fold != f], BankConfig(coreset_ratio=ratio),
                                                              0, progress=False)]  # fmt: skip

    def union():
        cores = [flat[rows_fold == g][coreset_indices(flat[rows_fold == g], cfg.bank, 0, progress=False)]
                 for g in range(k)]  # fmt: skip
        return per_fold(lambda f: np.concatenate([c for g, c in enumerate(cores) if g != f]))

    rules = {
        "fresh_ratio": lambda: per_fold(fresh(cfg.bank.coreset_ratio)),
        "fresh_count": lambda: per_fold(fresh(cfg.bank.coreset_ratio * k / (k - 1))),
        "union": union,
        "refill": lambda: out_of_fold_scores(flat, grid, cfg.bank, k, 0, rows, progress=False).scores,
    }
    for name, rule in rules.items():
        start = time.perf_counter()
        scores = rule()
        seconds = time.perf_counter() - start
        print(
            f"{name:12s} {seconds:6.1f} s  out-of-fold quantiles {np.quantile(scores, levels).round(2).tolist()}"
        )


if __name__ == "__main__":
    main()
