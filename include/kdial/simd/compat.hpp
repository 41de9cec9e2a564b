// The one place that names xsimd-version-specific calls and ISA headers.
// kdial targets the xsimd 8.1 API (Debian 12); later versions renamed the
// horizontal reductions (hadd -> reduce_add, hmax -> reduce_max). Everything
// else in kdial calls these wrappers. Intrinsic headers are included only
// for the ISA being compiled (x86: <immintrin.h>, aarch64: <arm_neon.h>),
// and every intrinsic path in simd/ and kernels/ sits behind the matching
// KDIAL_SIMD_* macro with a portable fallback, so kdial builds for any CPU
// xsimd knows (tested: SSE4.2, AVX2 + FMA, AVX-512 and NEON on aarch64).
#pragma once

#include <type_traits>

#include <xsimd/xsimd.hpp>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KDIAL_SIMD_X86 1
#else
#define KDIAL_SIMD_X86 0
#endif

#if defined(__aarch64__) && XSIMD_WITH_NEON64
#include <arm_neon.h>
#define KDIAL_SIMD_NEON64 1
#else
#define KDIAL_SIMD_NEON64 0
#endif

namespace kdial::simd {

template <class Arch = xsimd::default_arch> using fbatch = xsimd::batch<float, Arch>;

// Arch families, by register: x86 128-bit (SSE2 .. SSE4.2, FMA3<SSE4.2>),
// 256-bit (AVX, AVX2, FMA3<AVX2>), 512-bit (AVX-512), and aarch64 NEON.
// (xsimd 8.1 derives avx and avx512f directly from generic, so these
// base-class tests do not overlap.)
template <class Arch> inline constexpr bool is_sse_arch = std::is_base_of_v<xsimd::sse2, Arch>;
template <class Arch> inline constexpr bool is_avx_arch = std::is_base_of_v<xsimd::avx, Arch>;
template <class Arch> inline constexpr bool is_avx2_arch = std::is_base_of_v<xsimd::avx2, Arch>;
template <class Arch> inline constexpr bool is_avx512_arch = std::is_base_of_v<xsimd::avx512f, Arch>;
template <class Arch> inline constexpr bool is_neon64_arch = std::is_base_of_v<xsimd::neon64, Arch>;

// Fused multiply-add x * y + z with one rounding wherever the CPU has an FMA.
// xsimd 8.1 has no avx512f fma kernel, and none for the plain sse/avx archs,
// and falls back to x * y + z, which the compiler may or may not contract
// (it differs between -O2 and -O3), so results would depend on the
// optimiser. This wrapper fuses whenever the build targets an FMA unit;
// only on CPUs without one (pure SSE4.2) is it x * y + z, two roundings,
// which no compiler can then contract.
template <class A>
inline xsimd::batch<float, A> fma(
    const xsimd::batch<float, A>& x, const xsimd::batch<float, A>& y, const xsimd::batch<float, A>& z) noexcept
{
    if constexpr (false) {
    }
#if KDIAL_SIMD_X86 && XSIMD_VERSION_MAJOR < 9 && XSIMD_WITH_AVX512F
    else if constexpr (is_avx512_arch<A>)
        return _mm512_fmadd_ps(x, y, z);
#endif
#if KDIAL_SIMD_X86 && XSIMD_VERSION_MAJOR < 9 && defined(__FMA__)
    else if constexpr (is_avx_arch<A>)
        return _mm256_fmadd_ps(x, y, z);
    else if constexpr (is_sse_arch<A>)
        return _mm_fmadd_ps(x, y, z);
#endif
    else
        return xsimd::fma(x, y, z);
}

// Makes the compiler hold v in a vector register from here on: an empty asm
// that "changes" it. A kernel that reuses one loaded vector in several FMAs
// calls it after the load; otherwise GCC 12 folds the load into each FMA
// (a memory operand per use), so a group of 8 rows x 2 weight rows issues 18
// vector loads per 16 FMAs and runs at the load ports' pace (measured: the
// small-row path 128 -> 157 GFLOP/s, bf16, 8 rows, K = 2048, weights in
// L2, AVX-512; 78 -> 96 at 12 rows with -march=znver3, AVX2).
// x86 only (FMA there takes a memory operand; NEON's does not); no effect on
// any result.
template <class T, class A> inline void in_register(xsimd::batch<T, A>& v) noexcept
{
#if KDIAL_SIMD_X86 && defined(__GNUC__)
    if constexpr (is_sse_arch<A> || is_avx_arch<A> || is_avx512_arch<A>)
        __asm__("" : "+v"(v.data));
#else
    (void)v;
#endif
}

// Sum of the lanes of b.
template <class T, class A> inline T hsum(const xsimd::batch<T, A>& b) noexcept
{
#if XSIMD_VERSION_MAJOR >= 9
    return xsimd::reduce_add(b);
#else
    return xsimd::hadd(b);
#endif
}

// Largest lane of b.
template <class T, class A> inline T hmax(const xsimd::batch<T, A>& b) noexcept
{
#if XSIMD_VERSION_MAJOR >= 9
    return xsimd::reduce_max(b);
#else
    alignas(A::alignment()) T tmp[xsimd::batch<T, A>::size];
    b.store_aligned(tmp);
    T m = tmp[0];
    for (std::size_t i = 1; i < xsimd::batch<T, A>::size; ++i)
        m = tmp[i] > m ? tmp[i] : m;
    return m;
#endif
}

} // namespace kdial::simd
