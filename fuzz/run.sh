#!/usr/bin/env bash
# Builds fuzz/safetensors_fuzz.cpp with libFuzzer, ASan and UBSan into a temp
# dir and runs it for N seconds (default 60) from a copy of fuzz/corpus.
# Exit status: 0 when nothing was found; non-zero on a crash, leak, UB or
# timeout (the reproducer is kept and its path printed).
# Usage: fuzz/run.sh [seconds]      (CXX=clang++-15 fuzz/run.sh to pick a compiler)
set -euo pipefail

secs="${1:-60}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cxx="${CXX:-clang++-14}"
if ! command -v "$cxx" >/dev/null; then
  echo "fuzz/run.sh: $cxx not found (apt-get install clang-14 libclang-rt-14-dev)" >&2
  exit 2
fi

work="$(mktemp -d /tmp/kdial-fuzz-XXXXXX)"
echo "fuzz/run.sh: building in $work"
"$cxx" -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -I "$root/include" "$here/safetensors_fuzz.cpp" -o "$work/safetensors_fuzz"

mkdir "$work/corpus" "$work/artifacts"
cp "$here"/corpus/* "$work/corpus/"
set +e
"$work/safetensors_fuzz" -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -dict="$here/safetensors.dict" -print_final_stats=1 -artifact_prefix="$work/artifacts/" "$work/corpus"
rc=$?
set -e
if [ "$rc" -ne 0 ]; then
  echo "fuzz/run.sh: FAILED (exit $rc); reproducer(s) in $work/artifacts:" >&2
  ls -l "$work/artifacts" >&2
  exit "$rc"
fi
rm -rf "$work"
echo "fuzz/run.sh: no findings in ${secs}s"
