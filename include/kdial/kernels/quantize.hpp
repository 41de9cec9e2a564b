// q8 quantisation of weight rows: f32 or bf16 rows -> rows of q8_block
// (ceil(in / 32) blocks per row, the last one zero-padded). Runs once at load
// time, before stage 3; deterministic, writes only the caller's output view.
// Error bound (per element): |w - scale * q| <= scale / 2 = max|w_block| / 254,
// so a dot product with x errs by at most sum_b max|w_b| / 254 * sum_{i in b} |x_i|.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../core/dtype.hpp"
#include "../core/views.hpp"
#include "weights.hpp"

namespace kdial {

// Quantises n values (n <= 32) into one block; the rest of the block is 0.
// scale = max|w| / 127 and q = round(w / scale) (round half away from zero),
// so |q| <= 127; an all-zero block gets scale 0 and q = 0.
inline void quantize_block(const float* w, std::size_t n, q8_block& out) noexcept
{
    float amax = 0.0f;
    for (std::size_t i = 0; i < n; ++i)
        amax = std::fmax(amax, std::fabs(w[i]));
    const float scale = amax / 127.0f;
    out.scale = scale;
    for (std::size_t i = 0; i < static_cast<std::size_t>(q8_block_size); ++i) {
        float q = i < n && scale != 0.0f ? std::round(w[i] / scale) : 0.0f;
        q = std::fmin(127.0f, std::fmax(-127.0f, q));
        out.q[i] = static_cast<std::int8_t>(q);
    }
}

namespace detail {
template <class T>
void quantize_rows(const T* src, std::size_t src_stride, std::size_t rows, std::size_t cols, q8_block* dst,
    std::size_t dst_stride) noexcept
{
    float buf[q8_block_size];
    for (std::size_t r = 0; r < rows; ++r) {
        const T* s = src + r * src_stride;
        q8_block* d = dst + r * dst_stride;
        for (std::size_t b = 0, k = 0; k < cols; ++b, k += q8_block_size) {
            const std::size_t n = cols - k < std::size_t(q8_block_size) ? cols - k : std::size_t(q8_block_size);
            for (std::size_t i = 0; i < n; ++i) {
                if constexpr (std::is_same_v<T, bf16>)
                    buf[i] = s[k + i].to_float();
                else
                    buf[i] = s[k + i];
            }
            quantize_block(buf, n, d[b]);
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

// Quantises src [rows, in] (f32) into dst [rows, in] (q8; dst.data is written
// through, so the view's data must point at writable blocks).
inline void quantize_q8(cmatrix_view<float> src /*[rows, in]*/, q8_block* dst, std::size_t dst_stride /*blocks*/)
{
    detail::check_quantize(src, src.rows, src.cols, dst_stride, dst == nullptr);
    detail::quantize_rows(src.data, src.stride, src.rows, src.cols, dst, dst_stride);
}

// Quantises src [rows, in] (bf16) into dst (q8, dst_stride blocks per row).
inline void quantize_q8(cmatrix_view<bf16> src /*[rows, in]*/, q8_block* dst, std::size_t dst_stride /*blocks*/)
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

} // namespace kdial
