#!/usr/bin/env bash
# The whole pipeline on the built-in synthetic benchmark, offline:
#   install (if needed) → generate benchmark → extract single- and multi-scale GeM features
#   → FAISS search → αQE / αDBA re-ranking → revisitop evaluation (v1, the pretrained net)
#   → fine-tune v2 (ArcFace on the benchmark's train split) → the same evaluation → one results table
#   → the re-ranking ablation on v2's multi-scale features (diffusion, k-reciprocal, l2019, sv, a chain)
#   → cleaning (Landmark2019): v2 on the noisy train split, that split cleaned with the net it trained,
#     v2 again on the cleaned list; both mAPs and the cleaner's precision / recall against the known noise.
# SIZE=tiny|default|large and SEED=N pick the benchmark; DEVICE=0 uses CUDA device 0 when present.
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/venv.sh
source scripts/venv.sh
ensure_venv serve  # the serve extra: the search service whose command is printed at the end
export HF_HUB_OFFLINE=1

SIZE="${SIZE:-default}"
SEED="${SEED:-0}"
run() { .venv/bin/python "experiments/$1.py" --set synthetic_size="\"$SIZE\"" --set seed="$SEED" "${@:2}"; }
job_checkpoint() { .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["checkpoint"])'; }
setting_of() { basename "$(dirname "$1")"; }  # experiments/v2/<setting>/best.pth → <setting>

start=$(date +%s)
run v1 predict ${DEVICE:+-d "$DEVICE"}
run v1 predict --ms ${DEVICE:+-d "$DEVICE"}
run v1 evaluate --rerank none > /dev/null
run v1 evaluate --ms --rerank none,aqe,adba+aqe > /dev/null
pretrained=$(( $(date +%s) - start ))

# v2: train, then multi-scale evaluation with its best checkpoint (the job's eval_rerank), then single-scale
ckpt=$(run v2 --set eval_rerank='["none","aqe","adba+aqe"]' job ${DEVICE:+-d "$DEVICE"} | job_checkpoint)
run v2 predict -m "$ckpt" ${DEVICE:+-d "$DEVICE"} > /dev/null
run v2 evaluate -m "$ckpt" --rerank none > /dev/null
# re-ranking ablation: l2019 votes with the train split's labels (predict --splits train describes it)
best_chain="adba+aqe+kreciprocal+sv"
run v2 predict -m "$ckpt" --ms --splits train ${DEVICE:+-d "$DEVICE"} > /dev/null
run v2 evaluate -m "$ckpt" --ms --rerank "diffusion,kreciprocal,l2019,sv,$best_chain" > /dev/null

# cleaning: the noisy split (GLDv2 layout, its noise listed), cleaned by the net trained on it
cleaned="experiments/v2/cleaned"
noisy_name="synthetic-$SIZE-s$SEED-noisy"
noisy_ckpt=$(run v2 --set train_set='"synthetic-noisy"' job ${DEVICE:+-d "$DEVICE"} | job_checkpoint)
run v2 clean --train-csv synthetic-noisy -m "$noisy_ckpt" --name "$noisy_name" --out-dir "$cleaned" \
    ${DEVICE:+-d "$DEVICE"} > /dev/null
clean_ckpt=$(run v2 --set train_set="\"$cleaned/$noisy_name.csv\"" job ${DEVICE:+-d "$DEVICE"} | job_checkpoint)

echo
echo "Built-in benchmark (synthetic, size=$SIZE, seed=$SEED), revisitop protocols, percent:"
.venv/bin/python -m retrieval.report table experiments/v1/results.csv experiments/v2/results.csv \
    --dataset "synthetic-$SIZE-s$SEED" --setting "pretrained,$(setting_of "$ckpt")" \
    --select ss:none,ms:none,ms:aqe,ms:adba+aqe
echo
echo "Re-ranking ablation (v2 multi-scale features; s/query includes sv's local features, cached for later chains):"
.venv/bin/python -m retrieval.report table experiments/v2/results.csv --dataset "synthetic-$SIZE-s$SEED" \
    --setting "$(setting_of "$ckpt")" --select "ms:none,ms:aqe,ms:adba+aqe,ms:diffusion,ms:kreciprocal,ms:l2019,ms:sv,ms:$best_chain"
echo
echo "Cleaning the noisy train split ($cleaned/$noisy_name.json), then v2 trained on the noisy and the cleaned list:"
.venv/bin/python - "$cleaned/$noisy_name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c, s = r["counts"], r["against_known_noise"]
print(f"  {c['images_before']} -> {c['images_after']} images, {c['landmarks_before']} -> {c['landmarks_after']} landmarks; "
      f"removed noise: precision {s['precision']:.3f}, recall {s['recall']:.3f} "
      f"(wrong labels {s['recall_wrong_label']:.3f}, distractors {s['recall_distractor']:.3f})")
PY
.venv/bin/python -m retrieval.report table experiments/v2/results.csv --dataset "synthetic-$SIZE-s$SEED" \
    --setting "$(setting_of "$noisy_ckpt"),$(setting_of "$clean_ckpt")" --select ms:none
setting=$(dirname "$ckpt")
echo
echo "Ranked thumbnails: experiments/v1/pretrained/eval/synthetic-$SIZE-s${SEED}_ms_adba+aqe/ranked.html"
echo "                   ${ckpt%.pth}/eval/synthetic-$SIZE-s${SEED}_ms_adba+aqe/ranked.html"
echo "Training: $setting/train_log.csv, $setting/train_plot.png"
echo "Done in $(( $(date +%s) - start )) s (pretrained net: $pretrained s)."
echo
echo "Search the index in a browser (then open http://127.0.0.1:8000/):"
echo "  .venv/bin/python experiments/v2.py --set synthetic_size='\"$SIZE\"' --set seed=$SEED serve -m $ckpt \\"
echo "      --features ${ckpt%.pth}/features/synthetic-$SIZE-s$SEED/db_ms.h5 --rerank aqe,adba+aqe"
