#!/usr/bin/env bash
# The speed tables of bench/RESULTS.md, ours beside anomalib, on an otherwise idle machine.
#
#   bash bench/run_speed.sh                 # full: anomalib fits (its KCenterGreedy takes ~12 min on 2 cores)
#   PEER_BANK=b.npy PEER_IDX=i.npy bash bench/run_speed.sh   # reuse a saved peer bank and its KCenterGreedy picks
#
# Needs bench/setup_anomalib.sh done once, and a bundle trained on the same data (BUNDLE).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/mvtec_ad/bottle}
BUNDLE=${BUNDLE:-runs/acc_bottle/c_bundle}
OUT=${OUT:-runs/speed}
PEER=bench/.venv-anomalib/bin/python
mkdir -p "$OUT"
common=(--data "$DATA" --image-size 256 --coreset-ratio 0.01 --backbone tf_efficientnet_lite0
        --layers blocks.2 blocks.4 --seed 0 --out "$OUT/peer.json")
if [[ -n "${PEER_BANK:-}" && -n "${PEER_IDX:-}" ]]; then
  "$PEER" bench/anomalib_patchcore.py "${common[@]}" --coreset-idx "$PEER_IDX"
  .venv/bin/python bench/speed.py --data "$DATA" --bundle "$BUNDLE" --out "$OUT/speed.json" --no-peer \
      --features "$PEER_BANK" --peer-idx "$PEER_IDX" --peer-json "$OUT/peer.json"
else
  "$PEER" bench/anomalib_patchcore.py "${common[@]}" --save-bank "$OUT/peer_bank.npy"
  .venv/bin/python bench/speed.py --data "$DATA" --bundle "$BUNDLE" --out "$OUT/speed.json" \
      --features "$OUT/peer_bank.npy" --peer-json "$OUT/peer.json"
fi
