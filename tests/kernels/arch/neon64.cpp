// The expert kernels instantiated for xsimd::neon64 (aarch64, 4 lanes).
#include "../arch_kernels.hpp"

namespace kdial::test {
extern constinit const arch_kernels kernels_neon64 = make_arch_kernels<xsimd::neon64>();
} // namespace kdial::test
