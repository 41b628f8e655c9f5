#!/usr/bin/env bash
# One short, prepared GPU check (issue 6): stage D and contrastive epochs, bank build with faiss-gpu, batch-1/8
# inference latency on a CUDA device. Needs the project's environment with CUDA torch and faiss-gpu
# (pip install -e '.[gpu]'). Writes ${OUT:-runs}/gpu_check.json; prints "no CUDA device" and exits 0 without one.
# Training runs in runtime.precision=${PRECISION:-auto} (auto: bf16 autocast, fp16 + GradScaler on pre-Ampere GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec timeout "${TIMEOUT:-480}" "$PY" bench/gpu_check.py
