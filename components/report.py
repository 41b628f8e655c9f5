"""Evaluation report: curves, histograms, heatmap overlays, per-type table, report.json, index.html.

Figures are drawn on bare :class:`matplotlib.figure.Figure` objects (Agg canvas, no pyplot state), so
the module works headless and leaks no figures. Pixel curves are computed on a strided subsample when
the maps hold more than ``max_curve_pixels`` pixels, and curves are thinned to ``_PLOT_POINTS``
points before plotting.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from PIL import Image

from components.metrics import curve_area, image_auroc, pixel_roc_curve, pro_curve, roc_curve

__all__ = ["overlay_heatmap", "write_report"]

_PLOT_POINTS = 2000
_CMAP = "jet"
_FPR_LIMIT = 0.3


# --------------------------------------------------------------------------- overlay


def overlay_heatmap(
    image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5
) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an image: ``uint8 [H,W,3]``.

    ``image`` is ``uint8 [H,W,3]`` (or ``[H,W]`` grey); ``amap`` is resized bilinearly to the image
    size when the shapes differ. Values are scaled to [0, 1] with ``vmin``/``vmax`` and clipped.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be [H,W,3] or [H,W], got {img.shape}")
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape != img.shape[:2]:
        size = (img.shape[1], img.shape[0])
        amap = np.asarray(Image.fromarray(amap).resize(size, Image.Resampling.BILINEAR))
    span = float(vmax) - float(vmin)
    scaled = np.clip((amap - vmin) / span, 0.0, 1.0) if span > 0 else np.zeros_like(amap)
    colour = matplotlib.colormaps[_CMAP](scaled)[..., :3] * 255.0
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- helpers


def _save(fig: Figure, path: Path) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path.name


def _thin(*curves: np.ndarray, n: int = _PLOT_POINTS) -> list[np.ndarray]:
    """Keep at most ``n`` evenly spaced points (endpoints included) of parallel curve arrays."""
    size = curves[0].size
    if size <= n:
        return list(curves)
    idx = np.unique(np.linspace(0, size - 1, n).round().astype(int))
    return [c[idx] for c in curves]


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)  # paths, enums, ...


def _fmt(value: Any) -> str:
    if isinstance(value, float | np.floating):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.4f}"
    return html.escape(str(value))


def _both(labels: np.ndarray) -> bool:
    return 0 < int(labels.sum()) < labels.size


# --------------------------------------------------------------------------- figures


def _plot_roc(fpr: np.ndarray, tpr: np.ndarray, auc: float, title: str, path: Path) -> str:
    fpr, tpr = _thin(fpr, tpr)
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, lw=1.5, label=f"AUROC = {auc:.4f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(
        xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01)
    )
    ax.legend(loc="lower right")
    return _save(fig, path)


def _plot_pro(fpr: np.ndarray, pro: np.ndarray, au: float, path: Path, note: str = "") -> str:
    keep = int(np.searchsorted(fpr, _FPR_LIMIT, side="right")) + 1
    fpr, pro = _thin(fpr[:keep], pro[:keep])
    fig = Figure(figsize=(4.5, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(fpr, pro, lw=1.5, label=f"AUPRO@{_FPR_LIMIT} = {au:.4f}")
    ax.set(
        xlabel="false positive rate",
        ylabel="per-region overlap",
        title="PRO curve" + note,
        xlim=(0, _FPR_LIMIT),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right")
    return _save(fig, path)


def _plot_hist(labels: np.ndarray, scores: np.ndarray, threshold: float, path: Path) -> str:
    lo, hi = min(scores.min(), threshold), max(scores.max(), threshold)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 31)
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for flag, name, colour in ((False, "normal", "tab:green"), (True, "defective", "tab:red")):
        if np.any(labels == flag):
            ax.hist(
                scores[labels == flag],
                bins=bins,
                alpha=0.6,
                color=colour,
                label=f"{name} ({np.sum(labels == flag)})",
            )
    ax.axvline(threshold, c="k", ls="--", lw=1.2, label=f"threshold = {threshold:.4g}")
    ax.set(xlabel="image anomaly score", ylabel="images", title="Score distribution")
    ax.legend()
    return _save(fig, path)


def _plot_examples(rows: list[int], ctx: dict[str, Any], title: str, path: Path) -> str:
    images, maps, masks = ctx["images"], ctx["maps"], ctx["masks"]
    vmin, vmax = ctx["vmin"], ctx["vmax"]
    fig = Figure(figsize=(10, 3.3 * len(rows)))
    fig.suptitle(title)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, i in enumerate(rows):
        ax_img, ax_gt, ax_ov = axes[r]
        ax_img.imshow(images[i])
        ax_img.set_title(
            f"{ctx['names'][i]}\n{ctx['types'][i]}  score {ctx['scores'][i]:.4g}  [{ctx['verdicts'][i]}]",
            fontsize=8,
        )
        if masks is None:
            ax_gt.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=ax_gt.transAxes)
        else:
            ax_gt.imshow(masks[i] > 0.5, cmap="gray", vmin=0, vmax=1)
        ax_gt.set_title("ground truth", fontsize=8)
        ax_ov.imshow(overlay_heatmap(images[i], maps[i], vmin, vmax))
        if masks is not None and np.any(masks[i] > 0.5) and masks[i].shape == images[i].shape[:2]:
            ax_ov.contour(masks[i] > 0.5, levels=[0.5], colors="white", linewidths=0.8)
        ax_ov.set_title("anomaly map", fontsize=8)
        mappable = ScalarMappable(norm=Normalize(vmin, vmax), cmap=_CMAP)
        fig.colorbar(mappable, ax=ax_ov, fraction=0.046, pad=0.04)
        for ax in (ax_img, ax_gt, ax_ov):
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(fig, path)


# --------------------------------------------------------------------------- numbers


def _confusion(labels: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    tp, fp = int(np.sum(pred & labels)), int(np.sum(pred & ~labels))
    fn, tn = int(np.sum(~pred & labels)), int(np.sum(~pred & ~labels))
    return {
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": (tp + tn) / labels.size,
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tp / (tp + fn) if tp + fn else float("nan"),
        "false_positive_rate": fp / (fp + tn) if fp + tn else float("nan"),
    }


def _per_type(
    labels: np.ndarray, scores: np.ndarray, pred: np.ndarray, types: Sequence[str]
) -> dict[str, Any]:
    types_arr = np.asarray(types, dtype=object)
    normal = ~labels
    out = {}
    for name in dict.fromkeys(types):
        sel = types_arr == name
        row = {
            "n": int(sel.sum()),
            "n_defective": int(labels[sel].sum()),
            "flagged_rate": float(pred[sel].mean()),
            "mean_score": float(scores[sel].mean()),
            "image_auroc": float("nan"),
        }
        both = sel & labels | normal
        if labels[sel].any() and _both(labels[both]):
            row["image_auroc"] = image_auroc(labels[both], scores[both])
        out[str(name)] = row
    return out


def _pixel_curves(masks: np.ndarray, maps: np.ndarray, max_pixels: int) -> dict[str, Any]:
    """Pixel ROC and PRO curves (on a strided subsample when large); empty if not computable."""
    stride = max(1, math.ceil(math.sqrt(masks.size / max_pixels)))
    m, a = masks[:, ::stride, ::stride] > 0.5, maps[:, ::stride, ::stride]
    if not _both(m.ravel()):
        return {}
    fpr, tpr, _ = pixel_roc_curve(m, a)
    pfpr, pro, _ = pro_curve(m, a)
    return {"stride": stride, "roc": (fpr, tpr), "pro": (pfpr, pro)}


# --------------------------------------------------------------------------- html


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#eee}"
    "img{max-width:100%;margin:4px}.figs img{max-width:48%}"
)


def _html(
    title: str, report: dict[str, Any], figs: dict[str, str], image_rows: list[list[Any]], best_title: str
) -> str:
    metric_rows = _flatten(report["metrics"])
    curve_rows = _flatten(report["curve_metrics"])
    conf = report["confusion"]
    per_type = [
        [k, v["n"], v["n_defective"], v["flagged_rate"], v["mean_score"], v["image_auroc"]]
        for k, v in report["per_defect_type"].items()
    ]
    curves = "".join(
        f'<img src="{figs[k]}" alt="{k}">' for k in ("roc_image", "roc_pixel", "pro", "hist") if k in figs
    )
    examples = "".join(
        f'<h3>{h}</h3><img src="{figs[k]}" alt="{k}">'
        for k, h in (("worst", "Most wrong"), ("best", best_title))
        if k in figs
    )
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Decision threshold: <b>{report['threshold']:.6g}</b> (image flagged when score &ge; threshold). "
        f"{report['n_images']} images: {report['n_normal']} normal, {report['n_defective']} defective.</p>",
        "<h2>Metrics</h2>"
        + (_table(["metric", "value"], metric_rows) if metric_rows else "<p>none given</p>"),
        "<h3>Areas under the plotted curves</h3>" + _table(["curve", "value"], curve_rows),
        "<h2>At the threshold</h2>" + _table(list(conf), [list(conf.values())]),
        f"<h2>Curves</h2><div class='figs'>{curves}</div>",
        "<h2>Per defect type</h2>"
        + _table(
            ["type", "images", "defective", "flagged rate", "mean score", "image AUROC vs normals"], per_type
        ),
        f"<h2>Examples</h2>{examples}",
        "<h2>All images</h2>" + _table(["path", "type", "label", "score", "verdict"], image_rows),
        "</body></html>",
    ]
    return "\n".join(parts)


# --------------------------------------------------------------------------- entry point


def _curve_figures(
    out_dir: Path, labels: np.ndarray, scores: np.ndarray, masks: Any, maps: Any, max_pixels: int
) -> tuple[dict[str, str], dict[str, Any]]:
    """ROC / PRO figures and the areas under the plotted curves (pixel ones maybe subsampled)."""
    figs: dict[str, str] = {}
    areas: dict[str, Any] = {}
    if _both(labels):
        fpr, tpr, _ = roc_curve(labels, scores)
        areas["image_auroc"] = curve_area(fpr, tpr)
        figs["roc_image"] = _plot_roc(
            fpr, tpr, areas["image_auroc"], "Image-level ROC", out_dir / "roc_image.png"
        )
    curves = (
        {} if masks is None else _pixel_curves(np.asarray(masks), np.asarray(maps, np.float32), max_pixels)
    )
    if curves:
        stride = curves["stride"]
        areas["pixel_stride"] = stride
        areas["pixel_auroc"] = curve_area(*curves["roc"])
        areas["aupro"] = curve_area(*curves["pro"], x_max=_FPR_LIMIT) / _FPR_LIMIT
        note = "" if stride == 1 else f" (pixel stride {stride})"
        figs["roc_pixel"] = _plot_roc(
            *curves["roc"], areas["pixel_auroc"], "Pixel-level ROC" + note, out_dir / "roc_pixel.png"
        )
        figs["pro"] = _plot_pro(*curves["pro"], areas["aupro"], out_dir / "pro_curve.png", note)
    return figs, areas


def _flatten(metrics: dict[str, Any], prefix: str = "") -> list[list[Any]]:
    rows: list[list[Any]] = []
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", value])
    return rows


def _check_inputs(n: int, **arrays: Any) -> None:
    for name, value in arrays.items():
        if value is not None and len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries, expected {n} (one per image)")


def _pick_examples(
    labels: np.ndarray, scores: np.ndarray, threshold: float, n: int
) -> tuple[list[int], list[int]]:
    wrongness = np.where(labels, threshold - scores, scores - threshold)
    worst = [int(i) for i in np.argsort(-wrongness, kind="stable")[:n]]
    pool = np.flatnonzero(labels) if labels.any() else np.arange(labels.size)
    best = [int(i) for i in pool[np.argsort(wrongness[pool], kind="stable")][:n]]
    return worst, best


def write_report(
    out_dir: Path,
    *,
    image_labels: np.ndarray,
    image_scores: np.ndarray,
    paths: list[str],
    defect_types: list[str],
    images: np.ndarray,
    maps: np.ndarray,
    masks: np.ndarray | None,
    threshold: float,
    metrics: dict[str, Any],
    title: str,
    n_examples: int = 6,
    max_curve_pixels: int = 4_000_000,
) -> Path:
    """Write the evaluation report into ``out_dir`` and return the path of ``index.html``.

    ``metrics`` (any JSON-able dict, nested dicts allowed) is reported verbatim, in report.json under
    ``"metrics"`` and flattened (``a.b``) in the HTML table. The areas under the plotted curves go under
    ``"curve_metrics"``: image AUROC, pixel AUROC and AUPRO@0.3 (fractions, not percent). Pixel curves
    use every ``pixel_stride``-th pixel per axis when the maps exceed ``max_curve_pixels`` pixels, so
    the evaluator's exact metrics should be passed in ``metrics``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(image_labels).ravel() > 0.5
    scores = np.asarray(image_scores, dtype=np.float64).ravel()
    _check_inputs(
        labels.size,
        image_scores=scores,
        paths=paths,
        defect_types=defect_types,
        images=images,
        maps=maps,
        masks=masks,
    )
    pred = scores >= threshold
    figs, curve_metrics = _curve_figures(out_dir, labels, scores, masks, maps, max_curve_pixels)
    figs["hist"] = _plot_hist(labels, scores, threshold, out_dir / "score_hist.png")

    verdicts = [
        ("TP" if p else "FN") if y else ("FP" if p else "TN") for y, p in zip(labels, pred, strict=True)
    ]
    ctx = {
        "images": images,
        "maps": maps,
        "masks": masks,
        "vmin": float(np.min(maps)),
        "vmax": float(np.max(maps)),
        "names": [Path(p).name for p in paths],
        "types": list(defect_types),
        "scores": scores,
        "verdicts": verdicts,
    }
    worst, best = _pick_examples(labels, scores, threshold, max(1, n_examples))
    figs["worst"] = _plot_examples(
        worst, ctx, "Most wrong: missed defects / highest-scoring normals", out_dir / "examples_worst.png"
    )
    best_title = "Most confident detections" if labels.any() else "Lowest-scoring normals"
    figs["best"] = _plot_examples(best, ctx, best_title, out_dir / "examples_best.png")

    report = {
        "title": title,
        "threshold": float(threshold),
        "n_images": int(labels.size),
        "n_normal": int((~labels).sum()),
        "n_defective": int(labels.sum()),
        "metrics": metrics,
        "curve_metrics": curve_metrics,
        "confusion": _confusion(labels, pred),
        "per_defect_type": _per_type(labels, scores, pred, defect_types),
        "figures": figs,
        "images": [
            {"path": p, "defect_type": t, "label": int(y), "score": float(s), "verdict": v}
            for p, t, y, s, v in zip(paths, defect_types, labels, scores, verdicts, strict=True)
        ],
    }
    (out_dir / "report.json").write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    rows = [[r["path"], r["defect_type"], r["label"], r["score"], r["verdict"]] for r in report["images"]]
    index = out_dir / "index.html"
    index.write_text(_html(title, report, figs, rows, best_title), encoding="utf-8")
    return index
