"""One short GPU check: a training epoch of each stage, the memory-bank build with faiss-gpu, batch inference.

    bash bench/gpu_check.sh                   # writes $OUT/gpu_check.json (OUT defaults to runs/)
    PRECISION=fp32 bash bench/gpu_check.sh    # the same with another runtime.precision (default: auto)

The stages train in runtime.precision ``auto`` (bf16 autocast on GPUs with native bf16, fp16 with a GradScaler on
older ones); the JSON records which precision each stage ran in and the loss of its epoch (finite = no overflow).

On a machine without CUDA it says so and exits 0 (nothing to measure). Data: the generated demo set at 256 px,
so the check needs no downloads and no MVTec copy.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.config import TocoadConfig  # noqa: E402
from components.demo_data import make_demo_dataset  # noqa: E402
from components.device import autocast_dtype  # noqa: E402
from components.pipeline import load_artifacts, train  # noqa: E402
from components.predict import score_images  # noqa: E402


def main() -> None:
    out = Path(os.environ.get("OUT", "runs")) / "gpu_check.json"
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (the code falls back to the CPU; see the test suite)")
        return
    import faiss

    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_dataset(
            Path(tmp) / "data", n_train=64, n_test_good=8, n_test_defect=8, image_size=256
        )
        precision = os.environ.get("PRECISION", "auto")
        cfg = TocoadConfig().with_overrides(["runtime.device=cuda", "stage_d.epochs=1", "contrastive.epochs=1",
                                             "runtime.progress=false", f"runtime.precision={precision}"])  # fmt: skip
        result["precision_setting"] = precision
        result["autocast_dtype"] = str(autocast_dtype(torch.device("cuda"), precision))
        art = train(cfg, data, Path(tmp) / "bundle")
        result["precision"] = art.metrics.get("precision")  # per stage: bf16 / fp16 / fp32
        result["stage_seconds"] = art.metrics.get("stage_seconds")
        result["images_per_s"] = {k: v[-1].get("images_per_s") for k, v in art.history.items() if v}
        result["last_loss"] = {"d": art.history["d"][-1]["loss"], "c": art.history["c"][-1]["total"]}
        model = load_artifacts(Path(tmp) / "bundle", torch.device("cuda")).model(torch.device("cuda"))
        images = [np.random.default_rng(i).integers(0, 255, (256, 256, 3), dtype=np.uint8) for i in range(8)]
        for batch in (1, 8):
            score_images(model, images[:batch])
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(20):
                score_images(model, images[:batch])
            torch.cuda.synchronize()
            result[f"inference_ms_batch{batch}"] = (time.perf_counter() - start) / 20 * 1000
        result["index_type"] = type(model.index).__name__
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
