"""Time anomalib's KCenterGreedy coreset alone on a fixed feature matrix.

    bench/.venv-anomalib/bin/python bench/anomalib_kcenter.py --features bank.npy --ratio 0.01 \
        --seed 0 --out-idx anomalib_idx.npy --out-json anomalib_kcenter.json

``--features``: .npy of shape (N, D), float32 (e.g. from ``anomalib_patchcore.py --save-bank`` or tocoad's own bank),
so both coresets run on exactly the same features. The selection is anomalib's
``anomalib.models.components.sampling.KCenterGreedy`` unchanged: SparseRandomProjection(eps=0.9) to the
Johnson-Lindenstrauss dimension (not capped at D), a random start index, then ``int(N * ratio)`` greedy steps.
The projection and the greedy loop are timed separately (the projection is timed by wrapping the sampler's own
fit/transform calls). Selected indices (in selection order, int64) go to ``--out-idx``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", required=True, type=Path, help=".npy (N, D) float32")
    ap.add_argument("--ratio", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--out-idx", type=Path, default=None, help="write selected indices (.npy, int64)")
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import anomalib
    from anomalib.models.components.sampling import KCenterGreedy

    feats = np.load(args.features, mmap_mode=None)
    if feats.ndim != 2:
        sys.exit(f"expected (N, D), got {feats.shape}")
    emb = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))

    random.seed(args.seed)
    np.random.seed(
        args.seed
    )  # SparseRandomProjection -> sklearn sample_without_replacement(random_state=None)
    torch.manual_seed(args.seed)

    sampler = KCenterGreedy(embedding=emb, sampling_ratio=args.ratio)
    proj_s = [0.0]
    fit0, transform0 = sampler.model.fit, sampler.model.transform

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                proj_s[0] += time.perf_counter() - t

        return wrapper

    sampler.model.fit, sampler.model.transform = timed(fit0), timed(transform0)

    load_start = os.getloadavg()
    t0 = time.perf_counter()
    with torch.inference_mode():
        idx = sampler.select_coreset_idxs()
    total_s = time.perf_counter() - t0
    idx_np = np.asarray(idx, dtype=np.int64)

    res = {
        "impl": "anomalib.models.components.sampling.KCenterGreedy",
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "features": str(args.features),
        "n": int(emb.shape[0]),
        "dim": int(emb.shape[1]),
        "ratio": args.ratio,
        "coreset_size": int(sampler.coreset_size),
        "projection_dim": int(sampler.features.shape[1]),
        "seed": args.seed,
        "projection_s": proj_s[0],
        "greedy_s": total_s - proj_s[0],
        "total_s": total_s,
        "n_unique": int(np.unique(idx_np).size),
        "first_idx": int(idx_np[0]),
        "loadavg_1_5_15_start": [round(v, 2) for v in load_start],
        "loadavg_1_5_15_end": [round(v, 2) for v in os.getloadavg()],
    }
    if args.out_idx:
        args.out_idx.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.out_idx, idx_np)
        res["out_idx"] = str(args.out_idx)
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
