#!/usr/bin/env bash
# The runs of issue 13 in one go: base, continued, oracles, PHDS; then the
# logits check and an `olmoe sweep` (test split, k = 1..k_pre) of each.
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
#   CLOZE_ITEMS (all of DATA/cloze.jsonl, made by make_cloze.py if absent)
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
mkdir -p "$out"
common=(--data "$DATA" --seed "$SEED" --threads "$THREADS" $BATCH --dtype "$DTYPE")
ft=("${common[@]}" --init "$out/base" --steps "$FT_STEPS" --lr "$FT_LR" --warmup "$FT_WARMUP")

cd "$here"
$py train.py "${common[@]}" $SIZE --out "$out/base" --steps "$BASE_STEPS" --lr "$BASE_LR" \
  --warmup "$BASE_WARMUP" | tee "$out/base.log"
$py train.py "${ft[@]}" --out "$out/continued" | tee "$out/continued.log"
for k in $ORACLE_KS; do
  $py train.py "${ft[@]}" --k "$k" --out "$out/oracle-k$k" | tee "$out/oracle-k$k.log"
done
$py train.py "${ft[@]}" --phds-ks "$PHDS_KS" --anneal-steps "$ANNEAL_STEPS" --anchor-k "$ANCHOR_K" \
  --out "$out/phds" | tee "$out/phds.log"

models=(base continued phds)
for k in $ORACLE_KS; do models+=("oracle-k$k"); done
for m in "${models[@]}"; do
  echo "== $m"
  $py check_logits.py --olmoe "$olmoe" --model "$out/$m" --data "$DATA" | tail -1
  "$olmoe" sweep --model "$out/$m" --text "$SWEEP_TEXT" --k "$SWEEP_KS" --threads "$THREADS" \
    --json "$out/$m.sweep.json" --plot "$out/$m.sweep.svg" 2>/dev/null | tee "$out/$m.sweep.txt"
done

# The cloze probe: answer-level cross-sparsity agreement (PyTorch preview).
[ -f "$DATA/cloze.jsonl" ] || $py make_cloze.py --data "$DATA"
paths=()
for m in "${models[@]}"; do paths+=("$out/$m"); done
$py score_cloze.py --data "$DATA" --threads "$THREADS" --ks "$SWEEP_KS" ${CLOZE_ITEMS:+--items "$CLOZE_ITEMS"} \
  --model "${paths[@]}" | tee "$out/cloze.txt"
