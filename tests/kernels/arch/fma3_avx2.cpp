// The expert kernels instantiated for xsimd::fma3<xsimd::avx2>: AVX2 + FMA
// (8 lanes). Compiled with this arch's -m flags (tests/CMakeLists.txt);
// only data here, so nothing of it runs unless the CPU has the arch.
#include "../arch_kernels.hpp"

namespace kdial::test {
extern constinit const arch_kernels kernels_fma3_avx2 = make_arch_kernels<xsimd::fma3<xsimd::avx2>>();
} // namespace kdial::test
