"""Why the CPU runs the backbone one image per call: per-image time of F at batch 1 and 8, steady state.

    python bench/backbone_batch.py --data ../shared/data/mvtec_ad/bottle

Times the pretrained F (default config, 256 px) on test images: one image per call, eight per call, and eight
through ``embed_images`` (what ``AnomalyModel.predict`` and the bank build use). Each variant is warmed up, then
timed over ``--repeats`` passes of 32 images; the best pass counts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import frozen_extractor, machine  # noqa: E402

from components.config import TocoadConfig  # noqa: E402
from components.datasets import discover  # noqa: E402
from components.patch_features import embed_images  # noqa: E402
from components.pipeline import data_loader  # noqa: E402


def per_image_ms(fn, images: torch.Tensor, batch: int, repeats: int) -> float:
    """Best-of-``repeats`` milliseconds per image of ``fn`` over ``images`` in batches of ``batch``."""
    for i in range(0, 2 * batch, batch):  # warm-up
        fn(images[i : i + batch])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch):
            fn(images[i : i + batch])
        best = min(best, (time.perf_counter() - start) / len(images))
    return 1000 * best


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = TocoadConfig()
    f = frozen_extractor(cfg)
    test = discover(args.data).test[:32]
    images = torch.cat(
        [b["image"] for b in data_loader(cfg.with_overrides(["runtime.num_workers=0"]), test, 8, False)]
    )
    print(machine())
    print("| F on CPU, per image | ms |\n|---|---|")
    print(f"| batch 1 | {per_image_ms(f, images, 1, args.repeats):.1f} |")
    print(f"| batch 8, one call | {per_image_ms(f, images, 8, args.repeats):.1f} |")
    print(
        f"| batch 8, embed_images | {per_image_ms(lambda x: embed_images(f, x), images, 8, args.repeats):.1f} |"
    )


if __name__ == "__main__":
    main()
