// The GGUF block formats beyond Q8_0: scalar dequantisers for Q4_0, Q4_K,
// Q5_K and Q6_K (the layouts are in core/dtype.hpp), and quantisers that
// write Q4_0 and Q4_K (for synthetic checkpoints and tests). Used at load
// time and by the kernels' scalar paths; deterministic, no allocation.
//
// Every value these formats hold is a multiple of 2^-24 (an f16 scale
// times integers) below 2^28 in magnitude, so it is exact in double; kdial
// defines the f32 weight as that exact value rounded once to f32 (what the
// kernels load, what dequantize_row writes). For Q4_0 and Q8_0 the value is
// exact in f32 already; for Q4_K/Q5_K d * sc and dmin * m are exact in f32
// and the one rounding is the final subtraction (the same bits as GGUF's
// own dequantiser).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "dtype.hpp"
#include "error.hpp"

namespace kdial {

// ---- element values -------------------------------------------------------

// Element i (< 32) of a Q4_0 block: d * (q - 8).
inline float block_value(const q4_0_block& b, std::size_t i) noexcept
{
    return b.scale() * static_cast<float>(b.nibble(i) - 8);
}

// The f32 scale d * sc and offset dmin * m of sub-block j (< 8) of a Q4_K
// or Q5_K super-block (both products exact in f32).
struct k_sub_scale {
    float d, m;
};
template <class Block> inline k_sub_scale k_sub_scale_of(const Block& b, std::size_t j) noexcept
{
    const k_scale_min s = k_scale_min_at(b.scales, j);
    return { f16_at(b.d).to_float() * static_cast<float>(s.sc), f16_at(b.dmin).to_float() * static_cast<float>(s.m) };
}

// q (in [0, 15]) of element i (< 256) of a Q4_K super-block.
inline int k4_nibble(const q4_k_block& b, std::size_t i) noexcept
{
    const std::uint8_t byte = b.qs[(i / 64) * 32 + i % 32];
    return (i / 32) % 2 == 0 ? byte & 0xf : byte >> 4;
}

// Element i (< 256) of a Q4_K super-block: d sc q - dmin m, rounded once
// (an fma of exact operands).
inline float block_value(const q4_k_block& b, std::size_t i) noexcept
{
    const k_sub_scale s = k_sub_scale_of(b, i / 32);
    return std::fma(s.d, static_cast<float>(k4_nibble(b, i)), -s.m);
}

// Element i (< 256) of a Q5_K super-block: d sc q - dmin m, q in [0, 31].
inline float block_value(const q5_k_block& b, std::size_t i) noexcept
{
    const std::size_t c = i / 64, l = i % 32, hi = (i / 32) % 2;
    const std::uint8_t byte = b.qs[c * 32 + l];
    const int q = (hi ? byte >> 4 : byte & 0xf) + (((b.qh[l] >> (2 * c + hi)) & 1) << 4);
    const k_sub_scale s = k_sub_scale_of(b, i / 32);
    return std::fma(s.d, static_cast<float>(q), -s.m);
}

// Element i (< 256) of a Q6_K super-block: (d * scale) * (q - 32); d * scale
// is exact in f32, the product is rounded once.
inline float block_value(const q6_k_block& b, std::size_t i) noexcept
{
    const std::size_t h = i / 128, g = (i % 128) / 32, l = i % 32;
    const std::uint8_t lo = b.ql[64 * h + l + 32 * (g % 2)];
    const int q = ((g < 2 ? lo & 0xf : lo >> 4) | (((b.qh[32 * h + l] >> (2 * g)) & 3) << 4)) - 32;
    return f16_at(b.d).to_float() * static_cast<float>(b.scales[i / 16]) * static_cast<float>(q);
}

// Element i (< 32) of a Q8_0 block: d * q (exact).
inline float block_value(const q8_block& b, std::size_t i) noexcept
{
    return b.scale() * static_cast<float>(b.q[i]);
}

// Elements per block of each block format.
template <class Block> inline constexpr std::size_t block_elems = qk_k;
template <> inline constexpr std::size_t block_elems<q8_block> = q8_block_size;
template <> inline constexpr std::size_t block_elems<q4_0_block> = q4_0_block_size;

// ---- dequantisers ---------------------------------------------------------

// out[0:n] = the values of the first n elements held by `blocks` (ceil(n /
// block_elems) blocks; a row of a Q4_K/Q5_K/Q6_K tensor has n % 256 == 0).
template <class Block> inline void dequantize_row(const Block* blocks, std::size_t n, float* out) noexcept
{
    constexpr std::size_t G = block_elems<Block>;
    for (std::size_t i = 0; i < n; ++i)
        out[i] = block_value(blocks[i / G], i % G);
}

// ---- quantisers -----------------------------------------------------------

// Quantises n values (n <= 32) into one Q4_0 block as GGUF's reference
// quantiser does: m = the value of largest magnitude (the first on a tie),
// d = m / -8 in f32, q = min(15, floor(w / d + 8.5)) with 1 / d computed
// once, d stored rounded to f16; the rest of the block is q = 8 (value 0).
// So m itself gets q = 0 (exactly -8 d = m up to d's f16 rounding) and the
// other end of the range is clamped at q = 15 (value 7 d).
// Error bound per element, amax = |m|, |d| = amax / 8:
//  - unclamped, |w / d + 8 - q| <= 1/2 (plus the f32 roundings of w * (1/d)
//    and of + 8.5, below 2^-18 in units of d); clamped (w / d > 7.5, only for w of the opposite sign
//    to m with |w| > 15/16 amax): |w - 7 d| <= |d| = amax / 8;
//  - d16 = f16(d): |d - d16| <= 2^-11 |d| for a normal d16, else <= 2^-25;
//    times |q - 8| <= 8.
//  So |w - d16 (q - 8)| <= amax / 8 (1 + 2^-15) + amax / 2^11 + 2^-22, and
//  amax / 16 (1 + 2^-15) + amax / 2^11 + 2^-22 for every unclamped element. Returns false (a meaningless block)
//  for a non-finite value or a d outside the f16 range (amax >= 8 * 65520).
inline bool quantize_block(const float* w, std::size_t n, q4_0_block& out) noexcept
{
    float amax = 0.0f, m = 0.0f;
    bool finite = true;
    for (std::size_t i = 0; i < n; ++i) {
        finite = finite && std::isfinite(w[i]);
        if (std::fabs(w[i]) > amax) {
            amax = std::fabs(w[i]);
            m = w[i];
        }
    }
    const float d = m / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const f16 d16 = f16::from_float(d);
    out.set_scale(d16);
    for (std::size_t i = 0; i < 16; ++i) {
        int q[2];
        for (std::size_t h = 0; h < 2; ++h) {
            const std::size_t k = i + 16 * h;
            const float v = k < n ? w[k] * id + 8.5f : 8.5f;
            // v >= 0.5 for finite input; the guard keeps a non-finite
            // block's conversion defined.
            q[h] = v >= 0.0f && v < 16.0f ? std::min(15, static_cast<int>(v)) : v >= 16.0f ? 15 : 0;
        }
        out.qs[i] = static_cast<std::uint8_t>(q[0] | (q[1] << 4));
    }
    return finite && std::isfinite(d16.to_float());
}

namespace detail {
// The smallest f16 >= x (x >= 0 finite); inf if x > 65504.
inline f16 f16_ceil(float x) noexcept
{
    f16 h = f16::from_float(x);
    if (h.to_float() < x)
        h = f16::from_bits(static_cast<std::uint16_t>(h.bits + 1));
    return h;
}
} // namespace detail

// Quantises 256 values into one Q4_K super-block (kdial's own rule, simpler
// than GGUF's iterative search, with a bound that covers every element):
// per sub-block j of 32, lo_j = min(0, min w), s_j = (max w - lo_j) / 15;
// d = the smallest f16 >= max_j s_j / 63, dmin = the smallest f16 >=
// max_j (-lo_j) / 63; sc_j = ceil(s_j / d), m_j = ceil(-lo_j / dmin) (both
// <= 63), so D_j = d sc_j >= s_j and M_j = dmin m_j >= -lo_j: w + M_j >= 0
// and (w + M_j) / D_j <= 15 + dmin / D_j. Then q = min(15, round((w + M_j) /
// D_j)), and with the value v = D_j q - M_j (rounded once to f32):
//   |w - v| <= max(D_j / 2, dmin) (1 + 2^-16) + ulp(v) / 2
// (the slack covers the f32 roundings of (w + M_j) / D_j),
// where D_j <= s_j + d <= s_j + (max_j s_j / 63)(1 + 2^-10) and dmin <=
// (max_j -lo_j / 63)(1 + 2^-10) for normal f16 scales (+ 2^-24 when
// subnormal). Returns false for a non-finite value or scales beyond f16.
inline bool quantize_block(const float* w, q4_k_block& out) noexcept
{
    float s[8], lo[8];
    float smax = 0.0f, lmax = 0.0f;
    bool finite = true;
    for (std::size_t j = 0; j < 8; ++j) {
        float mn = 0.0f, mx = -INFINITY;
        for (std::size_t l = 0; l < 32; ++l) {
            const float v = w[32 * j + l];
            finite = finite && std::isfinite(v);
            mn = std::fmin(mn, v);
            mx = std::fmax(mx, v);
        }
        lo[j] = mn;
        s[j] = std::fmax(0.0f, (mx - mn) / 15.0f);
        smax = std::fmax(smax, s[j]);
        lmax = std::fmax(lmax, -mn);
    }
    const f16 d16 = detail::f16_ceil(smax / 63.0f), m16 = detail::f16_ceil(lmax / 63.0f);
    const float d = d16.to_float(), dm = m16.to_float();
    out.d[0] = static_cast<std::uint8_t>(d16.bits & 0xffu);
    out.d[1] = static_cast<std::uint8_t>(d16.bits >> 8);
    out.dmin[0] = static_cast<std::uint8_t>(m16.bits & 0xffu);
    out.dmin[1] = static_cast<std::uint8_t>(m16.bits >> 8);
    const bool ok = finite && std::isfinite(d) && std::isfinite(dm);
    int sc[8], mq[8];
    for (std::size_t j = 0; j < 8; ++j) {
        const float a = d > 0.0f && ok ? std::ceil(s[j] / d) : 0.0f;
        const float b = dm > 0.0f && ok ? std::ceil(-lo[j] / dm) : 0.0f;
        sc[j] = static_cast<int>(std::min(a, 63.0f));
        mq[j] = static_cast<int>(std::min(b, 63.0f));
    }
    for (std::size_t j = 0; j < 4; ++j) {
        out.scales[j] = static_cast<std::uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
        out.scales[j + 4] = static_cast<std::uint8_t>((mq[j] & 63) | ((mq[j + 4] >> 4) << 6));
        out.scales[j + 8] = static_cast<std::uint8_t>((sc[j + 4] & 0xf) | ((mq[j + 4] & 0xf) << 4));
    }
    for (std::size_t j = 0; j < 8; ++j) {
        const float D = d * static_cast<float>(sc[j]), M = dm * static_cast<float>(mq[j]);
        for (std::size_t l = 0; l < 32; ++l) {
            const float t = D > 0.0f && ok ? std::round((w[32 * j + l] + M) / D) : 0.0f;
            const int q = t >= 0.0f ? static_cast<int>(std::min(t, 15.0f)) : 0;
            std::uint8_t& byte = out.qs[(j / 2) * 32 + l];
            byte = j % 2 == 0 ? static_cast<std::uint8_t>((byte & 0xf0) | q)
                              : static_cast<std::uint8_t>((byte & 0x0f) | (q << 4));
        }
    }
    return ok;
}

// Quantises rows of f32 into Q4_0 (ceil(cols / 32) blocks per row, the last
// one padded with zeros) or Q4_K (cols % 256 == 0 required). Throws
// kdial::error on a bad shape (before writing) or a non-finite value or
// out-of-range scale (naming row and columns).
inline void quantize_q4_0(const float* src, std::size_t src_stride, std::size_t rows, std::size_t cols, q4_0_block* dst,
    std::size_t dst_stride)
{
    const std::size_t nb = (cols + q4_0_block_size - 1) / q4_0_block_size;
    detail::check(dst_stride >= nb, "quantize_q4_0: destination row stride ", dst_stride, " < ", nb, " blocks");
    detail::check(dst != nullptr || rows == 0 || cols == 0, "quantize_q4_0: destination is null");
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t b = 0; b < nb; ++b) {
            const std::size_t k = b * q4_0_block_size, n = std::min<std::size_t>(q4_0_block_size, cols - k);
            detail::check(quantize_block(src + r * src_stride + k, n, dst[r * dst_stride + b]), "quantize_q4_0: row ",
                r, " columns [", k, ", ", k + n,
                ") hold a non-finite value or need a scale beyond f16 (|w| < 8 * 65504)");
        }
}

inline void quantize_q4_k(const float* src, std::size_t src_stride, std::size_t rows, std::size_t cols, q4_k_block* dst,
    std::size_t dst_stride)
{
    detail::check(cols % qk_k == 0, "quantize_q4_k: ", cols, " columns is not a multiple of ", qk_k,
        " (Q4_K super-blocks hold 256 inputs)");
    const std::size_t nb = cols / qk_k;
    detail::check(dst_stride >= nb, "quantize_q4_k: destination row stride ", dst_stride, " < ", nb, " blocks");
    detail::check(dst != nullptr || rows == 0 || cols == 0, "quantize_q4_k: destination is null");
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t b = 0; b < nb; ++b)
            detail::check(quantize_block(src + r * src_stride + b * qk_k, dst[r * dst_stride + b]),
                "quantize_q4_k: row ", r, " columns [", b * qk_k, ", ", (b + 1) * qk_k,
                ") hold a non-finite value or need a scale beyond f16");
}

} // namespace kdial
