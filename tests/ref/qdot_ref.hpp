// Plain scalar reference for the int8-activation kernels (kernels/qdot.hpp),
// written from the definition: quantise each row of X per block of 32
// (d = max|x| / 127, q = round-to-nearest-even(x / d) in [-127, 127]), the
// integer dot of each block with the weights' integers, then the f32
// scaling and summation order the header documents. No SIMD, no shared code
// with the kernels beyond the block layouts and the scalar block decoders.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <kdial/core/blocks.hpp>
#include <kdial/core/dtype.hpp>
#include <kdial/kernels/weights.hpp>

namespace kdial::ref {

struct act_q8 {
    std::size_t rows = 0, blocks = 0;
    std::vector<std::int8_t> q; // [rows, 32 * blocks]
    std::vector<float> d; // [rows, blocks]
    std::vector<std::int32_t> s; // [rows, blocks]
};

inline act_q8 quantize_act(const float* x, std::size_t n, std::size_t K, std::size_t ldx)
{
    act_q8 a;
    a.rows = n;
    a.blocks = (K + 31) / 32;
    a.q.assign(n * a.blocks * 32, 0);
    a.d.assign(n * a.blocks, 0.0f);
    a.s.assign(n * a.blocks, 0);
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t b = 0; b < a.blocks; ++b) {
            float amax = 0.0f;
            bool nan = false;
            for (std::size_t k = 32 * b; k < std::min(K, 32 * b + 32); ++k) {
                const float v = x[i * ldx + k];
                if (std::isnan(v))
                    nan = true;
                else if (std::fabs(v) > amax)
                    amax = std::fabs(v);
            }
            float d = nan ? NAN : amax / 127.0f;
            if (d < FLT_MIN)
                d = 0.0f; // below the normal range: the block is zero
            const float id = (d >= FLT_MIN && d <= FLT_MAX) ? 1.0f / d : 0.0f;
            std::int32_t s = 0;
            for (std::size_t l = 0; l < 32; ++l) {
                const std::size_t k = 32 * b + l;
                int q = 0;
                if (k < K) {
                    float v = x[i * ldx + k] * id;
                    v = std::isnan(v) ? -127.0f : v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v;
                    q = int(std::nearbyint(v));
                }
                a.q[(i * a.blocks + b) * 32 + l] = std::int8_t(q);
                s += q;
            }
            a.d[i * a.blocks + b] = d;
            a.s[i * a.blocks + b] = s;
        }
    return a;
}

// The weight integers and scales of block b (32 inputs) of a row.
inline int weight_int(const q8_block* row, std::size_t b, std::size_t l)
{
    return row[b].q[l];
}
inline int weight_int(const q4_0_block* row, std::size_t b, std::size_t l)
{
    return row[b].nibble(l) - 8;
}
inline int weight_int(const q4_k_block* row, std::size_t b, std::size_t l)
{
    return k4_nibble(row[b / 8], 32 * (b % 8) + l);
}

// out = the int8-activation dot of weight row `row` and activation row i.
template <class S> float qdot(const S* row, const act_q8& a, std::size_t i)
{
    float acc[8] = {};
    for (std::size_t b = 0; b < a.blocks; ++b) {
        std::int64_t I = 0;
        for (std::size_t l = 0; l < 32; ++l)
            I += std::int64_t(weight_int(row, b, l)) * a.q[(i * a.blocks + b) * 32 + l];
        const float dx = a.d[i * a.blocks + b];
        float& lane = acc[b % 8];
        if constexpr (std::is_same_v<S, q4_k_block>) {
            const k_sub_scale sc = k_sub_scale_of(row[b / 8], b % 8);
            lane = std::fma(float(I), sc.d * dx, lane);
            lane = std::fma(float(a.s[i * a.blocks + b]), -(sc.m * dx), lane);
        } else {
            lane = std::fma(float(I), row[b].scale() * dx, lane);
        }
    }
    return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
}

// y [n, O] of X [n, K] (row stride ldx) and W [O, K].
template <weight_type W>
std::vector<float> linear_int8(const weight_view<W>& w, const float* x, std::size_t n, std::size_t ldx)
{
    const act_q8 a = quantize_act(x, n, w.cols, ldx);
    std::vector<float> y(n * w.rows);
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t o = 0; o < w.rows; ++o)
            y[i * w.rows + o] = qdot(w.row(o), a, i);
    return y;
}

} // namespace kdial::ref
