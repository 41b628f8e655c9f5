"""Throughput of the synthetic anomaly generator G, in images/s.

    python bench/generator_speed.py --size 256 --batch 32 --iters 5 --threads 1

Prints, per kind, the best batch time as images/s of wall-clock time and of process CPU time
(the latter is what one core delivers even when the machine is shared; on CUDA only wall time
means anything). Inputs are smooth random images, the settings are the defaults.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from components.generator import KINDS, GeneratorSettings, make_generator


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5, help="timed batches per kind (best one counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def best_times(fn, iters: int, device: torch.device) -> tuple[float, float]:
    """Best (wall, cpu) seconds of ``fn`` over ``iters`` runs after one warm-up."""
    fn()
    wall, cpu = float("inf"), float("inf")
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    low = torch.rand(args.batch, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = F.interpolate(low, size=(args.size, args.size), mode="bilinear", align_corners=False).to(device)
    print(f"G speed: batch {args.batch} x 3 x {args.size} x {args.size}, {args.threads} thread(s), {device}")
    for kind in KINDS if args.kind == "all" else (args.kind,):
        gen = make_generator(GeneratorSettings(kind=kind))
        rng = torch.Generator().manual_seed(0)
        wall, cpu = best_times(lambda gen=gen, rng=rng: gen(images, rng), args.iters, device)
        print(
            f"{kind:>10}: {args.batch / wall:7.1f} images/s wall, {args.batch / cpu:7.1f} images/s cpu-time"
        )


if __name__ == "__main__":
    main()
