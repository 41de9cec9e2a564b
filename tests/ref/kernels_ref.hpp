// Plain scalar references for the expert kernels (kernels/linear.hpp,
// experts/swiglu.hpp): simple loops, double accumulation, no SIMD. Weights
// are first widened to f32 exactly as the kernels see them (bf16 -> f32 by
// the shift, f16 by the portable scalar widening, q8 -> d * q), so only
// summation order and silu differ.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstring>
#include <random>
#include <vector>

#include <kdial/core/blocks.hpp>
#include <kdial/core/dtype.hpp>
#include <kdial/kernels/quantize.hpp>
#include <kdial/kernels/weights.hpp>

namespace kdial::ref {

inline float to_f32(float v)
{
    return v;
}
inline float to_f32(bf16 v)
{
    return v.to_float();
}
inline float to_f32(f16 v)
{
    return v.to_float();
}

// The f32 values of a weight matrix [rows, cols], row-major.
template <weight_type W> std::vector<float> dequantize(const weight_view<W>& w)
{
    std::vector<float> out(w.rows * w.cols);
    for (std::size_t r = 0; r < w.rows; ++r)
        for (std::size_t c = 0; c < w.cols; ++c) {
            if constexpr (std::is_same_v<W, q8_t>) {
                const q8_block& b = w.row(r)[c / q8_block_size];
                out[r * w.cols + c] = b.scale_f16().to_float() * static_cast<float>(b.q[c % q8_block_size]);
            } else if constexpr (std::is_same_v<W, q4_0_t> || std::is_same_v<W, q4_k_t>) {
                // The scalar block values (tested bit for bit against an
                // independent unpacking in tests/kernels/blocks.cpp).
                constexpr std::size_t G = block_elems<typename W::storage>;
                out[r * w.cols + c] = block_value(w.row(r)[c / G], c % G);
            } else {
                out[r * w.cols + c] = to_f32(w.row(r)[c]);
            }
        }
    return out;
}

// y[i, o] = sum_k x[i, k] * w[o, k] (double), and abs[i, o] = sum_k |x||w|.
// w: [O, K] f32 row-major; x: [n, K] with row stride ldx.
inline void linear(const std::vector<float>& w, std::size_t O, std::size_t K, const float* x, std::size_t n,
    std::size_t ldx, std::vector<double>& y, std::vector<double>& abs)
{
    y.assign(n * O, 0.0);
    abs.assign(n * O, 0.0);
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t o = 0; o < O; ++o) {
            double s = 0, a = 0;
            for (std::size_t k = 0; k < K; ++k) {
                const double p = double(x[i * ldx + k]) * double(w[o * K + k]);
                s += p;
                a += std::fabs(p);
            }
            y[i * O + o] = s;
            abs[i * O + o] = a;
        }
}

inline double silu(double z)
{
    return z / (1.0 + std::exp(-z));
}

// The SwiGLU expert in double: g = x gateᵀ, u = x upᵀ, h = silu(g) * u,
// y = h downᵀ. Returns h [n, F] and y [n, d], and the intermediate g, u and
// their sums of |products| (for error bounds).
struct swiglu_result {
    std::vector<double> g, u, g_abs, u_abs, h, y;
};

template <weight_type W>
swiglu_result swiglu_expert(const weight_view<W>& gate, const weight_view<W>& up, const weight_view<W>& down,
    const float* x, std::size_t n, std::size_t ldx)
{
    const std::size_t F = gate.rows, d = gate.cols;
    swiglu_result r;
    linear(dequantize(gate), F, d, x, n, ldx, r.g, r.g_abs);
    linear(dequantize(up), F, d, x, n, ldx, r.u, r.u_abs);
    r.h.resize(n * F);
    for (std::size_t i = 0; i < n * F; ++i)
        r.h[i] = silu(r.g[i]) * r.u[i];
    const std::vector<float> wd = dequantize(down);
    r.y.assign(n * d, 0.0);
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t o = 0; o < d; ++o) {
            double s = 0;
            for (std::size_t f = 0; f < F; ++f)
                s += r.h[i * F + f] * double(wd[o * F + f]);
            r.y[i * d + o] = s;
        }
    return r;
}

// ---- test fixtures --------------------------------------------------------

// A weight matrix that owns its storage: rows of `row_stride` storage
// elements (>= the dense width; the extra is filled with garbage) starting
// `offset` elements into the buffer, values uniform in [-scale, scale].
template <weight_type W> struct owned_weights {
    std::vector<typename W::storage> buf;
    weight_view<W> view;
};

