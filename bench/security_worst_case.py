"""Worst case of one hostile request against `tocoad serve` under the default limits: server CPU seconds and peak RSS.

usage: python bench/security_worst_case.py BUNDLE   (from the repository root; BUNDLE: a bundle at 256 px)

Each case starts a fresh server (one warm-up image), resets the server's peak RSS (clear_refs), sends one request
and reads the server's CPU seconds (/proc/PID/stat) and peak RSS (VmHWM). Linux only. bench/RESULTS.md section 9.
"""

import base64
import io
import socket
import struct
import subprocess
import sys
import time
import zlib

import httpx
import numpy as np
from PIL import Image


def chunk(kind, data):
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png16(side, colour=6, interlace=0, noise=False):
    """16-bit PNG, side x side (RGBA when colour=6); zero pixels, or noise (incompressible)."""
    ch = {0: 1, 2: 3, 6: 4}[colour]
    rng = np.random.default_rng(0)
    if interlace:
        passes = (
            (0, 0, 8, 8),
            (4, 0, 8, 8),
            (0, 4, 4, 8),
            (2, 0, 4, 4),
            (0, 2, 2, 4),
            (1, 0, 2, 2),
            (0, 1, 1, 2),
        )
        rows = [(-(-(side - y0) // dy), -(-(side - x0) // dx)) for x0, y0, dx, dy in passes]
    else:
        rows = [(side, side)]
    c, parts = zlib.compressobj(9), []
    for n, cols in rows:
        for _ in range(n):
            body = rng.bytes(cols * ch * 2) if noise else bytes(cols * ch * 2)
            parts.append(c.compress(b"\x00" + body))
    idat = b"".join(parts) + c.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, colour, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg(side, progressive):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(
        buf, format="JPEG", quality=100, progressive=progressive
    )
    return buf.getvalue()


def v1(images, return_map=False):
    return {
        "instances": [{"image": {"b64": base64.b64encode(b).decode()}} for b in images],
        "parameters": {"return_map": return_map},
    }


def _read(path: str) -> str:
    with open(path) as fh:
        return fh.read()


def cpu_s(pid):
    f = _read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / 100.0  # utime + stime in clock ticks (100/s), all threads


def mem_kb(pid, key):
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith(key):
            return int(line.split()[1])


def start(bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tocoad.cli", "serve", "--bundle", bundle, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(360):
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    httpx.post(url + "/v1/models/tocoad:predict", json=v1([jpeg(256, False)]), timeout=300).raise_for_status()
    return proc, url


def main(bundle):
    cases = {
        "8 x 1024^2 16-bit RGBA PNG: the pixel budget": lambda: v1([png16(1024)] * 8),
        "8 x 1024^2 16-bit RGBA PNG, Adam7 interlaced": lambda: v1([png16(1024, interlace=1)] * 8),
        "8 x 1024^2 progressive JPEG q100 (noise)": lambda: v1([jpeg(1024, True)] * 8),
        "32 x 512^2 16-bit RGBA PNG + return_map": lambda: v1([png16(512)] * 32, True),
        "32 x 512^2 16-bit RGBA PNG, Adam7 + return_map": lambda: v1([png16(512, interlace=1)] * 32, True),
        "1 x 2048^2 16-bit RGBA PNG (over the per-image limit)": lambda: v1([png16(2048)]),
        "9 x 1024^2 16-bit RGBA PNG (over the request budget)": lambda: v1([png16(1024)] * 9),
    }
    print(
        f"{'one request (fresh server, one warm-up image)':56s} {'body MB':>7s} {'status':>6s} {'wall s':>6s} "
        f"{'CPU s':>6s} {'peak RSS +MB':>12s} {'RSS before MB':>13s}"
    )
    for name, make in cases.items():
        body = make()
        size = len(httpx.Request("POST", "http://x", json=body).content) / 2**20
        proc, url = start(bundle)
        try:
            with open(f"/proc/{proc.pid}/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak (VmHWM) to the current RSS
            rss0, cpu0, t0 = mem_kb(proc.pid, "VmRSS:"), cpu_s(proc.pid), time.perf_counter()
            r = httpx.post(url + "/v1/models/tocoad:predict", json=body, timeout=600)
            wall, cpu = time.perf_counter() - t0, cpu_s(proc.pid) - cpu0
            peak = (mem_kb(proc.pid, "VmHWM:") - rss0) / 1024
            print(
                f"{name:56s} {size:7.2f} {r.status_code:6d} {wall:6.2f} {cpu:6.2f} {peak:12.0f} {rss0 / 1024:13.0f}"
            )
        finally:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    main(sys.argv[1])
