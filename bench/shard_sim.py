"""A memory bank sharded over replicas, simulated in one process: per-shard coresets, their merge, and search.

    python bench/shard_sim.py --max-patches 40000                  # bottle train features, extracted here
    python bench/shard_sim.py --features feats.npy --shards 1 2 4 8 --out runs/shard_sim.json

For each shard count S (a shard stands for one predictor replica, or one faiss GPU index per device) and each
per-shard factor f (``--factors``; ``S`` means "each shard keeps about k points", the default of
``two_level_coreset``):

1. ``split_shards``: whole images per shard when the features are extracted here (``block`` = patches per
   image; ``--block`` for a ``.npy``), dealt at random.
2. A greedy coreset per shard, timed one shard at a time: the largest time is the wall time if every shard ran
   on its own node, the sum is the total CPU; then the merge pass over the union. Compared with one-level
   greedy over all N (same projection) by time and by exact covering radius over all N, with the bound
   ``R_U + max_s r_s`` of ``components.sharding.two_level_coreset``.
3. The resulting bank (``--search-bank coreset``; ``all``: every patch, a bank far past a node) split over S
   shards: ``ShardedIndex`` (flat) against one flat index, on ``--queries`` query patches (a test image's
   1024 patches when extracting, else random rows): recall@1 (same nearest id), the largest distance
   difference, and median search milliseconds of the single index, of the slowest shard (what a parallel
   fan-out waits for, network excluded) and of all shards in turn plus the merge.

Everything runs in one process on this machine's threads (set ``OMP_NUM_THREADS``); no network, no replicas.
Timings move with the machine's load: compare rows of one run. Features are extracted with the pretrained
backbone as ``bench/speed.py`` does (same components), but stop once ``--max-patches`` are reached.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from components.coreset import coreset_size, covering_radius, greedy_coreset  # noqa: E402
from components.nn_index import build_index, search  # noqa: E402
from components.sharding import (  # noqa: E402
    ShardedIndex,
    merge_coresets,
    shard_coreset,
    shard_quota,
    split_shards,
)

BATCH = 16


def extract_features(samples: list, max_patches: int | None) -> tuple[np.ndarray, int, int]:
    """Pretrained F's patch features ``[N, D]`` of ``samples`` in order, 16 images at a time, stopping once
    ``max_patches`` are reached; also the patches per image and the images used."""
    from benchlib import frozen_extractor

    from components.config import TocoadConfig
    from components.memory_bank import extract_embeddings
    from components.pipeline import data_loader

    cfg = TocoadConfig().with_overrides(["runtime.num_workers=0"])
    f = frozen_extractor(cfg)
    chunks, grid, used = [], (0, 0), 0
    for s in range(0, len(samples), BATCH):
        loader = data_loader(cfg, samples[s : s + BATCH], BATCH, shuffle=False)
        feats, grid = extract_embeddings(f, loader, cfg.bank, torch.device("cpu"), progress=False)
        chunks.append(feats)
        used += len(samples[s : s + BATCH])
        if max_patches and sum(len(c) for c in chunks) >= max_patches:
            break
    return np.concatenate(chunks), grid[0] * grid[1], used


def whole_blocks(num: int, count: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted rows of ``count // block`` (at least one) random whole ``block``-row blocks of ``num`` rows."""
    blocks = num // block
    chosen = np.sort(rng.choice(blocks, min(blocks, max(1, count // block)), replace=False))
    return (chosen[:, None] * block + np.arange(block)).ravel()


def load(args: argparse.Namespace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """Features, queries (held out of the features), block (patches per image) and where they came from."""
    if args.features:
        feats = np.load(args.features).astype(np.float32)
        block = args.block
        held_out = whole_blocks(len(feats), args.queries, block, rng)  # whole images when block > 1
        queries = feats[held_out]
        feats = np.delete(feats, held_out, axis=0)
        info = {"file": str(args.features), "queries": f"{len(held_out)} held-out rows"}
    else:
        from components.datasets import discover

        splits = discover(args.data)
        order = rng.permutation(len(splits.train))
        start = time.perf_counter()
        feats, block, used = extract_features([splits.train[i] for i in order], args.max_patches)
        seconds = time.perf_counter() - start
        test = [splits.test[i] for i in rng.permutation(len(splits.test))]
        queries, _, _ = extract_features(test, args.queries)
        info = {"data": str(args.data), "train_images": used, "seconds": seconds, "queries": "test image(s)"}
        if args.save_features:
            np.save(args.save_features, feats)
    if args.max_patches and len(feats) > args.max_patches:
        feats = np.ascontiguousarray(feats[whole_blocks(len(feats), args.max_patches, block, rng)])
    info.update({"patches": int(len(feats)), "dims": int(feats.shape[1]), "block": int(block)})
    return feats, np.ascontiguousarray(queries[: args.queries], dtype=np.float32), block, info


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def local_radius(feats: np.ndarray, points: np.ndarray, centres: np.ndarray) -> float:
    """Covering radius of ``feats[centres]`` over ``feats[points]`` (``centres`` a subset of ``points``)."""
    order = np.argsort(points)
    local = order[np.searchsorted(points[order], centres)]
    return covering_radius(feats[points], local)


def search_stats(bank: np.ndarray, shards: int, queries: np.ndarray, seed: int, reps: int) -> dict:
    """Sharded flat search against one flat index over the same bank."""
    single = build_index(bank, "flat", use_gpu=False)
    sharded = ShardedIndex(bank, split_shards(len(bank), shards, seed), kind="flat", use_gpu=False)
    d1, i1 = search(single, queries, 1)
    ds, is_ = sharded.search(queries, 1)
    return {
        "bank": int(len(bank)),
        "recall_at_1": float(np.mean(i1[:, 0] == is_[:, 0])),
        "max_abs_distance_diff": float(np.max(np.abs(d1 - ds))),
        "median_nn_distance": float(np.median(d1)),
        "single_ms": median_ms(lambda: search(single, queries, 1), reps),
        "shard_ms": [median_ms(lambda s=s: sharded.search_shard(s, queries, 1), reps) for s in range(shards)],
        "sharded_sequential_ms": median_ms(lambda: sharded.search(queries, 1), reps),
    }


def run_case(
    feats: np.ndarray, queries: np.ndarray, shards: int, factor: float, k: int, args, one: dict
) -> dict:
    """One shard count and per-shard factor: timed shard coresets and merge, radii, sharded search."""
    num = len(feats)
    parts = split_shards(num, shards, args.seed, args.block_used)
    quotas = [shard_quota(len(p), num, k, factor) for p in parts]
    cands, times = [], []
    for part, keep in zip(parts, quotas, strict=True):
        cand, sec = timed(shard_coreset, feats, part, keep, args.projection_dim, args.seed)
        cands.append(cand)
        times.append(sec)
    result, merge_s = timed(merge_coresets, feats, cands, k, args.projection_dim, args.seed)
    union = np.concatenate(cands)
    r_shard = max(local_radius(feats, p, c) for p, c in zip(parts, cands, strict=True))
    r_union = local_radius(feats, union, result)
    radius = covering_radius(feats, result)
    bank = feats if args.search_bank == "all" else feats[np.sort(result)]
    return {
        "shards": shards,
        "per_shard_factor": factor,
        "shard_sizes": [len(p) for p in parts],
        "keep_per_shard": quotas,
        "union": int(len(union)),
        "shard_coreset_s": times,
        "shard_coreset_max_s": max(times),
        "shard_coreset_sum_s": sum(times),
        "merge_s": merge_s,
        "two_level_wall_s": max(times) + merge_s,
        "speedup_vs_one_level": one["seconds"] / (max(times) + merge_s),
        "radius": radius,
        "radius_ratio": radius / one["radius"],
        "max_shard_radius": r_shard,
        "union_radius": r_union,
        "bound": r_union + r_shard,
        "bound_holds": bool(radius <= r_union + r_shard + 1e-6),
        "search": search_stats(bank, shards, queries, args.seed, args.reps),
    }


def table(rows: list[dict], one: dict) -> str:
    head = (
        "| shards | f | keep/shard | shard coreset s (max / sum) | merge s | wall s | speed-up "
        "| radius 2L/1L | bound (R_U + max r_s) | recall@1 | max abs dd | bank | 1 index ms "
        "| max shard ms | all shards ms |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        s = r["search"]
        lines.append(
            f"| {r['shards']} | {r['per_shard_factor']:g} | {max(r['keep_per_shard'])} "
            f"| {r['shard_coreset_max_s']:.2f} / {r['shard_coreset_sum_s']:.2f} | {r['merge_s']:.2f} "
            f"| {r['two_level_wall_s']:.2f} | {r['speedup_vs_one_level']:.1f}x | {r['radius_ratio']:.3f} "
            f"| {r['bound']:.2f} >= {r['radius']:.2f} | {s['recall_at_1']:.4f} "
            f"| {s['max_abs_distance_diff']:.1e} | {s['bank']} | {s['single_ms']:.2f} "
            f"| {max(s['shard_ms']):.2f} | {s['sharded_sequential_ms']:.2f} |"
        )
    lines.append(f"\nOne-level greedy: {one['seconds']:.2f} s, radius {one['radius']:.3f}.")
    return "\n".join(lines)


def factors_for(shards: int, spec: list[str]) -> list[float]:
    if shards == 1:
        return [1.0]  # one shard keeping k is one-level greedy
    out = [float(shards) if f.upper() == "S" else float(f) for f in spec]
    return sorted(set(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", type=Path, help="saved [N, D] float .npy of patch features")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "shard_sim.json")
    p.add_argument("--ratio", type=float, default=0.01, help="coreset share of the patches")
    p.add_argument("--max-patches", type=int, help="use at most this many patches (whole images when known)")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--factors", default="2,S", help="per-shard factors, comma-separated; S = the shard count")
    p.add_argument(
        "--projection-dim", type=int, default=0, help="coreset projection (0: none, the default config)"
    )
    p.add_argument(
        "--block", type=int, default=1, help="patches per image of --features (1: patch-level split)"
    )
    p.add_argument("--queries", type=int, default=1024, help="query patches per search (1024 = one image)")
    p.add_argument("--search-bank", choices=("coreset", "all"), default="coreset")
    p.add_argument("--reps", type=int, default=5, help="search repetitions (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-features", type=Path, help="save the extracted features here (.npy)")
    args = p.parse_args()
    args.projection_dim = args.projection_dim or None

    rng = np.random.default_rng(args.seed)
    feats, queries, args.block_used, info = load(args, rng)
    k = coreset_size(len(feats), ratio=args.ratio)
    sel, seconds = timed(greedy_coreset, feats, k, None, args.projection_dim, args.seed)
    one = {"seconds": seconds, "radius": covering_radius(feats, sel), "k": k}
    rows = []
    for shards in args.shards:
        for factor in factors_for(shards, args.factors.split(",")):
            rows.append(run_case(feats, queries, shards, factor, k, args, one))
            r = rows[-1]
            print(
                f"shards {shards} f {factor:g}: wall {r['two_level_wall_s']:.2f} s, "
                f"radius x{r['radius_ratio']:.3f}",
                file=sys.stderr,
            )
    result = {
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "load": os.getloadavg(),
        },
        "features": info,
        "params": {k_: (str(v) if isinstance(v, Path) else v) for k_, v in vars(args).items()},
        "one_level": one,
        "queries": int(len(queries)),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(table(rows, one))


if __name__ == "__main__":
    try:
        main()
    except ValueError as exc:  # e.g. fewer images than shards: say so, no traceback
        sys.exit(f"error: {exc}")