template <weight_type W>
owned_weights<W> random_weights(std::size_t rows, std::size_t cols, std::mt19937& rng, std::size_t pad = 0,
    std::size_t offset = 0, float scale = 1.0f)
{
    std::uniform_real_distribution<float> U(-scale, scale);
    std::vector<float> f(rows * cols);
    for (float& v : f)
        v = U(rng);
    owned_weights<W> o;
    const std::size_t stride = storage_cols<W>(cols) + pad;
    o.buf.resize(offset + rows * stride + 1);
    using S = typename W::storage;
    S* base = o.buf.data() + offset;
    if constexpr (std::is_same_v<W, q8_t>) {
        for (auto& b : o.buf) { // garbage in the padding
            b.set_scale(f16::from_float(6e4f));
            for (auto& q : b.q)
                q = 99;
        }
        if (rows > 0 && cols > 0)
            quantize_q8(cmatrix_view<float>(f.data(), rows, cols), base, stride);
    } else if constexpr (std::is_same_v<W, q4_0_t> || std::is_same_v<W, q4_k_t>) {
        for (auto& b : o.buf) // garbage in the padding
            std::memset(static_cast<void*>(&b), 0x7b, sizeof b);
        if (rows > 0 && cols > 0) {
            if constexpr (std::is_same_v<W, q4_0_t>)
                quantize_q4_0(f.data(), cols, rows, cols, base, stride);
            else
                quantize_q4_k(f.data(), cols, rows, cols, base, stride);
        }
    } else {
        const auto narrow = [](float v) {
            if constexpr (std::is_same_v<W, bf16_t>)
                return bf16::from_float(v);
            else if constexpr (std::is_same_v<W, f16_t>)
                return f16::from_float(v);
            else
                return v;
        };
        for (auto& v : o.buf)
            v = narrow(std::is_same_v<W, f16_t> ? 6e4f : 1e30f);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; ++c)
                base[r * stride + c] = narrow(f[r * cols + c]);
    }
    o.view = weight_view<W>(base, rows, cols, stride);
    return o;
}

// A float matrix [rows, cols] with row stride cols + pad, starting `offset`
// floats into its buffer (so the data is misaligned for offset = 1); the
// padding holds a sentinel.
struct owned_matrix {
    std::vector<float> buf;
    matrix_view<float> view;
};

inline constexpr float sentinel = -12345.0f;

inline owned_matrix random_matrix(std::size_t rows, std::size_t cols, std::mt19937& rng, std::size_t pad = 0,
    std::size_t offset = 0, float scale = 1.0f)
{
    owned_matrix m;
    const std::size_t stride = cols + pad;
    m.buf.assign(offset + rows * stride + 1, sentinel);
    m.view = matrix_view<float>(m.buf.data() + offset, rows, cols, stride);
    std::uniform_real_distribution<float> U(-scale, scale);
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t c = 0; c < cols; ++c)
            m.view(r, c) = U(rng);
    return m;
}

inline owned_matrix filled_matrix(std::size_t rows, std::size_t cols, std::size_t pad = 0, std::size_t offset = 0)
{
    owned_matrix m;
    const std::size_t stride = cols + pad;
    m.buf.assign(offset + rows * stride + 1, sentinel);
    m.view = matrix_view<float>(m.buf.data() + offset, rows, cols, stride);
    return m;
}

// gamma_K = K u / (1 - K u), u = 2^-24: |fl(sum of K products) - exact|
// <= gamma_K * sum |products| for any summation order, with or without FMA.
inline double gamma(std::size_t K)
{
    const double u = std::ldexp(1.0, -24);
    return double(K) * u / (1.0 - double(K) * u);
}

// The worst element of got vs want relative to its tolerance.
struct worst {
    double ratio = -1; // |got - want| / tol (NaN counts as infinite); -1: empty
    std::size_t i = 0, j = 0;
    double got = 0, want = 0, tol = 0;
};

inline worst compare(
    cmatrix_view<float> got, const std::vector<double>& want, const std::vector<double>& tol, std::size_t col0 = 0)
{
    worst w;
    const std::size_t ld = got.cols;
    for (std::size_t i = 0; i < got.rows; ++i)
        for (std::size_t j = col0; j < got.cols; ++j) {
            const double g = got(i, j), e = want[i * ld + j], t = tol[i * ld + j];
            double r = std::fabs(g - e) / t;
            if (!(r == r))
                r = INFINITY;
            if (r > w.ratio)
                w = { r, i, j, g, e, t };
        }
    return w;
}

} // namespace kdial::ref
