"""Accuracy and ablations on real data: every variant trained and evaluated in one run, with stage timings.

    python bench/accuracy.py --data ../shared/data/mvtec_ad/bottle --out bench/results/bottle [--variants a,c]

Variants share stage outputs where the config allows it (all of them reuse stage D trained with the Perlin
generator, and the 10 % coreset reuses the full model's stage C), so each is what ``tocoad train`` would make.
Writes ``<out>/results.json`` (metrics and seconds per stage and variant); ``bench/report.py`` turns the results
into the tables of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from components.config import TocoadConfig
from components.evaluate import evaluate
from components.pipeline import train

# name -> (description, stage D source, stage C source, overrides)
VARIANTS: dict[str, tuple[str, str | None, str | None, list[str]]] = {
    "a": ("frozen-F PatchCore (stage 2 off)", "d", None, ["contrastive.enabled=false"]),
    "c": ("full two-stage ToCoAD", "d", None, []),
    "no_guide": ("negative guide off", "d", None, ["contrastive.guide=false"]),
    "no_simsiam": ("contrastive (SimSiam) loss off", "d", None, ["contrastive.simsiam_weight=0"]),
    "coreset10": ("full, 10 % coreset", "d", "c", ["bank.coreset_ratio=0.1"]),
    "cutpaste": ("CutPaste generator", None, None, ["generator.kind=cutpaste"]),
    "rectangle": ("rectangle generator", None, None, ["generator.kind=rectangle"]),
}


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def run(data: Path, out: Path, variants: list[str], base: list[str]) -> dict:
    """Train and evaluate each variant; return {variant: {metrics, seconds}}."""
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"data": str(data), "torch_threads": torch.get_num_threads(), "variants": {}}
    if (out / "results.json").is_file():  # continue an earlier run: keep its variants and stage outputs
        results["variants"] = json.loads((out / "results.json").read_text())["variants"]
    made: dict[str, Path] = {}
    for key, first in (("d", "a_d"), ("c", "c_c")):
        if (out / first / "manifest.json").is_file():
            made[key] = out / first

    def stage(name: str, overrides: list[str], previous: Path | None, dest: Path) -> float:
        cfg = TocoadConfig().with_overrides(base + overrides)
        return _timed(train, cfg, data, dest, stage=name, previous=previous, overwrite=True)

    for key in variants:
        desc, d_src, c_src, overrides = VARIANTS[key]
        seconds: dict[str, float] = {}
        if d_src == "d" and "d" in made:
            d_dir = made["d"]
        else:
            d_dir = out / ("a_d" if d_src == "d" else f"{key}_d")
            seconds["d"] = stage("d", overrides, None, d_dir)
            if d_src == "d":
                made["d"] = d_dir
        if c_src == "c" and "c" in made:
            c_dir = made["c"]
        else:
            c_dir = out / f"{key}_c"
            seconds["c"] = stage("c", overrides, d_dir, c_dir)
            if key == "c":
                made["c"] = c_dir
        bundle = out / f"{key}_bundle"
        seconds["bank"] = stage("bank", overrides, c_dir, bundle)
        start = time.perf_counter()
        metrics = evaluate(bundle, data, out / f"{key}_report", progress=False)
        seconds["evaluate"] = time.perf_counter() - start
        results["variants"][key] = {
            "description": desc,
            "overrides": overrides,
            "seconds": seconds,
            **metrics,
        }
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(key, desc, seconds, metrics["tocoad"], flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, from {','.join(VARIANTS)}"
    )
    p.add_argument("--set", action="append", default=[], help="extra config override for every variant")
    args = p.parse_args()
    run(args.data, args.out, args.variants.split(","), args.set + ["runtime.progress=false"])


if __name__ == "__main__":
    main()
