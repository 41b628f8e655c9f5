"""Speed beside anomalib, in one run: coreset on the same features, and in-process inference at batch 1 and 8.

    python bench/speed.py --data ../shared/data/mvtec_ad/bottle --bundle runs/bottle_bundle --out bench/results/speed.json

1. Extracts F's patch features of every training image (pretrained Lite0, strides 8 and 16, 256 px), times it,
   and saves them for the peer.
2. Our greedy coreset (1 %) on those features, then anomalib's KCenterGreedy on the same file (its own venv, same
   thread count), and the exact covering radius of both selections.
3. In-process inference (``AnomalyModel.predict`` on prepared tensors, maps included) at batch 1 and 8 on test
   images, after warm-up. anomalib's latency comes from ``bench/anomalib_patchcore.py`` (``--peer-json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from components.backbone import create_feature_extractor
from components.config import TocoadConfig
from components.coreset import covering_radius, greedy_coreset
from components.datasets import discover
from components.memory_bank import extract_embeddings
from components.pipeline import data_loader, load_artifacts

ROOT = Path(__file__).resolve().parents[1]
PEER_PY = ROOT / "bench" / ".venv-anomalib" / "bin" / "python"


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


def extract_features(data: Path) -> tuple[np.ndarray, float]:
    """Pretrained F's patch features of every training image, and the seconds it took."""
    cfg = TocoadConfig()
    samples = discover(data).train
    f = create_feature_extractor(cfg.backbone.name, cfg.backbone.weights, cfg.backbone.layers)
    loader = data_loader(cfg.with_overrides(["runtime.num_workers=0"]), samples, 16, shuffle=False)
    start = time.perf_counter()
    feats, _ = extract_embeddings(f, loader, cfg.bank, torch.device("cpu"), progress=False)
    return feats, time.perf_counter() - start


def coreset_bench(feats: np.ndarray, ratio: float, work: Path, peer: bool, peer_idx: Path | None) -> dict:
    """Our greedy coreset beside exact greedy and anomalib's KCenterGreedy, on the same features."""
    n = max(1, int(len(feats) * ratio))
    start = time.perf_counter()
    ours = greedy_coreset(feats, n=n, projection_dim=TocoadConfig().bank.projection_dim, seed=0)
    t_ours = time.perf_counter() - start
    start = time.perf_counter()
    exact = greedy_coreset(feats, n=n, projection_dim=None, seed=0)
    out = {
        "patches": int(len(feats)),
        "dims": int(feats.shape[1]),
        "coreset_size": n,
        "ours_seconds": t_ours,
        "exact_greedy_seconds": time.perf_counter() - start,
        "ours_radius": covering_radius(feats, ours),
        "exact_greedy_radius": covering_radius(feats, exact),
    }
    if peer:
        work.mkdir(parents=True, exist_ok=True)
        np.save(work / "features.npy", feats)
        peer_idx = work / "kc_idx.npy"
        cmd = [
            str(PEER_PY),
            str(ROOT / "bench" / "anomalib_kcenter.py"),
            "--features",
            str(work / "features.npy"),
            "--ratio",
            str(ratio),
            "--threads",
            str(torch.get_num_threads()),
            "--out-idx",
            str(peer_idx),
            "--out-json",
            str(work / "kc.json"),
        ]
        subprocess.run(cmd, check=True)
        out["anomalib_seconds"] = json.loads((work / "kc.json").read_text())["total_s"]
    if peer_idx is not None:
        out["anomalib_radius"] = covering_radius(feats, np.load(peer_idx))
    return out


def inference_bench(bundle: Path, data: Path, n_images: int = 32) -> dict:
    art = load_artifacts(bundle)
    model = art.model()
    test = discover(data).test[:n_images]
    loader = data_loader(art.cfg.with_overrides(["runtime.num_workers=0"]), test, 1, shuffle=False)
    images = torch.cat([b["image"] for b in loader])
    out = {}
    for batch in (1, 8):
        for i in range(0, 2 * batch, batch):  # warm-up
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
    p.add_argument("--features", type=Path, help="use this saved [N, D] .npy instead of extracting features")
    p.add_argument("--peer-idx", type=Path, help="KCenterGreedy indices chosen earlier on --features")
    p.add_argument(
        "--peer-json", type=Path, help="anomalib_patchcore.py output of the same run (for latency)"
    )
    args = p.parse_args()
    result = {"machine": machine(), "data": str(args.data)}
    if args.features:
        feats = np.load(args.features).astype(np.float32)
        result["features"] = {"file": str(args.features)}
    else:
        feats, seconds = extract_features(args.data)
        result["features"] = {"seconds": seconds, "images": len(discover(args.data).train)}
    work = args.out.parent / "speed_work"
    result["coreset"] = coreset_bench(feats, args.ratio, work, not args.no_peer, args.peer_idx)
    result["inference"] = inference_bench(args.bundle, args.data)
    if args.peer_json and args.peer_json.is_file():
        result["anomalib_patchcore"] = json.loads(args.peer_json.read_text())
    result["machine_after"] = machine()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps({k: v for k, v in result.items() if k != "anomalib_patchcore"}, indent=2, default=float))


if __name__ == "__main__":
    main()
