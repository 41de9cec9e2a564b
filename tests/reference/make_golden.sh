#!/usr/bin/env bash
# Regenerates the committed golden data under tests/golden/: tiny synthetic
# checkpoints written by `olmoe make-synthetic` and the logits of a fixed
# token sequence computed by the independent PyTorch reference (moe_ref.py)
# at k = 1, 2 and the trained k (0 = num_experts_per_tok).
# usage: tests/reference/make_golden.sh [path/to/olmoe]
set -euo pipefail
cd "$(dirname "$0")/../.."
OLMOE=${1:-build/bin/olmoe}
PY=/usr/bin/python3
TOKENS=$(cat tests/golden/tokens.txt)
gen() { # name, make-synthetic options...
  local name=$1; shift
  rm -rf "tests/golden/$name"
  "$OLMOE" make-synthetic --out "tests/golden/$name" "$@"
  "$PY" tests/reference/moe_ref.py "tests/golden/$name" --tokens "$TOKENS" --k "${KS:-1,2,0}" \
    --out-prefix "tests/golden/$name/ref_logits"
}
gen olmoe-tiny-f32 --preset tiny --layers 2 --dtype f32 --seed 11
gen olmoe-tiny-bf16 --preset tiny --layers 2 --dtype bf16 --shards 2 --seed 12
KS=1,2,3 gen qwen2-moe-tiny-f32 --preset tiny-qwen2-moe --dtype f32 --seed 13
KS=1,2,4 gen mixtral-tiny-bf16 --preset tiny-mixtral --dtype bf16 --seed 14
# Qwen3-MoE: head_dim 24 != 64 / 4, GQA 4 / 2, per-head q/k norm, MoE in layers
# 1 and 5 (decoder_sparse_step 2, layer 3 in mlp_only_layers), norm_topk_prob.
KS=1,2,4 gen qwen3-moe-tiny-bf16 --preset tiny-qwen3-moe --dtype bf16 --seed 15
