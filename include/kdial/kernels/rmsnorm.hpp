// RMSNorm (weight only, no bias, no mean subtraction), as used by OLMoE,
// Qwen2-MoE and Mixtral: y_i = g_i * (x_i * r), r = 1 / sqrt(mean(x^2) + eps)
// with eps inside the square root. fp32 throughout; the sum of squares runs
// lane-wise then in lane order (fixed order, so deterministic). Rows are
// independent; views only, no allocation.
#pragma once

#include <cmath>
#include <cstddef>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "../parallel/for_each.hpp"
#include "../simd/compat.hpp"
#include "../simd/vec.hpp"

namespace kdial {

// One row: y[0..n) = g * x * rsqrt(mean(x^2) + eps). y may alias x.
template <class Arch = xsimd::default_arch>
inline void rmsnorm_row(const float* x, const float* g, float eps, float* y, std::size_t n) noexcept
{
    const float ss = simd::dot<Arch>(x, x, n);
    const float r = 1.0f / std::sqrt(ss / float(n) + eps);
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t W = B::size;
    const B vr(r);
    std::size_t i = 0;
    for (; i + W <= n; i += W)
        (B::load_unaligned(g + i) * (B::load_unaligned(x + i) * vr)).store_unaligned(y + i);
    for (; i < n; ++i)
        y[i] = g[i] * (x[i] * r);
}

// Every row of X [T, n] -> Y [T, n] with weight g [n]. Y may alias X.
inline void rmsnorm(cmatrix_view<float> X, const float* g, float eps, matrix_view<float> Y)
{
    detail::check(X.rows == Y.rows && X.cols == Y.cols, "kdial::rmsnorm: X is [", X.rows, ", ", X.cols, "], Y is [",
        Y.rows, ", ", Y.cols, "]");
    parallel::for_each_tile(X.rows, parallel::tile_items(X.cols * 8), [&](std::size_t t0, std::size_t t1) {
        for (std::size_t t = t0; t < t1; ++t)
            rmsnorm_row(X.row(t), g, eps, Y.row(t), X.cols);
    });
}

} // namespace kdial
