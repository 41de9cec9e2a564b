#!/usr/bin/env bash
# The runs of issue 13 in one go: base, continued, oracles, PHDS; then the
# logits check and an `olmoe sweep` (test split, k = 1..k_pre, and the cloze
# probe scored in C++) of each, and `olmoe sweep --compare` of all: Markdown
# tables (OUT/compare.md) and one plot with one line per model (OUT/compare.svg).
#
#   run_experiments.sh OUT_ROOT [OLMOE]
#
# Settings by environment (defaults: the planned full size, see README.md):
#   DATA        data dir (default ~/.cache/kdial/phds; prepare_data.py and
#               train_tokenizer.py must have run)
#   THREADS     torch threads (2)       SEED       (1234)
#   SIZE        size flags of train.py  ("--hidden 256 --layers 4 --heads 4 --experts 16 --top-k 4 --ffn 256")
#   BATCH       ("--batch 16 --seq 256")
#   BASE_STEPS  (1200)  BASE_LR (3e-3)  BASE_WARMUP (100)
#   FT_STEPS    (240)   FT_LR   (1e-3)  FT_WARMUP   (20)
#   ORACLE_KS   ("1 2 3")  PHDS_KS ("1,2,3,4")  ANNEAL_STEPS (FT_STEPS / 10)  ANCHOR_K (1)
#   SWEEP_KS    ("1,2,3,4")  SWEEP_TEXT (DATA/test.txt)  DTYPE (BF16)
#   SWEEP_CONTEXT (256: windows of the training sequence length; longer windows
#               put positions the model never saw in training into the numbers)
#   CLOZE_ITEMS (all of DATA/cloze.jsonl, made by make_cloze.py if absent)
#   SKIP_TRAIN  (unset; 1: only the evaluation, on checkpoints already in OUT_ROOT)
#   PY_CLOZE    (unset; 1: also score the probe with score_cloze.py, PyTorch,
#               a cross-check of the C++ numbers)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py=/usr/bin/python3
out="${1:?usage: run_experiments.sh OUT_ROOT [OLMOE]}"
olmoe="${2:-$here/../../build/bin/olmoe}"
DATA="${DATA:-$HOME/.cache/kdial/phds}"
THREADS="${THREADS:-2}"
SEED="${SEED:-1234}"
SIZE="${SIZE:---hidden 256 --layers 4 --heads 4 --experts 16 --top-k 4 --ffn 256}"
BATCH="${BATCH:---batch 16 --seq 256}"
BASE_STEPS="${BASE_STEPS:-1200}" BASE_LR="${BASE_LR:-3e-3}" BASE_WARMUP="${BASE_WARMUP:-100}"
FT_STEPS="${FT_STEPS:-240}" FT_LR="${FT_LR:-1e-3}" FT_WARMUP="${FT_WARMUP:-20}"
ORACLE_KS="${ORACLE_KS:-1 2 3}" PHDS_KS="${PHDS_KS:-1,2,3,4}"
ANNEAL_STEPS="${ANNEAL_STEPS:-$((FT_STEPS / 10))}" ANCHOR_K="${ANCHOR_K:-1}"
SWEEP_KS="${SWEEP_KS:-1,2,3,4}" SWEEP_TEXT="${SWEEP_TEXT:-$DATA/test.txt}" DTYPE="${DTYPE:-BF16}"
SWEEP_CONTEXT="${SWEEP_CONTEXT:-256}"
mkdir -p "$out"
common=(--data "$DATA" --seed "$SEED" --threads "$THREADS" $BATCH --dtype "$DTYPE")
ft=("${common[@]}" --init "$out/base" --steps "$FT_STEPS" --lr "$FT_LR" --warmup "$FT_WARMUP")

cd "$here"
if [ -z "${SKIP_TRAIN:-}" ]; then
  $py train.py "${common[@]}" $SIZE --out "$out/base" --steps "$BASE_STEPS" --lr "$BASE_LR" \
    --warmup "$BASE_WARMUP" | tee "$out/base.log"
  $py train.py "${ft[@]}" --out "$out/continued" | tee "$out/continued.log"
  for k in $ORACLE_KS; do
    $py train.py "${ft[@]}" --k "$k" --out "$out/oracle-k$k" | tee "$out/oracle-k$k.log"
  done
  $py train.py "${ft[@]}" --phds-ks "$PHDS_KS" --anneal-steps "$ANNEAL_STEPS" --anchor-k "$ANCHOR_K" \
    --out "$out/phds" | tee "$out/phds.log"
fi
[ -f "$DATA/cloze.jsonl" ] || $py make_cloze.py --data "$DATA"

models=(base continued)
for k in $ORACLE_KS; do models+=("oracle-k$k"); done
models+=(phds)
compare=()
for m in "${models[@]}"; do
  echo "== $m"
  $py check_logits.py --olmoe "$olmoe" --model "$out/$m" --data "$DATA" | tail -1
  # Perplexity, argmax agreement, KL, latency and the cloze probe's accuracy and
  # answer-level cross-sparsity agreement, all against the trained k.
  "$olmoe" sweep --model "$out/$m" --text "$SWEEP_TEXT" --k "$SWEEP_KS" --threads "$THREADS" \
    --context "$SWEEP_CONTEXT" --cloze "$DATA/cloze.jsonl" ${CLOZE_ITEMS:+--cloze-items "$CLOZE_ITEMS"} \
    --json "$out/$m.sweep.json" --plot "$out/$m.sweep.svg" 2>/dev/null | tee "$out/$m.sweep.txt"
  compare+=("$m=$out/$m.sweep.json")
done

# All models side by side: Markdown tables and one line per model in one plot.
"$olmoe" sweep --compare "$(IFS=,; echo "${compare[*]}")" --plot "$out/compare.svg" | tee "$out/compare.md"

if [ -n "${PY_CLOZE:-}" ]; then # the same probe in PyTorch (score_cloze.py), a cross-check
  paths=()
  for m in "${models[@]}"; do paths+=("$out/$m"); done
  $py score_cloze.py --data "$DATA" --threads "$THREADS" --ks "$SWEEP_KS" ${CLOZE_ITEMS:+--items "$CLOZE_ITEMS"} \
    --model "${paths[@]}" | tee "$out/cloze.txt"
fi
