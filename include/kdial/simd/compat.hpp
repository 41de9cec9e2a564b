// The one place that names xsimd-version-specific calls. kdial targets the
// xsimd 8.1 API (Debian 12); later versions renamed the horizontal reductions
// (hadd -> reduce_add, hmax -> reduce_max). Everything else in kdial calls
// these wrappers.
#pragma once

#include <type_traits>

#include <xsimd/xsimd.hpp>

namespace kdial::simd {

template <class Arch = xsimd::default_arch> using fbatch = xsimd::batch<float, Arch>;

// Fused multiply-add x * y + z with one rounding, on every arch.
// xsimd 8.1 has no avx512f fma kernel and falls back to x * y + z, which
// the compiler may or may not contract (it differs between -O2 and -O3), so
// results would depend on the optimiser. This wrapper always fuses.
template <class A>
inline xsimd::batch<float, A> fma(
    const xsimd::batch<float, A>& x, const xsimd::batch<float, A>& y, const xsimd::batch<float, A>& z) noexcept
{
#if XSIMD_VERSION_MAJOR < 9 && defined(__AVX512F__)
    if constexpr (std::is_base_of_v<xsimd::avx512f, A>)
        return _mm512_fmadd_ps(x, y, z);
    else
#endif
        return xsimd::fma(x, y, z);
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
