"""Wall time of the retraining flow beside the same stages run directly by the CLI, on one dataset.

    python bench/flow_overhead.py --data ../shared/data/mvtec_ad/bottle --out runs/flow_overhead.json [--set ...]

(a) direct: ``tocoad train --stage d|c|bank`` and ``tocoad evaluate`` as four subprocesses on local folders;
(b) flow: ``tocoad data push`` then the Prefect flow (ephemeral server, local S3 server, local runner), the same
four stages as jobs reading and writing S3, plus validation, registration and the comparison.
Prefect's task runs give the flow's time per step, so the difference can be assigned. Use a fresh
``TOCOAD_HOME`` so nothing is cached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tocoad.cli", *args], check=True, env={**os.environ, "TOCOAD_PROGRESS": "0"}
    )
    return time.perf_counter() - start


def direct(data: Path, work: Path, sets: list[str]) -> dict[str, float]:
    """The four stages as CLI calls on local folders."""
    s = [a for item in sets for a in ("--set", item)]
    out = {"d": _run(["train", "--stage", "d", "--data", str(data), "--out", str(work / "d"), *s])}
    out["c"] = _run(
        [
            "train",
            "--stage",
            "c",
            "--data",
            str(data),
            "--from",
            str(work / "d"),
            "--out",
            str(work / "c"),
            *s,
        ]
    )
    out["bank"] = _run(
        [
            "train",
            "--stage",
            "bank",
            "--data",
            str(data),
            "--from",
            str(work / "c"),
            "--out",
            str(work / "b"),
            *s,
        ]
    )
    out["evaluate"] = _run(
        ["evaluate", "--bundle", str(work / "b"), "--data", str(data), "--out", str(work / "r"), "--quiet"]
    )
    return out  # fmt: skip


def flow(data: Path, name: str, sets: list[str]) -> dict[str, float]:
    """Push, then the flow; per-task wall times from Prefect."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from storage.datasets import DatasetRegistry
    from storage.store import ArtifactStore
    from tocoad.cli_flow import config_dict, run_flow

    start = time.perf_counter()
    version = DatasetRegistry(ArtifactStore(progress=False)).push(data, name)
    out = {"push": time.perf_counter() - start}
    start = time.perf_counter()
    from prefect import runtime  # noqa: F401 - imported for the flow run id below

    state = run_flow(name, name, config_dict(None, sets), dataset_version=version, return_state=True)
    out["flow_total"] = time.perf_counter() - start
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        for run in runs:
            key = run.name
            out[key] = (
                (run.end_time - run.start_time).total_seconds() if run.end_time and run.start_time else None
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--name", default="overhead")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--out", type=Path, default=Path("runs/flow_overhead.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        direct_s = direct(args.data, Path(tmp), args.set)
    flow_s = flow(args.data, args.name, args.set)
    result = {
        "machine": f"{platform.node()}, {os.cpu_count()} cpus",
        "data": str(args.data),
        "direct_s": {k: round(v, 1) for k, v in direct_s.items()},
        "direct_total_s": round(sum(direct_s.values()), 1),
        "flow_s": {k: round(v, 1) if v is not None else None for k, v in flow_s.items()},
    }
    result["ratio_flow_over_direct"] = round(flow_s["flow_total"] / result["direct_total_s"], 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
