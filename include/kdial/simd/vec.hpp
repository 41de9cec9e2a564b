// Vector helpers on xsimd::batch<float, Arch>, each with a scalar tail, so
// they take any length and any alignment. Used by the router, combine and
// the kernels. Summation order is fixed by the length alone (lane-wise
// partial sums, then the lanes in order, then the tail), so results are
// reproducible for a given build.
#pragma once

#include <cmath>
#include <cstddef>

#include "compat.hpp"
#include "convert.hpp"

namespace kdial::simd {

// sum_i a[i] * b[i], b stored as float, bf16 or f16 (a KV cache, say) and
// widened in registers (convert.hpp: the widening is exact, so a bf16 or
// f16 b gives the bits of its widened float copy).
template <class Arch = xsimd::default_arch, class S>
inline float dot_w(const float* a, const S* b, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    B acc0(0.0f), acc1(0.0f);
    std::size_t i = 0;
    for (; i + 2 * W <= n; i += 2 * W) {
        acc0 = simd::fma(B::load_unaligned(a + i), load_weights<Arch>(b, i), acc0);
        acc1 = simd::fma(B::load_unaligned(a + i + W), load_weights<Arch>(b, i + W), acc1);
    }
    for (; i + W <= n; i += W)
        acc0 = simd::fma(B::load_unaligned(a + i), load_weights<Arch>(b, i), acc0);
    float s = hsum(acc0 + acc1);
    for (; i < n; ++i)
        s = std::fma(a[i], weight_at(b, i), s);
    return s;
}
template <class Arch = xsimd::default_arch> inline float dot(const float* a, const float* b, std::size_t n) noexcept
{
    return dot_w<Arch>(a, b, n);
}

// y[i] += alpha * x[i]   (one fused multiply-add per element), x stored as
// float, bf16 or f16 and widened as in dot_w.
template <class Arch = xsimd::default_arch, class S>
inline void axpy_w(float alpha, const S* x, float* y, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    const B va(alpha);
    std::size_t i = 0;
    for (; i + W <= n; i += W)
        simd::fma(va, load_weights<Arch>(x, i), B::load_unaligned(y + i)).store_unaligned(y + i);
    for (; i < n; ++i)
        y[i] = std::fma(alpha, weight_at(x, i), y[i]);
}
template <class Arch = xsimd::default_arch>
inline void axpy(float alpha, const float* x, float* y, std::size_t n) noexcept
{
    axpy_w<Arch>(alpha, x, y, n);
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
