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
    // Whole vectors cover [0, nv), the scalar tail [nv, n). (Each loop with
    // its own bounds: GCC 12 -O3 warned of a UB iteration in the tail
    // written `for (; i < n; ++i)` after the vector loop when n is a known
    // multiple of W, where the tail never runs.)
    const std::size_t nv = n / W * W;
    float m = x[0];
    if (nv > 0) {
        B vm = B::load_unaligned(x);
        for (std::size_t i = W; i < nv; i += W)
            vm = xsimd::max(vm, B::load_unaligned(x + i));
        m = simd::hmax(vm);
    }
    for (std::size_t i = nv; i < n; ++i)
        m = x[i] > m ? x[i] : m;
    return m;
}

// x <- softmax(x) over n >= 1 finite values. Exponentials use xsimd's exp
// (within 1-2 ulp of std::exp); the sum runs lane-wise then in lane order.
template <class Arch = xsimd::default_arch> inline void softmax_inplace(float* x, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    const std::size_t nv = n / W * W; // whole vectors (see max_of)
    const float m = max_of<Arch>(x, n);
    const B vm(m);
    B vs(0.0f);
    for (std::size_t i = 0; i < nv; i += W) {
        B e = xsimd::exp(B::load_unaligned(x + i) - vm);
        e.store_unaligned(x + i);
        vs += e;
    }
    float s = simd::hsum(vs);
    for (std::size_t i = nv; i < n; ++i) {
        x[i] = std::exp(x[i] - m);
        s += x[i];
    }
    const float inv = 1.0f / s;
    const B vinv(inv);
    for (std::size_t i = 0; i < nv; i += W)
        (B::load_unaligned(x + i) * vinv).store_unaligned(x + i);
    for (std::size_t i = nv; i < n; ++i)
        x[i] *= inv;
}

} // namespace kdial
