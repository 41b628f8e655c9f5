"""Greedy coreset speed against the memory-bandwidth floor and a naive per-step torch.cdist loop.

Each greedy step streams the projected bank once (``N * (p + 1) * bytes``), so the floor per step is that
many bytes over the machine's memory bandwidth (measured here with a large numpy copy, read + write bytes).
Steps are timed on ``--steps`` iterations and extrapolated to a ``--ratio`` coreset; the setup (projection,
centring) is timed separately. The naive reference (``torch.cdist`` per step, as in common PatchCore code)
runs ``--ref-steps`` steps on the same projected float32 input.

    python bench/coreset_speed.py                     # N=200_000, D=152 -> 128 dims
    python bench/coreset_speed.py --n-points 50000 --threads 1

On a shared machine the figures move with other processes' load; compare rows of one run, not across runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import copy_bandwidth  # noqa: E402

from components.coreset import greedy_coreset, random_projection  # noqa: E402


def time_greedy(x: torch.Tensor, steps: int, projection_dim: int, dtype: str) -> tuple[float, float]:
    """(setup seconds, seconds per greedy step) through the public API."""
    kw = dict(projection_dim=projection_dim, start=0, storage_dtype=dtype)
    greedy_coreset(x, n=2, **kw)  # warm-up: one-time costs must not count as setup
    t = time.perf_counter()
    greedy_coreset(x, n=1, **kw)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    greedy_coreset(x, n=steps + 1, **kw)
    return setup, max(time.perf_counter() - t - setup, 0.0) / steps


def time_cdist_reference(x: torch.Tensor, steps: int) -> float:
    """Seconds per step of the naive loop: cdist to the newest centre, running min, argmax."""
    mins = torch.full((x.shape[0],), math.inf)
    idx = 0
    t = time.perf_counter()
    for _ in range(steps):
        d = torch.cdist(x, x[idx : idx + 1])[:, 0]
        mins = torch.minimum(mins, d)
        idx = int(torch.argmax(mins))
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-points", type=int, default=200_000)
    ap.add_argument("--dims", type=int, default=152, help="input feature dims")
    ap.add_argument("--projection-dim", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.01, help="coreset share the totals are extrapolated to")
    ap.add_argument("--steps", type=int, default=200, help="greedy steps timed per dtype")
    ap.add_argument("--ref-steps", type=int, default=10, help="naive cdist steps timed")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n_points, args.dims, generator=gen)
    p = args.projection_dim if 0 < args.projection_dim < args.dims else args.dims
    total_steps = max(1, math.floor(args.n_points * args.ratio)) - 1
    bw = 2 * copy_bandwidth(repeats=3) / 1e9  # GB/s, bytes read plus bytes written
    ref = time_cdist_reference(random_projection(x, args.projection_dim), args.ref_steps)

    print(
        f"cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} load={os.getloadavg()[0]:.2f} "
        f"(shared machine: other processes may be running)"
    )
    print(
        f"machine copy bandwidth {bw:.1f} GB/s; coreset {args.ratio:g} = {total_steps + 1} points; "
        f"naive cdist {ref * 1e3:.1f} ms/step = {ref * total_steps:.1f} s total"
    )
    head = (
        f"{'N':>8} {'dims':>5} {'dtype':>9} {'setup s':>8} {'ms/step':>8} {'total s':>8} "
        f"{'GB/s':>6} {'mach GB/s':>9} {'floor ms':>8} {'vs floor':>8} {'cdist x':>8}"
    )
    print(head)
    for dtype in args.dtypes.split(","):
        setup, step = time_greedy(x, args.steps, args.projection_dim, dtype)
        nbytes = args.n_points * (p + 1) * torch.tensor([], dtype=getattr(torch, dtype)).element_size()
        floor = nbytes / (bw * 1e9)
        print(
            f"{args.n_points:>8} {p:>5} {dtype:>9} {setup:>8.2f} {step * 1e3:>8.2f} "
            f"{setup + step * total_steps:>8.1f} {nbytes / step / 1e9:>6.1f} {bw:>9.1f} {floor * 1e3:>8.2f} "
            f"{step / floor:>7.2f}x {ref / step:>7.1f}x"
        )


if __name__ == "__main__":
    main()
