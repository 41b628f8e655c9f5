#!/usr/bin/env bash
# Issue 6 goals 1 and 2 (memory-bank build, in-process inference), ours beside anomalib in one run, on an
# otherwise idle machine. Needs bench/setup_anomalib.sh done once, and a bundle trained on the same data.
#
#   bash bench/run_speed.sh                       # ~17 min on 2 cores, most of it anomalib's KCenterGreedy
#   PEER_IDX=runs/speed/speed_work/kc_idx.npy bash bench/run_speed.sh   # reuse its picks (no peer build time)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/mvtec_ad/bottle}
BUNDLE=${BUNDLE:-runs/acc_bottle/c_bundle}
OUT=${OUT:-runs/speed}
mkdir -p "$OUT"
peer_idx=()
[[ -n "${PEER_IDX:-}" ]] && peer_idx=(--peer-idx "$PEER_IDX")
.venv/bin/python bench/speed.py --data "$DATA" --bundle "$BUNDLE" --out "$OUT/speed.json" "${peer_idx[@]}"
bench/.venv-anomalib/bin/python bench/anomalib_patchcore.py --data "$DATA" --image-size 256 \
    --coreset-ratio 0.01 --backbone tf_efficientnet_lite0 --layers blocks.2 blocks.4 --seed 0 \
    --threads "$(.venv/bin/python -c 'import torch; print(torch.get_num_threads())')" \
    --coreset-idx "${PEER_IDX:-$OUT/speed_work/kc_idx.npy}" --out "$OUT/peer.json"
.venv/bin/python bench/speed_tables.py "$OUT/speed.json" "$OUT/peer.json"
