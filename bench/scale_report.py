"""Tables and plots of ``bench/scale.py`` results (goal 4 of issue 6).

    python bench/scale_report.py runs/scale/bottle.json runs/scale/tire.json --figures bench/figures

Per data set: one row per bank size and index kind at the search setting the code uses by default
(``IVF_NPROBE``, ``HNSW_EF_SEARCH``), with AUROC retention against Flat on the same bank; plus two plots
(query latency and recall@1 against bank size, every setting measured).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from components.nn_index import HNSW_EF_SEARCH, IVF_NPROBE

DEFAULT = {"flat": None, "ivf_flat": IVF_NPROBE, "ivf_pq": IVF_NPROBE, "hnsw": HNSW_EF_SEARCH}
PARAM = {"flat": "", "ivf_flat": "nprobe", "ivf_pq": "nprobe", "hnsw": "efSearch"}


def table(result: dict) -> str:
    rows = result["rows"]
    flat = {r["size"]: r for r in rows if r["kind"] == "flat"}
    lines = [
        "| patches | index | build s | memory MB | ms / image | x Flat-40k | recall@1 | image AUROC | "
        "pixel AUROC | loss vs Flat (image / pixel, points) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = flat.get(40000, {}).get("latency_ms")
    for r in rows:
        if r["param"] != DEFAULT[r["kind"]]:
            continue
        f = flat.get(r["size"])
        loss = (
            f"{f['image_auroc'] - r['image_auroc']:.2f} / {f['pixel_auroc'] - r['pixel_auroc']:.3f}"
            if f
            else "–"
        )
        name = r["kind"] + (f" ({PARAM[r['kind']]} {r['param']})" if r["param"] else "")
        name += ", farthest refined" if r.get("refined") else ""
        vs_ref = f"{r['latency_ms'] / ref:.2f}" if ref else "–"
        lines.append(
            f"| {r['size']:,} | {name} | {r['build_s']:.1f} | {r['bytes'] / 1e6:.0f} | {r['latency_ms']:.1f} | "
            f"{vs_ref} | {r.get('recall_at_1', float('nan')):.4f} | {r['image_auroc']:.2f} | "
            f"{r['pixel_auroc']:.3f} | {loss} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, label, log in (
        ("latency_ms", "query latency per image (ms)", True),
        ("recall_at_1", "recall@1", False),
    ):
        fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
        for ax, (name, result) in zip(axes[0], results.items(), strict=True):
            ax.set_prop_cycle(color=plt.cm.tab20.colors)
            series: dict[str, list] = {}
            for r in result["rows"]:
                key = r["kind"] + (f" {PARAM[r['kind']]}={r['param']}" if r["param"] else "")
                key += " refined" if r.get("refined") else ""
                series.setdefault(key, []).append((r["size"], r.get(metric)))
            for key, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=key)
            ax.set_xscale("log")
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("bank size (patches)")
            ax.set_ylabel(label)
            ax.set_title(name)
            ax.grid(alpha=0.3, which="both")
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / f"scale_{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--figures", type=Path, default=None)
    args = p.parse_args()
    results = {Path(r["data"]).name: r for r in (json.loads(f.read_text()) for f in args.results)}
    for name, result in results.items():
        print(
            f"\n**{name}** (pool {result['pool_patches']:,} patches from {result['variants']} variants, "
            f"{result['test_images']} test images)\n"
        )
        print(table(result))
    if args.figures:
        for path in plot(results, args.figures):
            print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
