#!/usr/bin/env bash
# CI step: build kdial's doctest suite (kdial_tests) for aarch64 with Debian's
# cross compiler and run it under qemu user-mode emulation (no binfmt needed:
# the binary runs through `qemu-aarch64 -L /usr/aarch64-linux-gnu`).
# oneTBB for arm64 comes from Debian multiarch (libtbb-dev:arm64 installs
# next to the amd64 one: both are Multi-Arch: same), so the test binary is
# the same program as on x86, TBB executor included (xsimd too is taken as
# libxsimd-dev:arm64: Debian ships its CMake config per architecture). The SIMD code is the
# NEON (xsimd neon64) path. Goldens and CLI tests (CTest, need the olmoe
# binary) are left to the x86 jobs; the doctest model tests read
# tests/golden through the shared file system and stay.
# Usage: .ci/aarch64.sh [build-dir]   (default build-aarch64)
set -euo pipefail
cd "$(dirname "$0")/.."
build="${1:-build-aarch64}"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
t0=$(date +%s)
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  $SUDO dpkg --add-architecture arm64
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends \
  g++-aarch64-linux-gnu qemu-user cmake ninja-build \
  libeigen3-dev doctest-dev nlohmann-json3-dev libtbb-dev:arm64 libxsimd-dev:arm64
t1=$(date +%s)

mkdir -p "$build"
cat > "$build/aarch64-linux-gnu.cmake" <<'EOF'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# arm64 multiarch libraries (libtbb-dev:arm64) and their CMake configs.
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/aarch64-linux-gnu)
EOF
# The emulated run selects test cases by tag (see below), so only the test
# files that hold a case with one of these tags are built (KDIAL_TEST_ONLY,
# tests/CMakeLists.txt): about a quarter of the suite's compile time (x86
# Release ninja log: ~450 of ~1850 CPU-s).
# KDIAL_AARCH64_TESTS=all builds and runs the whole suite.
tags=(kernels swiglu layer)
only=""
if [ "${KDIAL_AARCH64_TESTS:-kernels}" != all ]; then
  only="$(cd tests && grep -rlE --include='*.cpp' "\[($(IFS='|'; echo "${tags[*]}"))\]" . | sed 's|^\./||' | sort | paste -sd';')"
  [ -n "$only" ] || { echo "ci: no test file holds the tags ${tags[*]}" >&2; exit 1; }
fi
# KDIAL_NATIVE=OFF: -march=native means nothing to a cross compiler; the
# aarch64 baseline (armv8-a) has NEON, which is what xsimd's neon64 needs.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_TOOLCHAIN_FILE="$PWD/$build/aarch64-linux-gnu.cmake" \
  -DKDIAL_NATIVE=OFF -DKDIAL_BUILD_BENCH=OFF -DKDIAL_BUILD_EXAMPLES=OFF -DKDIAL_INSTALL=OFF \
  "-DKDIAL_TEST_ONLY=$only"
cmake --build "$build" --target kdial_tests
t2=$(date +%s)

aarch64-linux-gnu-readelf -h "$build/tests/kdial_tests" | grep -q AArch64 || {
  echo "ci: $build/tests/kdial_tests is not an aarch64 binary" >&2
  exit 1
}
echo "ci: kdial_tests (aarch64) under qemu"
# oneTBB's worker threads hang under qemu-user (a plain tbb::parallel_for
# never returns there), so the emulated run caps oneTBB at one thread
# (KDIAL_TEST_MAX_THREADS, read by tests/main.cpp): every parallel path still
# runs, on the calling thread. Test cases that start threads of their own
# (a std::thread executor, two streams at once, several encoders; new ones
# carry the tag [threads]) are left out: they hang
# there too. Emulation is slow (the whole suite takes over 15 minutes), so the
# default run is selected by tag, never by a type name (a name filter like
# '*f16*' also matched every test instantiated for bf16): the kernel suite
# ([kernels]: every SIMD path on NEON — linear, GEMV, GEMM, SwiGLU, widening
# loads, f16, q8 — RMSNorm, RoPE, dense_linear), the experts ([swiglu]) and
# the MoE layer ([layer]) end to end on NEON.
# KDIAL_AARCH64_TESTS=all runs the whole suite (still without the threaded cases).
tc="$(printf '*[%s]*,' "${tags[@]}")"
filter=(-tc="${tc%,}" -tce='*[executor]*,*[streams]*,*[threads]*,*several threads*')
if [ "${KDIAL_AARCH64_TESTS:-kernels}" = all ]; then filter=(-tce='*[executor]*,*[streams]*,*[threads]*,*several threads*'); fi
KDIAL_TEST_MAX_THREADS=1 QEMU_SET_ENV=LD_LIBRARY_PATH=/usr/lib/aarch64-linux-gnu \
  timeout 1200 qemu-aarch64 -L /usr/aarch64-linux-gnu "$build/tests/kdial_tests" "${filter[@]}"
t3=$(date +%s)
echo "ci: aarch64 done: packages $((t1 - t0)) s, build $((t2 - t1)) s, tests $((t3 - t2)) s"
