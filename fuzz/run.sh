#!/usr/bin/env bash
# Builds every fuzz target with libFuzzer, ASan and UBSan into a temp dir and
# runs each from a copy of its seed corpus (fuzz/corpus/<target>/), splitting
# the given total seconds (default 60) evenly between them:
#   safetensors  safetensors headers, index.json and .npy  (safetensors_fuzz.cpp)
#   config       config.json                               (config_fuzz.cpp)
#   tokenizer    tokenizer.json loading                     (tokenizer_fuzz.cpp)
#   encode       tokenizer encode/decode round trip         (encode_fuzz.cpp)
#   gguf         GGUF header, metadata and tensor infos     (gguf_fuzz.cpp)
# Exit status: 0 when nothing was found; non-zero on a crash, leak, UB or
# timeout in any target (every target still runs; reproducers are kept and
# their paths printed).
# Usage: fuzz/run.sh [total-seconds] [target...]
#        (CXX=clang++-15 fuzz/run.sh to pick a compiler)
set -euo pipefail

secs="${1:-60}"
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cxx="${CXX:-clang++-14}"
if ! command -v "$cxx" >/dev/null; then
  echo "fuzz/run.sh: $cxx not found (apt-get install clang-14 libclang-rt-14-dev)" >&2
  exit 2
fi

# name  max_len  dictionary
all_targets=("safetensors 4096 safetensors.dict" "config 4096 config.dict" "tokenizer 8192 tokenizer.dict"
  "encode 2048 tokenizer.dict" "gguf 4096 gguf.dict")
targets=()
if [ "$#" -eq 0 ]; then
  targets=("${all_targets[@]}")
else
  for want in "$@"; do
    found=""
    for t in "${all_targets[@]}"; do
      if [ "${t%% *}" = "$want" ]; then targets+=("$t"); found=1; fi
    done
    [ -n "$found" ] || { echo "fuzz/run.sh: unknown target '$want'" >&2; exit 2; }
  done
fi
per=$((secs / ${#targets[@]}))
[ "$per" -ge 1 ] || per=1

work="$(mktemp -d /tmp/kdial-fuzz-XXXXXX)"
echo "fuzz/run.sh: building ${#targets[@]} target(s) in $work; ${per}s each"
for t in "${targets[@]}"; do
  read -r name _ _ <<<"$t"
  "$cxx" -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I "$root/include" -I "$root/examples/olmoe" "$here/${name}_fuzz.cpp" -o "$work/${name}_fuzz" &
done
wait_rc=0
for job in $(jobs -p); do wait "$job" || wait_rc=1; done
[ "$wait_rc" -eq 0 ] || { echo "fuzz/run.sh: build failed" >&2; exit 2; }

failed=()
for t in "${targets[@]}"; do
  read -r name max_len dict <<<"$t"
  mkdir -p "$work/$name/corpus" "$work/$name/artifacts"
  cp "$here/corpus/$name"/* "$work/$name/corpus/"
  echo "fuzz/run.sh: $name for ${per}s"
  set +e
  "$work/${name}_fuzz" -max_total_time="$per" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
    -dict="$here/$dict" -print_final_stats=1 -artifact_prefix="$work/$name/artifacts/" "$work/$name/corpus" \
    2>&1 | grep -v -e '^#[0-9]*.*\(NEW\|REDUCE\|pulse\)' -e 'NEW_FUNC'
  rc=${PIPESTATUS[0]}
  set -e
  if [ "$rc" -ne 0 ]; then
    echo "fuzz/run.sh: $name FAILED (exit $rc); reproducer(s) in $work/$name/artifacts:" >&2
    ls -l "$work/$name/artifacts" >&2
    failed+=("$name")
  fi
done
if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz/run.sh: findings in: ${failed[*]} (work dir $work kept)" >&2
  exit 1
fi
rm -rf "$work"
echo "fuzz/run.sh: no findings in ${secs}s over ${#targets[@]} target(s)"
