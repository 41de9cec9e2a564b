// The expert kernels instantiated for xsimd::avx512bw (16 lanes). Compiled
// with the AVX-512 -m flags (tests/CMakeLists.txt) even where the build CPU
// lacks them; only data here, so nothing of it runs unless the CPU has them.
#include "../arch_kernels.hpp"

namespace kdial::test {
extern constinit const arch_kernels kernels_avx512bw = make_arch_kernels<xsimd::avx512bw>();
} // namespace kdial::test
