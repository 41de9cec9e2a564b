// The one place that names xsimd-version-specific calls. kdial targets the
// xsimd 8.1 API (Debian 12); later versions renamed the horizontal reductions
// (hadd -> reduce_add, hmax -> reduce_max). Everything else in kdial calls
// these wrappers.
#pragma once

#include <xsimd/xsimd.hpp>

namespace kdial::simd {

template <class Arch = xsimd::default_arch>
using fbatch = xsimd::batch<float, Arch>;

// Sum of the lanes of b.
template <class T, class A>
inline T hsum(const xsimd::batch<T, A>& b) noexcept
{
#if XSIMD_VERSION_MAJOR >= 9
    return xsimd::reduce_add(b);
#else
    return xsimd::hadd(b);
#endif
}

// Largest lane of b.
template <class T, class A>
inline T hmax(const xsimd::batch<T, A>& b) noexcept
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
