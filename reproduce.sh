#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic benchmark, offline:
#   install (if needed) → generate benchmark → extract single- and multi-scale GeM features
#   → FAISS search → αQE / αDBA re-ranking → revisitop evaluation → results table + HTML page.
# SIZE=tiny|default|large and SEED=N pick the benchmark; DEVICE=0 uses CUDA device 0 when present.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv
export HF_HUB_OFFLINE=1

SIZE="${SIZE:-default}"
SEED="${SEED:-0}"
run() { .venv/bin/python experiments/v1.py --set synthetic_size="\"$SIZE\"" --set seed="$SEED" "$@"; }

start=$(date +%s)
run predict ${DEVICE:+-d "$DEVICE"}
run predict --ms ${DEVICE:+-d "$DEVICE"}
run evaluate --rerank none > /dev/null
run evaluate --ms --rerank none,aqe,adba+aqe > /dev/null

echo
echo "Built-in benchmark (synthetic, size=$SIZE, seed=$SEED), revisitop protocols, percent:"
.venv/bin/python -m retrieval.report table experiments/v1/results.csv --dataset "synthetic-$SIZE-s$SEED" \
    --select ss:none,ms:none,ms:aqe,ms:adba+aqe
echo
echo "Ranked thumbnails: experiments/v1/pretrained/eval/synthetic-$SIZE-s${SEED}_ms_adba+aqe/ranked.html"
echo "Done in $(( $(date +%s) - start )) s."
