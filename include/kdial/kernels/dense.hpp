// A dense linear layer whose weight format is known only at run time (the
// projections of attention, lm_head, a dense MLP): any_weight_view holds a
// weight_view of f32, bf16 or q8, and dense_linear() runs Y = X Wᵀ (+ b) in
// parallel over tiles of output columns sized by the weight bytes (never by
// the thread count), so results are bit-identical for any thread count.
#pragma once

#include <cstddef>
#include <variant>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "../parallel/for_each.hpp"
#include "linear.hpp"
#include "weights.hpp"

namespace kdial {

using any_weight_view = std::variant<weight_view<f32_t>, weight_view<bf16_t>, weight_view<q8_t>>;

inline std::size_t rows_of(const any_weight_view& w) noexcept
{
    return std::visit([](const auto& v) { return v.rows; }, w);
}
inline std::size_t cols_of(const any_weight_view& w) noexcept
{
    return std::visit([](const auto& v) { return v.cols; }, w);
}
inline std::size_t bytes_of(const any_weight_view& w) noexcept
{
    return std::visit([](const auto& v) { return v.bytes(); }, w);
}
inline dtype type_of(const any_weight_view& w) noexcept
{
    return std::visit([](const auto& v) { return std::decay_t<decltype(v)>::format::id; }, w);
}

// Y [n, O] = X [n, K] . W [O, K]ᵀ (+ bias [O] if not null).
inline void dense_linear(const any_weight_view& w, cmatrix_view<float> X, matrix_view<float> Y,
                         const float* bias = nullptr)
{
    const std::size_t O = rows_of(w), K = cols_of(w);
    detail::check(X.cols == K && Y.rows == X.rows && Y.cols == O, "kdial::dense_linear: X [", X.rows, ", ", X.cols,
                  "] . W [", O, ", ", K, "]ᵀ does not fit Y [", Y.rows, ", ", Y.cols, "]");
    if (X.rows == 0 || O == 0)
        return;
    // About 256 KiB of weights per tile, a multiple of 64 columns.
    const std::size_t row_bytes = std::max<std::size_t>(1, bytes_of(w) / std::max<std::size_t>(1, O));
    std::size_t cols = std::max<std::size_t>(64, (std::size_t{256} << 10) / row_bytes / 64 * 64);
    // Keep the GEMM's row panel whole; split very tall inputs in 256-row chunks.
    const std::size_t row_chunk = 256;
    const std::size_t col_tiles = (O + cols - 1) / cols;
    const std::size_t row_tiles = (X.rows + row_chunk - 1) / row_chunk;
    std::visit(
        [&](const auto& wv) {
            parallel::for_each_index(col_tiles * row_tiles, [&](std::size_t i) {
                const std::size_t rt = i / col_tiles, ct = i % col_tiles;
                const std::size_t r0 = rt * row_chunk, r1 = std::min(X.rows, r0 + row_chunk);
                const std::size_t c0 = ct * cols, c1 = std::min(O, c0 + cols);
                const auto y = Y.sub_rows(r0, r1 - r0);
                linear(wv, X.sub_rows(r0, r1 - r0), c0, c1, y);
                if (bias)
                    for (std::size_t r = 0; r < y.rows; ++r)
                        for (std::size_t c = c0; c < c1; ++c)
                            y(r, c) += bias[c];
            });
        },
        w);
}

} // namespace kdial
