"""The goal-1 and goal-2 tables of bench/RESULTS.md from one ``bench/run_speed.sh`` run.

python bench/speed_tables.py runs/speed/speed.json runs/speed/peer.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _row(name: str, peer: float, ours: float, unit: str, digits: int = 1) -> str:
    ratio = peer / ours if ours else float("nan")
    return f"| {name} | {peer:.{digits}f} {unit} | {ours:.{digits}f} {unit} | {ratio:.2f}x |"


def tables(speed: dict, peer: dict) -> str:
    c, q = speed["coreset"], speed["quality"]
    peer_build = peer["fit_features_s"] + c["anomalib_seconds"]
    ours_build = speed["features"]["seconds"] + c["ours_seconds"]
    lines = [
        f"Machine: {speed['machine']['cpu']}, {speed['machine']['cores']} cores, "
        f"{speed['machine']['torch_threads']} torch threads; load at start {speed['machine']['load'][0]:.2f}.",
        "",
        "| memory-bank build, 1 % coreset | anomalib | tocoad | anomalib / tocoad |",
        "|---|---|---|---|",
        _row(f"feature extraction, {speed['features']['images']} images", peer["fit_features_s"],
             speed["features"]["seconds"], "s"),
        _row(f"coreset of {c['patches']:,} x {c['dims']} patches -> {c['coreset_size']:,}",
             c["anomalib_seconds"], c["ours_seconds"], "s"),
        _row("**build (features + coreset)**", peer_build, ours_build, "s"),
        f"| covering radius (tocoad's is exact greedy's) | {c['anomalib_radius']:.2f} | {c['ours_radius']:.2f} | "
        f"{c['anomalib_radius'] / c['ours_radius']:.3f} |",
        f"| image AUROC, same scorer (%) | {q['anomalib']['image_auroc']:.2f} | {q['ours']['image_auroc']:.2f} | "
        f"{q['ours']['image_auroc'] - q['anomalib']['image_auroc']:+.2f} points |",
        f"| pixel AUROC, same scorer (%) | {q['anomalib']['pixel_auroc']:.2f} | {q['ours']['pixel_auroc']:.2f} | "
        f"{q['ours']['pixel_auroc'] - q['anomalib']['pixel_auroc']:+.2f} points |",
        "",
        f"Reference in the same run: tocoad on a 128-d projection took {c['ours_proj128_seconds']:.1f} s for radius "
        f"{c['ours_proj128_radius']:.2f} ({100 * (c['ours_proj128_radius'] / c['ours_radius'] - 1):+.1f} % against "
        f"exact greedy); AUROC {q['ours_proj128']['image_auroc']:.2f} / {q['ours_proj128']['pixel_auroc']:.2f}.",
        f"Bandwidth: a 1 GiB numpy copy moves {speed['copy_bytes_per_s'] / 1e9:.1f} GB/s (bytes copied); the greedy "
        f"streams its bank at {c['ours_stream_bytes_per_s'] / 1e9:.1f} GB/s "
        f"({c['ours_stream_bytes_per_s'] / speed['copy_bytes_per_s']:.2f}x the copy rate).",
        "",
        "| in-process inference, maps included, per image | anomalib | tocoad | anomalib / tocoad |",
        "|---|---|---|---|",
        _row("batch 1", peer["latency_batch1"]["forward_ms_mean"], speed["inference"]["ms_per_image_batch1"], "ms"),
        _row("batch 8", peer["latency_batch8"]["forward_ms_per_image_mean"],
             speed["inference"]["ms_per_image_batch8"], "ms"),
    ]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    print(tables(json.loads(Path(sys.argv[1]).read_text()), json.loads(Path(sys.argv[2]).read_text())))
