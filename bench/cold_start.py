"""Predictor cold start: from `tocoad serve` starting to its first answer, with the bundle in the local S3 server.

    python bench/cold_start.py --bundle runs/cold_bundle --repeats 3 --out runs/cold_start.json

Each repeat uses a fresh cache, so the bundle is downloaded and verified every time. The predictor's log line
gives the split: fetch (download + sha256 verification), load (safetensors + faiss index), warm-up (one image);
the rest is the process start (imports) and the HTTP server.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/cold_start.json"))
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="tocoad-cold-"))
    os.environ.update(TOCOAD_HOME=str(home), TOCOAD_PROGRESS="0")
    from components.predict import prepare  # noqa: F401 - warm the page cache of the imports once
    from storage.local_server import LocalS3
    from storage.registry import ModelRegistry
    from storage.store import ArtifactStore

    server = LocalS3(home / "s3")
    server.up()
    size_mb = sum(p.stat().st_size for p in args.bundle.rglob("*") if p.is_file()) / 2**20
    ModelRegistry(ArtifactStore(progress=False)).register("cold", args.bundle, alias="production")
    png = _png()
    runs = []
    try:
        for _ in range(args.repeats):
            shutil.rmtree(home / "cache", ignore_errors=True)
            port = _port()
            log = home / f"serve-{port}.log"
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "tocoad.cli", "serve", "--storage-uri",
                                     "s3://models/cold/production", "--port", str(port)],
                                    stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115  # fmt: skip
            try:
                while True:
                    try:
                        r = httpx.post(f"http://127.0.0.1:{port}/v1/models/tocoad:predict", content=png,
                                       headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
                        if r.status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.05)
                first_answer = time.perf_counter() - start
            finally:
                proc.terminate()
                proc.wait(30)
            split = dict(re.findall(r"(fetch_s|load_s|warmup_s) ([0-9.]+)", log.read_text()))
            runs.append({"first_answer_s": first_answer, **{k: float(v) for k, v in split.items()}})
    finally:
        server.down()
        shutil.rmtree(home, ignore_errors=True)
    med = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    med["process_and_http_s"] = round(
        med["first_answer_s"] - med["fetch_s"] - med["load_s"] - med["warmup_s"], 2
    )
    result = {"machine": f"{platform.node()}, {os.cpu_count()} cpus", "bundle": str(args.bundle),
              "bundle_mb": round(size_mb, 1), "repeats": runs, "median": med}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
