"""Registry upload/download throughput beside the raw minio SDK (``fput_object``/``fget_object``), same bytes.

    python bench/registry_speed.py --bundle runs/bottle_e2e [--synthetic-mb 256] [--repeats 5] --out runs/registry_speed.json

Starts (or reuses) the local SeaweedFS server in ``$TOCOAD_HOME``. For each bundle: the registry's ``register``
(sha256 streamed while sending, manifest last) and ``pull`` (streamed verify, atomic rename) against raw
``fput_object`` / ``fget_object`` of the same files, alternating, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.bundle import write_bundle  # noqa: E402
from storage.registry import ModelRegistry  # noqa: E402
from storage.settings import resolve_settings  # noqa: E402
from storage.store import ArtifactStore  # noqa: E402


def synthetic_bundle(path: Path, megabytes: int) -> Path:
    """A bundle of one large random file plus a small one (a stand-in for a big memory bank)."""

    def populate(tmp: Path) -> None:
        with open(tmp / "memory_bank.safetensors", "wb") as fh:
            for _ in range(megabytes):
                fh.write(os.urandom(2**20))
        (tmp / "calibration.json").write_text("{}")

    return write_bundle(path, populate, {"metrics": {}})


def measure(bundle: Path, repeats: int, scratch: Path) -> dict:
    store = ArtifactStore(resolve_settings("admin"), progress=False)
    reg = ModelRegistry(store)
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    times: dict[str, list[float]] = {"registry_up": [], "raw_up": [], "registry_down": [], "raw_down": []}
    for r in range(repeats):
        name = f"bench-{bundle.name.lower().replace('_', '-')}-{r}"
        t = time.perf_counter()
        info = reg.register(name, bundle)
        times["registry_up"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for p in files:
            store.client.fput_object("models", f"raw-{name}/{p.relative_to(bundle)}", str(p))
        times["raw_up"].append(time.perf_counter() - t)
        dest = scratch / f"reg-{r}"
        t = time.perf_counter()
        reg.pull(name, info.version, dest)
        times["registry_down"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for p in files:
            store.client.fget_object(
                "models", f"raw-{name}/{p.relative_to(bundle)}", str(scratch / f"raw-{r}" / p.name)
            )
        times["raw_down"].append(time.perf_counter() - t)
        shutil.rmtree(dest)
        shutil.rmtree(scratch / f"raw-{r}")
        store.delete_prefix("models", f"{name}/")
        store.delete_prefix("models", f"raw-{name}/")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "bundle": str(bundle),
        "files": len(files),
        "megabytes": round(size / 2**20, 2),
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "mb_per_s": {k: round(size / 2**20 / v, 1) for k, v in med.items()},
        "overhead_up": round(med["registry_up"] / med["raw_up"], 2),
        "overhead_down": round(med["registry_down"] / med["raw_down"], 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, action="append", default=[], help="a real bundle (repeatable)")
    ap.add_argument(
        "--synthetic-mb", type=int, default=256, help="also a synthetic bundle this large (0: none)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("runs/registry_speed.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        bundles = list(args.bundle)
        if args.synthetic_mb:
            bundles.append(synthetic_bundle(scratch / f"synthetic_{args.synthetic_mb}mb", args.synthetic_mb))
        results = [measure(b, args.repeats, scratch) for b in bundles]
    out = {"machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.processor() or platform.machine()}",
           "server": "SeaweedFS weed mini on loopback", "results": results}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
