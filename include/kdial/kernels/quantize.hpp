// q8 quantisation of weight rows: f32, bf16 or f16 rows -> rows of q8_block
// (GGUF Q8_0; ceil(in / 32) blocks per row, the last one zero-padded). Runs
// once at load time, before stage 3; deterministic, writes only the caller's
// output. For the same f32 input it writes the bytes GGUF's Q8_0 quantiser
// writes: d = max|w| / 127 in f32, id = 1 / d, q = round(w * id) (half away
// from zero), and d stored rounded to f16 (d16).
//
// Error bound per element, with u = 2^-24 and amax = max|w_block|:
//  - |q| <= 127: w * id <= 127 (1 + u)^3 < 127.5.
//  - |w - d q| <= d (1/2 + 2^8 u): rounding q, plus |fl(w id) - w / d|
//    <= 128 * 2u.
//  - |d - d16| <= 2^-11 d while d16 is a normal f16 (d >= 2^-14), else
//    <= 2^-25 (half an f16 subnormal step); times |q| <= 127.
//  - together |w - d16 q| <= d (1/2 + 2^8 u + 127 * 2^-11) <= 0.5621 d, and
//    d <= amax (1 + u) / 127, so |w - d16 q| <= amax / 225; when d16 is
//    subnormal (amax < 127 * 2^-14 ~ 0.0078) the scale term is at most
//    127 * 2^-25 < 2^-18 instead: |w - d16 q| <= amax / 254 (1 + 2^-13) + 2^-18.
//  So a dot product of length n with x errs by at most
//  sum_b (max|w_b| / 225 + 2^-18) * sum_{i in b} |x_i| (plus the f32 sum's own
//  rounding, see kernels/linear.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../core/dtype.hpp"
#include "../core/views.hpp"
#include "weights.hpp"

namespace kdial {

// Quantises n values (n <= 32) into one block; the rest of the block is 0.
// d = max|w| / 127, q = round(w / d) computed as GGUF does; an all-zero
// block gets d = 0 and q = 0. Returns false (and leaves a meaningless block)
// if a value is not finite or d does not fit an f16 (max|w| >= 65520 * 127).
inline bool quantize_block(const float* w, std::size_t n, q8_block& out) noexcept
{
    float amax = 0.0f;
    bool finite = true;
    for (std::size_t i = 0; i < n; ++i) {
        finite = finite && std::isfinite(w[i]);
        amax = std::fmax(amax, std::fabs(w[i]));
    }
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    const f16 d16 = f16::from_float(d);
    out.set_scale(d16);
    for (std::size_t i = 0; i < static_cast<std::size_t>(q8_block_size); ++i) {
        // |w * id| < 127.5 for finite input; the clamp only keeps a
        // non-finite block's conversion defined.
        const float q = i < n ? std::round(w[i] * id) : 0.0f;
        out.q[i] = static_cast<std::int8_t>(q >= -127.0f && q <= 127.0f ? q : 0.0f);
    }
    return finite && std::isfinite(d16.to_float());
}

namespace detail {
template <class T> inline float to_f32(T v) noexcept
{
    if constexpr (std::is_same_v<T, float>)
        return v;
    else
        return v.to_float();
}

template <class T>
void quantize_rows(
    const T* src, std::size_t src_stride, std::size_t rows, std::size_t cols, q8_block* dst, std::size_t dst_stride)
{
    float buf[q8_block_size];
    for (std::size_t r = 0; r < rows; ++r) {
        const T* s = src + r * src_stride;
        q8_block* d = dst + r * dst_stride;
        for (std::size_t b = 0, k = 0; k < cols; ++b, k += q8_block_size) {
            const std::size_t n = cols - k < std::size_t(q8_block_size) ? cols - k : std::size_t(q8_block_size);
            for (std::size_t i = 0; i < n; ++i)
                buf[i] = to_f32(s[k + i]);
            if (!quantize_block(buf, n, d[b])) [[unlikely]] {
                float amax = 0.0f;
                for (std::size_t i = 0; i < n; ++i) {
                    check(std::isfinite(buf[i]), "quantize_q8: source row ", r, " column ", k + i, " is ", buf[i]);
                    amax = std::max(amax, std::fabs(buf[i]));
                }
                check(false, "quantize_q8: source row ", r, " columns [", k, ", ", k + n, "): max |w| = ", amax,
                    " needs a scale beyond the f16 range (max |w| < 65520 * 127)");
            }
        }
    }
}

template <class T>
void check_quantize(
    const matrix_view<const T>& src, std::size_t dst_rows, std::size_t dst_cols, std::size_t dst_stride, bool dst_null)
{
    check_shape(src, src.rows, src.cols, "quantize_q8", "source");
    check(dst_rows == src.rows && dst_cols == src.cols, "quantize_q8: destination has shape [", dst_rows, ", ",
        dst_cols, "], source has [", src.rows, ", ", src.cols, "]");
    check(dst_stride >= storage_cols<q8_t>(dst_cols), "quantize_q8: destination row stride ", dst_stride, " < ",
        storage_cols<q8_t>(dst_cols), " blocks");
    check(!dst_null || dst_rows == 0 || dst_cols == 0, "quantize_q8: destination is null");
}
} // namespace detail

// Quantises src [rows, in] (f32, bf16 or f16) into dst (q8, dst_stride
// blocks per row). Throws kdial::error on bad shapes (before writing), and
// on a non-finite weight or a block whose scale overflows f16 (naming row
// and column; the rows before it are written by then).
inline void quantize_q8(cmatrix_view<float> src /*[rows, in]*/, q8_block* dst, std::size_t dst_stride /*blocks*/)
{
    detail::check_quantize(src, src.rows, src.cols, dst_stride, dst == nullptr);
    detail::quantize_rows(src.data, src.stride, src.rows, src.cols, dst, dst_stride);
}
inline void quantize_q8(cmatrix_view<bf16> src /*[rows, in]*/, q8_block* dst, std::size_t dst_stride /*blocks*/)
{
    detail::check_quantize(src, src.rows, src.cols, dst_stride, dst == nullptr);
    detail::quantize_rows(src.data, src.stride, src.rows, src.cols, dst, dst_stride);
}
inline void quantize_q8(cmatrix_view<f16> src /*[rows, in]*/, q8_block* dst, std::size_t dst_stride /*blocks*/)
{
    detail::check_quantize(src, src.rows, src.cols, dst_stride, dst == nullptr);
    detail::quantize_rows(src.data, src.stride, src.rows, src.cols, dst, dst_stride);
}

// bf16 narrowing of f32 rows (round to nearest even), for tests and loaders.
inline void convert_bf16(cmatrix_view<float> src /*[rows, cols]*/, matrix_view<bf16> dst /*[rows, cols]*/)
{
    detail::check_shape(dst, src.rows, src.cols, "convert_bf16", "destination");
    for (std::size_t r = 0; r < src.rows; ++r)
        for (std::size_t c = 0; c < src.cols; ++c)
            dst(r, c) = bf16::from_float(src(r, c));
}

// f16 narrowing of f32 rows (round to nearest even; |x| >= 65520 -> inf).
inline void convert_f16(cmatrix_view<float> src /*[rows, cols]*/, matrix_view<f16> dst /*[rows, cols]*/)
{
    detail::check_shape(dst, src.rows, src.cols, "convert_f16", "destination");
    for (std::size_t r = 0; r < src.rows; ++r)
        for (std::size_t c = 0; c < src.cols; ++c)
            dst(r, c) = f16::from_float(src(r, c));
}

} // namespace kdial
