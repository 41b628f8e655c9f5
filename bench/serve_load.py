"""Predictor load test on loopback: throughput and p50/p95/p99 latency at 1, 2, 4 and 8 concurrent clients,
beside the in-process predict throughput of the same model; peak memory of the server.

    python bench/serve_load.py --bundle runs/bottle_e2e --images ../shared/data/mvtec_ad/bottle/test \
        --seconds 20 --out runs/serve_load.json

Each client sends one PNG per request (raw body, ``Content-Type: image/png``) in a loop. The clients run in
this process (threads, httpx), the server in another (``tocoad serve``); on a 2-core machine they share the CPU.

``--reloads N`` also reloads the served bundle N times, evenly spread over each load phase, through the control
endpoint with a token (issue 12): every request must still get its answer while the model is swapped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_process(bundle: Path, pngs: list[Path], seconds: float) -> dict:
    """Batch-1 predict in this process, the same decode path as the server (bytes -> decode -> score)."""
    import torch

    from components.images import decode_image
    from components.pipeline import load_artifacts
    from components.predict import score_images

    torch.set_num_threads(int(os.environ.get("TOCOAD_BENCH_THREADS", "2")))
    model = load_artifacts(bundle).model()
    data = [p.read_bytes() for p in pngs]
    score_images(model, [decode_image(data[0])])
    lat, end, i = [], time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        t = time.perf_counter()
        score_images(model, [decode_image(data[i % len(data)])])
        lat.append(time.perf_counter() - t)
        i += 1
    return {"images_per_s": len(lat) / sum(lat), "p50_ms": 1000 * statistics.median(lat)}


def reloader(url: str, bundle: Path, token: str, count: int, seconds: float, out: dict) -> threading.Thread:
    """A thread that reloads ``bundle`` ``count`` times over ``seconds``; counts answers by status in ``out``."""

    def run() -> None:
        with httpx.Client(timeout=120) as c:
            for _ in range(count):
                time.sleep(seconds / (count + 1))
                r = c.post(f"{url}/v2/models/tocoad/reload", json={"storage_uri": str(bundle)},
                           headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                out[r.status_code] = out.get(r.status_code, 0) + 1

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def load(url: str, pngs: list[Path], clients: int, seconds: float, reload=None) -> dict:
    """``reload``: (bundle, token, count) to reload the model during the phase (see :func:`reloader`)."""
    data = [p.read_bytes() for p in pngs]
    lat: list[float] = []
    errors = [0]
    stop = time.perf_counter() + seconds

    def worker(k: int) -> None:
        with httpx.Client(timeout=60) as c:
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = c.post(f"{url}/v1/models/tocoad:predict", content=data[i % len(data)],
                           headers={"Content-Type": "image/png"})  # fmt: skip
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t)
                else:
                    errors[0] += 1
                i += clients

    start = time.perf_counter()
    reloads: dict = {}
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    if reload is not None:
        threads.append(reloader(url, *reload, seconds, reloads))
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = np.percentile(np.asarray(lat) * 1000, [50, 95, 99])
    row = {"clients": clients, "requests": len(lat), "errors": errors[0], "images_per_s": len(lat) / wall,
           "p50_ms": q[0], "p95_ms": q[1], "p99_ms": q[2]}  # fmt: skip
    if reload is not None:
        row["reloads_by_status"] = {str(k): v for k, v in reloads.items()}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument(
        "--images", type=Path, required=True, help="folder of PNG test images (searched recursively)"
    )
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--reloads", type=int, default=0, help="reload the model this many times per load phase")
    ap.add_argument("--out", type=Path, default=Path("runs/serve_load.json"))
    args = ap.parse_args()
    pngs = sorted(args.images.rglob("*.png"))[:64]
    port = _port()
    url = f"http://127.0.0.1:{port}"
    token = secrets.token_hex(16)
    token_file = Path(tempfile.mkdtemp()) / "token"
    token_file.write_text(token)
    env = {**os.environ, "TOCOAD_SERVE_CONTROL_TOKEN_FILE": str(token_file)}
    server = subprocess.Popen([sys.executable, "-m", "tocoad.cli", "serve", "--bundle", str(args.bundle),
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=env)  # fmt: skip
    # reloads name the folder the server was started on (the only local path the control endpoint accepts)
    reload = (args.bundle, token, args.reloads) if args.reloads else None
    try:
        t0 = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{url}/v2/models/tocoad/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        cold_start = time.perf_counter() - t0
        load(url, pngs, 1, 3)  # warm-up
        rows = [load(url, pngs, c, args.seconds, reload) for c in args.clients]
        peak = _peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    inproc = in_process(args.bundle, pngs, args.seconds)
    result = {
        "machine": f"{platform.node()}, {os.cpu_count()} cpus, {platform.machine()}",
        "bundle": str(args.bundle),
        "server_ready_s": round(cold_start, 1),
        "server_peak_rss_mb": round(peak, 1),
        "http": [{k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
        "in_process": {k: round(v, 2) for k, v in inproc.items()},
        "http_overhead_ratio_batch1": round(inproc["images_per_s"] / rows[0]["images_per_s"], 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
