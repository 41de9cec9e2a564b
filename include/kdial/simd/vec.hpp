// Vector helpers on xsimd::batch<float, Arch>, each with a scalar tail, so
// they take any length and any alignment. Used by the router, combine and
// the kernels. Summation order is fixed by the length alone (lane-wise
// partial sums, then the lanes in order, then the tail), so results are
// reproducible for a given build.
#pragma once

#include <cmath>
#include <cstddef>

#include "compat.hpp"

namespace kdial::simd {

// sum_i a[i] * b[i]
template <class Arch = xsimd::default_arch> inline float dot(const float* a, const float* b, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    B acc0(0.0f), acc1(0.0f);
    std::size_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
        acc0 = simd::fma(B::load_unaligned(a + i), B::load_unaligned(b + i), acc0);
        acc1 = simd::fma(B::load_unaligned(a + i + W), B::load_unaligned(b + i + W), acc1);
    }
    for (; i + W <= n; i += W)
        acc0 = simd::fma(B::load_unaligned(a + i), B::load_unaligned(b + i), acc0);
    float s = hsum(acc0 + acc1);
    for (; i < n; ++i)
        s = std::fma(a[i], b[i], s);
    return s;
}

// y[i] += alpha * x[i]   (one fused multiply-add per element)
template <class Arch = xsimd::default_arch>
inline void axpy(float alpha, const float* x, float* y, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    const B va(alpha);
    std::size_t i = 0;
    for (; i + W <= n; i += W)
        simd::fma(va, B::load_unaligned(x + i), B::load_unaligned(y + i)).store_unaligned(y + i);
    for (; i < n; ++i)
        y[i] = std::fma(alpha, x[i], y[i]);
}

// y[i] = alpha * x[i]
template <class Arch = xsimd::default_arch>
inline void scale_to(float alpha, const float* x, float* y, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    const B va(alpha);
    std::size_t i = 0;
    for (; i + W <= n; i += W)
        (va * B::load_unaligned(x + i)).store_unaligned(y + i);
    for (; i < n; ++i)
        y[i] = alpha * x[i];
}

// silu(z) = z / (1 + exp(-z)), on a batch.
template <class A> inline xsimd::batch<float, A> silu(const xsimd::batch<float, A>& z) noexcept
{
    return z / (xsimd::batch<float, A>(1.0f) + xsimd::exp(-z));
}

// silu on a scalar with the same formula (for tails and references).
inline float silu(float z) noexcept
{
    return z / (1.0f + std::exp(-z));
}

} // namespace kdial::simd
