// Router scoring (stage 1, route): turns one token's router logits [E] into
// scores, in fp32. softmax subtracts the row maximum first, so it never
// overflows; sigmoid is the DeepSeek-V3 style alternative. Both work in
// place on one row, allocate nothing and are deterministic (fixed order).
#pragma once

#include <cmath>
#include <cstddef>

#include "../kernels/softmax.hpp"
#include "../simd/compat.hpp"

namespace kdial {

// How router logits become per-expert scores.
enum class scoring {
    softmax, // p_e = exp(l_e - max) / sum_e' exp(l_e' - max)  (OLMoE, Qwen2-MoE, Mixtral)
    sigmoid, // s_e = 1 / (1 + exp(-l_e))                        (DeepSeek-V3 style)
};

// x <- 1 / (1 + exp(-x)) element-wise.
template <class Arch = xsimd::default_arch> inline void sigmoid_inplace(float* x, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    const B one(1.0f);
    const std::size_t nv = n / W * W; // whole vectors (see max_of, kernels/softmax.hpp)
    for (std::size_t i = 0; i < nv; i += W)
        (one / (one + xsimd::exp(-B::load_unaligned(x + i)))).store_unaligned(x + i);
    for (std::size_t i = nv; i < n; ++i)
        x[i] = 1.0f / (1.0f + std::exp(-x[i]));
}

// Applies the chosen scoring to one row in place.
template <class Arch = xsimd::default_arch> inline void score_inplace(scoring s, float* x, std::size_t n) noexcept
{
    if (s == scoring::softmax)
        softmax_inplace<Arch>(x, n);
    else
        sigmoid_inplace<Arch>(x, n);
}

// Index of the first non-finite value in x[0..n), or n if all are finite.
// Fast path: sum of x*0 is 0 exactly when every x is finite (inf*0 and NaN
// give NaN).
template <class Arch = xsimd::default_arch> inline std::size_t find_non_finite(const float* x, std::size_t n) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    const B zero(0.0f);
    B acc(0.0f);
    std::size_t i = 0;
    for (; i + W <= n; i += W)
        acc += B::load_unaligned(x + i) * zero;
    float s = simd::hsum(acc);
    for (; i < n; ++i)
        s += x[i] * 0.0f;
    if (s == 0.0f)
        return n;
    for (i = 0; i < n; ++i)
        if (!std::isfinite(x[i]))
            return i;
    return n;
}

} // namespace kdial
