"""Print the Markdown tables of bench/RESULTS.md from the JSON files the benchmarks wrote.

    python bench/report.py --acc bottle=runs/acc_bottle/results.json --acc tire=runs/acc_tire/results.json \
        --peer bottle=runs/anomalib/bottle.json --peer tire=runs/anomalib/tire.json --speed runs/speed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pairs(items: list[str]) -> dict[str, dict]:
    return {k: json.loads(Path(v).read_text()) for k, v in (i.split("=", 1) for i in items)}


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def accuracy_table(acc: dict[str, dict], peer: dict[str, dict]) -> str:
    rows = ["| data | variant | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|---|"]
    for name, res in acc.items():
        variants = res["variants"]
        for key, v in variants.items():
            m = v["tocoad"]
            label = f"({key}) {v['description']}" if key in ("a", "c") else f"{key}: {v['description']}"
            rows.append(
                f"| {name} | {label} | {_f(m.get('image_auroc'))} | {_f(m.get('pixel_auroc'))} | "
                f"{_f(m.get('aupro'))} |"
            )
            if key == "a" and "discriminator" in v:
                d = v["discriminator"]
                rows.append(
                    f"| {name} | (b) D alone | {_f(d.get('image_auroc'))} | {_f(d.get('pixel_auroc'))} | "
                    f"{_f(d.get('aupro'))} |"
                )
        if name in peer:
            p = peer[name]
            rows.append(
                f"| {name} | (d) anomalib PatchCore | {_f(100 * p['image_auroc'])} | {_f(100 * p['pixel_auroc'])} | "
                f"{_f(100 * p['pixel_aupro_0.3']) if p.get('pixel_aupro_0.3') is not None else '–'} |"
            )
    return "\n".join(rows)


def timing_table(acc: dict[str, dict]) -> str:
    rows = [
        "| data | variant | stage D s | stage C s | bank s | end to end s | evaluate s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in acc.items():
        for key, v in res["variants"].items():
            s = v["seconds"]
            total = sum(s.get(k, 0.0) for k in ("d", "c", "bank"))
            rows.append(
                f"| {name} | {key} | {_f(s.get('d'), 0)} | {_f(s.get('c'), 0)} | {_f(s.get('bank'), 0)} | "
                f"{_f(total, 0)} | {_f(s.get('evaluate'), 0)} |"
            )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--acc", action="append", default=[], help="NAME=results.json from bench/accuracy.py")
    p.add_argument("--peer", action="append", default=[], help="NAME=json from bench/anomalib_patchcore.py")
    p.add_argument("--speed", type=Path, help="json from bench/speed.py")
    args = p.parse_args()
    acc, peer = _pairs(args.acc), _pairs(args.peer)
    print(accuracy_table(acc, peer), end="\n\n")
    print(timing_table(acc), end="\n\n")
    if args.speed:
        s = json.loads(args.speed.read_text())
        c, i = s["coreset"], s["inference"]
        print(
            json.dumps(
                {
                    "machine": s["machine"],
                    "coreset": {k: v for k, v in c.items() if k != "anomalib_raw"},
                    "inference": i,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
