"""Goal 3 of issue 6: images/s and data-loader wait of each training stage, from a bundle's manifest.

python bench/training_table.py runs/bottle_e2e
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(bundle: Path) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    seconds = manifest.get("metrics", {}).get("stage_seconds", {})
    lines = ["| stage | epochs | images/s (min-max) | loader wait, share of wall time (max) | stage s |"]
    lines.append("|---|---|---|---|---|")
    for stage, epochs in manifest["history"].items():
        ips = [e["images_per_s"] for e in epochs]
        wait = max(e["loader_wait"] for e in epochs)
        lines.append(
            f"| {stage} | {len(epochs)} | {min(ips):.1f}-{max(ips):.1f} | {100 * wait:.1f} % | "
            f"{seconds.get(stage, float('nan')):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
