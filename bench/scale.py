"""Scale curve of the memory-bank index: Flat, IVF-Flat, IVF-PQ and HNSW from 10k to 4M patches (issue 6, goal 4).

    python bench/scale.py --data ../shared/data/mvtec_ad/bottle --sizes 10000,40000,160000,1000000,4000000 \
        --out runs/scale/bottle.json

The bank of size N is the first N patches of a seeded shuffle of a real patch pool: the pretrained F's
features of the training images and of ``--variants`` augmentations of each (quarter turns, flips, gains),
so the banks are nested and real, though more redundant than a coreset of that size would be. For every size
and index kind it records the build time (training included), the index's serialised size (its memory), and
per test image (1,024 query patches, one ``search`` call, the default torch/faiss threads) the query latency,
recall@1 against Flat and the image / pixel AUROC from the nearest distances. IVF kinds are measured at
several ``nprobe`` and HNSW at several ``efSearch``. HNSW is built only up to ``--hnsw-max`` patches (its
build is the slowest; the build rate measured below it is printed). The test set is a proportional subset
(``--test-images``) because exact search over a 4M bank costs about 17 s per image on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import auroc_from_distances, machine, patch_pool, test_queries  # noqa: E402

from components.nn_index import build_index, refine_farthest, search, search_effort  # noqa: E402

SWEEP = {"flat": [None], "ivf_flat": [8, 16, 32], "ivf_pq": [8, 16, 32], "hnsw": [32, 64, 128]}


def set_search_param(index: faiss.Index, kind: str, value: int | None) -> None:
    """nprobe of an IVF index, efSearch of an HNSW index."""
    if kind.startswith("ivf"):
        faiss.extract_index_ivf(index).nprobe = value
    elif kind == "hnsw":
        index.hnsw.efSearch = value


def run_queries(index: faiss.Index, queries: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Nearest distances and ids of every test patch, searched one image per call, and mean seconds per
    image: ``plain``, and for approximate indexes also ``refined`` (what ``AnomalyModel.predict`` does: each
    image's farthest patches searched again, see ``refine_farthest``; ids are those of the plain search)."""
    out: dict[str, list] = {"plain": [[], [], []], "refined": [[], [], []]}
    for image in queries:
        start = time.perf_counter()
        d, i = search(index, image, k=1)
        plain_s = time.perf_counter() - start
        refined = refine_farthest(index, image, d[:, 0], len(image))
        for key, dist, sec in (
            ("plain", d[:, 0], plain_s),
            ("refined", refined, time.perf_counter() - start),
        ):
            out[key][0].append(dist)
            out[key][1].append(i[:, 0])
            out[key][2].append(sec)
    keys = ["plain"] + (["refined"] if search_effort(index) is not None else [])
    return {
        k: (np.concatenate(out[k][0]), np.concatenate(out[k][1]), float(np.mean(out[k][2]))) for k in keys
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--sizes", default="10000,40000,160000,1000000,4000000")
    p.add_argument("--kinds", default="flat,ivf_flat,ivf_pq,hnsw")
    p.add_argument(
        "--variants", type=int, default=0, help="augmentations per image (0: enough for the sizes)"
    )
    p.add_argument("--test-images", type=int, default=24)
    p.add_argument("--hnsw-max", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")

    test = test_queries(args.data, args.test_images)
    per_image = test["queries"].shape[1]
    n_train = len(list((args.data / "train" / "good").glob("*")))
    variants = args.variants or max(1, -(-max(sizes) // (n_train * per_image)))
    pool, pool_s = patch_pool(args.data, variants)
    order = np.random.default_rng(0).permutation(len(pool))
    result = {"machine": machine(), "data": str(args.data), "pool_patches": len(pool), "variants": variants}
    result.update(pool_seconds=pool_s, test_images=len(test["labels"]), rows=[])
    print(f"pool: {len(pool)} patches ({variants} variants) in {pool_s:.0f} s", flush=True)
    queries = test["queries"]
    for size in sizes:
        if size > len(pool):
            print(f"skip {size}: the pool has {len(pool)} patches", flush=True)
            continue
        bank = np.ascontiguousarray(pool[np.sort(order[:size])])
        truth = None
        for kind in kinds:
            if kind == "hnsw" and size > args.hnsw_max:
                continue
            start = time.perf_counter()
            index = build_index(bank, kind)
            build_s = time.perf_counter() - start
            memory = len(faiss.serialize_index(index))
            for value in SWEEP[kind]:
                set_search_param(index, kind, value)
                for mode, (dist, ids, latency) in run_queries(index, queries).items():
                    if kind == "flat":
                        truth = (dist, ids)
                    row = {"size": size, "kind": kind, "param": value, "refined": mode == "refined"}
                    row.update(build_s=build_s, bytes=memory, latency_ms=1000 * latency)
                    row.update(auroc_from_distances(dist, test))
                    if truth is not None:
                        row["recall_at_1"] = float(np.mean(ids == truth[1]))
                        row["distance_ratio_p99"] = float(
                            np.percentile(dist / np.maximum(truth[0], 1e-12), 99)
                        )
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=2))
            del index
    result["machine_after"] = machine()
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
