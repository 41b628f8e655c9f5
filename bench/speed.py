"""Goals 1 and 2 of issue 6 beside anomalib, in one run: memory-bank build and in-process inference.

    bash bench/run_speed.sh            # calls this script, then anomalib's, on the same data and threads

1. Extracts F's patch features of every training image (pretrained Lite0, strides 8 and 16, 256 px), timed,
   and saves them for the peer.
2. anomalib's KCenterGreedy (its own venv, same threads) on that file, then our greedy coreset (the default
   config: exact greedy, no projection) and, for reference, ours on a 128-d projection; the exact covering
   radius of each selection; the machine's memory bandwidth (a 1 GiB numpy copy) against the bytes our greedy
   streams per second.
3. Quality at equal input: each selection as the bank of the frozen-F model, scored on the whole test split by
   the same code (nearest-neighbour distance, blurred maps) -> image and pixel AUROC.
4. In-process inference (``AnomalyModel.predict`` on prepared tensors, maps included) at batch 1 and 8, after
   warm-up. anomalib's comes from ``bench/anomalib_patchcore.py`` (``--peer-json``), forward only as well.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import auroc_from_distances, copy_bandwidth, frozen_extractor, machine, test_queries  # noqa: E402

from components.config import TocoadConfig  # noqa: E402
from components.coreset import covering_radius, greedy_coreset  # noqa: E402
from components.datasets import discover  # noqa: E402
from components.memory_bank import extract_embeddings  # noqa: E402
from components.nn_index import build_index, search  # noqa: E402
from components.pipeline import data_loader, load_artifacts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / "bench" / ".venv-anomalib" / "bin" / "python"


def extract_features(data: Path) -> tuple[np.ndarray, float]:
    """Pretrained F's patch features of every training image, and the seconds it took."""
    cfg = TocoadConfig()
    samples = discover(data).train
    f = frozen_extractor(cfg)
    loader = data_loader(cfg.with_overrides(["runtime.num_workers=0"]), samples, 16, shuffle=False)
    start = time.perf_counter()
    feats, _ = extract_embeddings(f, loader, cfg.bank, torch.device("cpu"), progress=False)
    return feats, time.perf_counter() - start


def _timed_coreset(feats: np.ndarray, n: int, projection_dim: int | None) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    idx = greedy_coreset(feats, n=n, projection_dim=projection_dim, seed=0)
    return idx, time.perf_counter() - start


def run_peer_kcenter(features: Path, ratio: float, work: Path) -> tuple[np.ndarray, float]:
    """anomalib's KCenterGreedy on the saved features (its venv, our thread count): indices and seconds."""
    cmd = [str(PEER_PY), str(ROOT / "bench" / "anomalib_kcenter.py"), "--features", str(features)]
    cmd += ["--ratio", str(ratio), "--threads", str(torch.get_num_threads())]
    cmd += ["--out-idx", str(work / "kc_idx.npy"), "--out-json", str(work / "kc.json")]
    subprocess.run(cmd, check=True)
    return np.load(work / "kc_idx.npy"), json.loads((work / "kc.json").read_text())["total_s"]


def coreset_bench(
    feats: np.ndarray, ratio: float, peer: tuple[np.ndarray, float] | None
) -> tuple[dict, dict[str, np.ndarray]]:
    """Ours (default: exact greedy), ours on a 128-d projection and the peer's picks: seconds and radii."""
    n = max(1, int(len(feats) * ratio))
    picks = {}
    picks["ours"], ours_s = _timed_coreset(feats, n, TocoadConfig().bank.projection_dim or None)
    picks["ours_proj128"], proj_s = _timed_coreset(feats, n, 128)
    out = {"patches": int(len(feats)), "dims": int(feats.shape[1]), "coreset_size": n}
    out.update(ours_seconds=ours_s, ours_proj128_seconds=proj_s)
    if peer is not None:
        picks["anomalib"], out["anomalib_seconds"] = peer
    for name, idx in picks.items():
        out[f"{name}_radius"] = covering_radius(feats, idx)
    streamed = (feats.shape[1] + 1) * len(feats) * 4 * (n - 1)  # bytes: the [D + 1, N] float32 bank per step
    out["ours_stream_bytes_per_s"] = streamed / ours_s
    return out, picks


def bank_quality(feats: np.ndarray, picks: dict[str, np.ndarray], data: Path) -> dict:
    """Image / pixel AUROC of the frozen-F model with each selection as its bank (same scorer, all test images)."""
    test = test_queries(data)
    queries = test["queries"].reshape(-1, test["queries"].shape[-1])
    out = {}
    for name, idx in picks.items():
        dist, _ = search(build_index(feats[np.sort(idx)], "flat"), queries, k=1)
        out[name] = auroc_from_distances(dist[:, 0], test)
    return out


def inference_bench(bundle: Path, data: Path, n_images: int = 32) -> dict:
    art = load_artifacts(bundle)
    model = art.model()
    test = discover(data).test[:n_images]
    loader = data_loader(art.cfg.with_overrides(["runtime.num_workers=0"]), test, 1, shuffle=False)
    images = torch.cat([b["image"] for b in loader])
    out = {}
    for batch in (1, 8):
        for i in range(0, max(8, 2 * batch), batch):  # warm-up: the first calls run slow (allocator, oneDNN)
            model.predict(images[i : i + batch])
        start = time.perf_counter()
        for i in range(0, len(images) - batch + 1, batch):
            model.predict(images[i : i + batch])
        done = (len(images) // batch) * batch
        out[f"ms_per_image_batch{batch}"] = 1000 * (time.perf_counter() - start) / done
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ratio", type=float, default=0.01)
    p.add_argument("--no-peer", action="store_true", help="skip running anomalib's KCenterGreedy")
    p.add_argument("--peer-idx", type=Path, help="KCenterGreedy indices chosen earlier on the same features")
    p.add_argument(
        "--peer-json", type=Path, help="anomalib_patchcore.py output of the same run (for latency)"
    )
    args = p.parse_args()
    work = args.out.parent / "speed_work"
    work.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine(), "data": str(args.data), "copy_bytes_per_s": copy_bandwidth()}
    feats, seconds = extract_features(args.data)
    result["features"] = {"seconds": seconds, "images": len(discover(args.data).train)}
    np.save(work / "features.npy", feats)
    peer = None
    if args.peer_idx:
        peer = (np.load(args.peer_idx), float("nan"))
    elif not args.no_peer:
        peer = run_peer_kcenter(work / "features.npy", args.ratio, work)
    result["coreset"], picks = coreset_bench(feats, args.ratio, peer)
    result["quality"] = bank_quality(feats, picks, args.data)
    result["inference"] = inference_bench(args.bundle, args.data)
    if args.peer_json and args.peer_json.is_file():
        result["anomalib_patchcore"] = json.loads(args.peer_json.read_text())
    result["machine_after"] = machine()
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps({k: v for k, v in result.items() if k != "anomalib_patchcore"}, indent=2, default=float))


if __name__ == "__main__":
    main()
