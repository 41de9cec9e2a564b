// The expert kernels instantiated for xsimd::sse4_2 (4 lanes; the FMA
// wrapper fuses only where the build targets an FMA unit). Compiled with
// this arch's -m flags (tests/CMakeLists.txt); only data here.
#include "../arch_kernels.hpp"

namespace kdial::test {
extern constinit const arch_kernels kernels_sse4_2 = make_arch_kernels<xsimd::sse4_2>();
} // namespace kdial::test
