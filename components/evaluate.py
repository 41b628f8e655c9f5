"""Evaluation on a labelled test split: metrics, D-alone diagnostics and the HTML report."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from components.bundle import write_json
from components.datasets import discover
from components.device import resolve_device
from components.metrics import aupro, f1_max, image_auroc, pixel_auroc, recall_at_fpr
from components.pipeline import Artifacts, data_loader, load_artifacts
from components.report import write_report


def detection_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray,
    maps: np.ndarray,
    threshold: float | None = None,
    false_alarm_rate: float | None = None,
) -> dict[str, float]:
    """Image AUROC, pixel AUROC, AUPRO (FPR <= 0.3) and F1-max, in percent; rates at ``threshold`` if given.

    With ``false_alarm_rate`` (the calibration's target) also ``roc_recall_at_target``: the best recall the test
    ROC allows at that false-alarm rate, the yardstick for the calibrated threshold's recall. A metric that the
    data cannot support (e.g. no defective images) is left out, not faked.
    """
    out: dict[str, float] = {}
    for name, fn in (
        ("image_auroc", lambda: image_auroc(labels, scores)),
        ("pixel_auroc", lambda: pixel_auroc(masks, maps)),
        ("aupro", lambda: aupro(masks, maps)),
        ("image_f1_max", lambda: f1_max(labels, scores)[0]),
    ):
        try:
            out[name] = 100.0 * float(fn())
        except ValueError:
            continue
    if threshold is not None:
        pred = scores >= threshold
        tp, fp = int((pred & (labels == 1)).sum()), int((pred & (labels == 0)).sum())
        fn_, tn = int((~pred & (labels == 1)).sum()), int((~pred & (labels == 0)).sum())
        out["recall_at_threshold"] = 100.0 * tp / max(tp + fn_, 1)
        out["false_positive_rate_at_threshold"] = 100.0 * fp / max(fp + tn, 1)
        out["accuracy_at_threshold"] = 100.0 * (tp + tn) / max(len(labels), 1)
        out["false_alarms_at_threshold"] = fp
        out["misses_at_threshold"] = fn_
    if false_alarm_rate is not None:
        with contextlib.suppress(ValueError):
            out["roc_recall_at_target"] = 100.0 * recall_at_fpr(labels, scores, false_alarm_rate)
    return out


def evaluate(
    bundle_dir: Path, data_root: Path, out_dir: Path, device: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Score the test split of ``data_root`` with the bundle; write metrics.json and the report to ``out_dir``."""
    dev = resolve_device(device or "auto")
    art = load_artifacts(bundle_dir, dev)
    model = art.model(dev)
    data = discover(Path(data_root), art.cfg.data.layout)
    if not data.test:
        raise ValueError(f"{data_root} has no test images to evaluate on (layout {data.layout})")
    cols = _score_test_set(art, model, data.test, dev, progress)
    labels = np.asarray(cols["labels"])
    thr = art.calibration.threshold if art.calibration is not None else None
    rate = art.cfg.calibration.false_alarm_rate if thr is not None else None
    metrics: dict[str, Any] = {
        "tocoad": detection_metrics(labels, cols["scores"], cols["masks"], cols["maps"], thr, rate),
        "n_test": int(len(labels)),
        "n_defective": int(labels.sum()),
        "threshold": thr,
        "stages": art.stages,
    }
    if "d_maps" in cols:
        d_scores = cols["d_maps"].reshape(len(labels), -1).max(axis=1)
        metrics["discriminator"] = detection_metrics(labels, d_scores, cols["masks"], cols["d_maps"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    html = write_report(
        out_dir,
        image_labels=labels,
        image_scores=cols["scores"],
        paths=cols["paths"],
        defect_types=cols["types"],
        images=cols["images"],
        maps=cols["maps"],
        masks=cols["masks"],
        threshold=thr if thr is not None else float(np.median(cols["scores"])),
        metrics=metrics,
        title=f"tocoad evaluation: {Path(data_root).name}",
    )
    metrics["report"] = str(html)
    write_json(out_dir / "metrics.json", metrics)
    return metrics


@torch.inference_mode()
def _score_test_set(art: Artifacts, model, samples, device, progress: bool) -> dict[str, Any]:
    cfg = art.cfg
    cols: dict[str, list] = {k: [] for k in ("scores", "maps", "masks", "images", "labels", "paths", "types")}
    if art.disc is not None:
        cols["d_maps"] = []
    loader = data_loader(cfg, samples, cfg.runtime.batch_size, shuffle=False)
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress, dynamic_ncols=True):
        images = batch["image"].to(device)
        pred = model.predict(images)
        cols["scores"].append(pred.scores)
        cols["maps"].append(pred.maps.astype(np.float32))
        cols["masks"].append(batch["mask"][:, 0].numpy() > 0.5)
        cols["images"].append((batch["image"].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))
        cols["labels"].extend(int(v) for v in batch["label"])
        cols["paths"].extend(batch["path"])
        cols["types"].extend(batch["defect_type"])
        if art.disc is not None:
            cols["d_maps"].append(torch.sigmoid(art.disc(images))[:, 0].float().cpu().numpy())
    return {
        k: np.concatenate(v) if k in ("scores", "maps", "masks", "images", "d_maps") else v
        for k, v in cols.items()
    }
