// Softmax and row maximum on fp32 vectors, shared by the router (stage 1)
// and attention in the examples. Numerically stable (the row maximum is
// subtracted first, so exp never overflows); in place, no allocation, a
// fixed summation order (lane-wise partial sums, then lanes, then the tail).
#pragma once

#include <cmath>
#include <cstddef>

#include "../simd/compat.hpp"

namespace kdial {

// Largest element of x[0..n). n >= 1.
template <class Arch = xsimd::default_arch> inline float max_of(const float* x, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    std::size_t i = 0;
    float m = x[0];
    if (n >= W) {
        B vm = B::load_unaligned(x);
        for (i = W; i + W <= n; i += W)
            vm = xsimd::max(vm, B::load_unaligned(x + i));
        m = simd::hmax(vm);
    }
    for (; i < n; ++i)
        m = x[i] > m ? x[i] : m;
    return m;
}

// x <- softmax(x) over n >= 1 finite values. Exponentials use xsimd's exp
// (within 1-2 ulp of std::exp); the sum runs lane-wise then in lane order.
template <class Arch = xsimd::default_arch> inline void softmax_inplace(float* x, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    const float m = max_of<Arch>(x, n);
    const B vm(m);
    B vs(0.0f);
    std::size_t i = 0;
    for (; i + W <= n; i += W) {
        B e = xsimd::exp(B::load_unaligned(x + i) - vm);
        e.store_unaligned(x + i);
        vs += e;
    }
    float s = simd::hsum(vs);
    for (; i < n; ++i) {
        x[i] = std::exp(x[i] - m);
        s += x[i];
    }
    const float inv = 1.0f / s;
    const B vinv(inv);
    for (i = 0; i + W <= n; i += W)
        (B::load_unaligned(x + i) * vinv).store_unaligned(x + i);
    for (; i < n; ++i)
        x[i] *= inv;
}

} // namespace kdial
