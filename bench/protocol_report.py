"""Tables and a plot from bench/protocol.py's results: mean +- sd per variant, paired deltas and verdicts.

    python bench/protocol_report.py runs/protocol/*/results.json --plot bench/figures/protocol_deltas.png

Verdict per set and metric: **gain** when the mean paired delta against frozen F exceeds twice the frozen
baseline's sd over coreset seeds, **loss** when it is below minus that, else **no difference** (issue 11's rule).
Variant cells (training seed t, coreset seed k) are paired with frozen's cell of coreset seed k.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from statistics import fmean, stdev

METRICS = (("image_auroc", "image"), ("pixel_auroc", "pixel"), ("aupro", "AUPRO"))
RATES = (
    ("recall_at_threshold", "recall@thr"),
    ("roc_recall_at_target", "ROC recall@target"),
    ("false_positive_rate_at_threshold", "false alarms@thr"),
)


def _sd(values: list[float]) -> float:
    return stdev(values) if len(values) > 1 else 0.0


def threshold_verdict(metrics: dict, rate: float = 0.01) -> str | None:
    """Issue 11's target for the calibrated threshold, or None without one: false alarms on the good test images
    within 2x the target rate (or within 2 images of it), and recall at least 80 % of the test ROC's recall at the
    target rate."""
    if "recall_at_threshold" not in metrics or "roc_recall_at_target" not in metrics:
        return None
    fa, fpr = metrics["false_alarms_at_threshold"], metrics["false_positive_rate_at_threshold"]
    n_good = round(100.0 * fa / fpr) if fpr > 0 else None
    fa_ok = n_good is None or fa <= max(2 * rate * n_good, rate * n_good + 2)
    recall_ok = metrics["recall_at_threshold"] >= 0.8 * metrics["roc_recall_at_target"]
    return "met" if fa_ok and recall_ok else "false alarms" if not fa_ok else "recall"


def summarise(results: dict) -> dict:
    """{variant: {metric: {mean, sd, delta, delta_sd, verdict, n}}} for one set."""
    cells = list(results["cells"].values())
    frozen = {c["coreset_seed"]: c["metrics"] for c in cells if c["variant"] == "frozen"}
    out: dict = {}
    for variant in dict.fromkeys(c["variant"] for c in cells):
        mine = [c for c in cells if c["variant"] == variant]
        row: dict = {"description": mine[0]["description"], "train_s": fmean(c["train_s"] for c in mine)}
        row["query_ms"] = fmean([c["query_ms"] for c in mine if "query_ms" in c] or [math.nan])
        row["bank_patches"] = fmean(c["bank_patches"] for c in mine)
        checks = [threshold_verdict(c["metrics"]) for c in mine]
        row["threshold_target"] = ", ".join(sorted({v for v in checks if v})) or "–"
        for key, _ in METRICS + RATES:
            values = [c["metrics"][key] for c in mine if key in c["metrics"]]
            if not values:
                continue
            entry = {"mean": fmean(values), "sd": _sd(values), "n": len(values)}
            base = [
                frozen[c["coreset_seed"]][key]
                for c in mine
                if key in c["metrics"] and key in frozen.get(c["coreset_seed"], {})
            ]
            if key in dict(METRICS) and len(base) == len(values) and variant != "frozen":
                deltas = [v - b for v, b in zip(values, base, strict=True)]
                spread = _sd([m[key] for m in frozen.values()])
                mean = fmean(deltas)
                verdict = "gain" if mean > 2 * spread else "loss" if mean < -2 * spread else "no difference"
                entry.update(delta=mean, delta_sd=_sd(deltas), frozen_sd=spread, verdict=verdict)
            row[key] = entry
        out[variant] = row
    return out


def markdown(summaries: dict[str, dict]) -> str:
    lines = [
        "| set | variant | image AUROC | pixel AUROC | AUPRO | recall@thr | ROC recall@target | false alarms@thr "
        "| threshold target | stage 2 s | cells |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in summaries.items():
        for variant, row in summary.items():
            cols = []
            for key, _ in METRICS:
                e = row.get(key)
                if e is None:
                    cols.append("–")
                    continue
                text = f"{e['mean']:.2f} ± {e['sd']:.2f}"
                if "delta" in e:
                    text += f"<br>Δ {e['delta']:+.2f} ± {e['delta_sd']:.2f} **{e['verdict']}**"
                cols.append(text)
            for key, _ in RATES:
                e = row.get(key)
                cols.append("–" if e is None else f"{e['mean']:.1f}")
            n = row.get("image_auroc", {}).get("n", 0)
            lines.append(
                f"| {name} | {variant} | "
                + " | ".join(cols)
                + f" | {row['threshold_target']} | {row['train_s']:.0f} | {n} |"
            )
    return "\n".join(lines)


def plot(summaries: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(summaries)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], METRICS, strict=True):
        variants = sorted({v for s in summaries.values() for v in s if v != "frozen"})
        width = 0.8 / max(1, len(variants))
        for i, variant in enumerate(variants):
            xs, ys, es = [], [], []
            for j, name in enumerate(sets):
                e = summaries[name].get(variant, {}).get(key)
                if e and "delta" in e:
                    xs.append(j + (i - (len(variants) - 1) / 2) * width)
                    ys.append(e["delta"])
                    es.append(e["delta_sd"])
            ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=variant)
        for j, name in enumerate(sets):
            spread = summaries[name]["frozen"][key]["sd"] if key in summaries[name].get("frozen", {}) else 0
            ax.fill_between([j - 0.45, j + 0.45], -2 * spread, 2 * spread, color="0.85", zorder=0)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(sets)), sets)
        ax.set_title(f"{label}: paired delta vs frozen F (points)")
    axes[0][0].legend(fontsize=8)
    fig.text(0.01, 0.01, "grey band: +- 2 sd of frozen F over coreset seeds (no-difference zone)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="results.json files of bench/protocol.py")
    p.add_argument("--plot", type=Path, help="write the delta plot here (PNG)")
    p.add_argument("--json", type=Path, help="write the summaries here")
    args = p.parse_args()
    summaries = {path.parent.name: summarise(json.loads(path.read_text())) for path in args.results}
    print(markdown(summaries))
    if args.plot:
        plot(summaries, args.plot)
    if args.json:
        args.json.write_text(json.dumps(summaries, indent=2))


if __name__ == "__main__":
    main()
