// A non-owning view of one weight matrix in Hugging Face orientation
// [out, in], row-major, in any weight format (f32, bf16, f16, q8, q4_0,
// q4_k). Used by the expert kernels (stage 3); the data may live in a
// memory-mapped checkpoint (a GGUF Q8_0, Q4_0 or Q4_K tensor is such a
// matrix, in place). For q8 and q4_0 a row holds ceil(in / 32) blocks (the
// last one zero-padded), for q4_k in / 256 super-blocks (in % 256 == 0,
// checked), and row_stride counts blocks; for f32/bf16/f16 it counts
// elements.
#pragma once

#include <cstddef>

#include "../core/dtype.hpp"
#include "../core/error.hpp"

namespace kdial {

// Storage elements needed for `cols` logical inputs of format W.
template <weight_type W> constexpr std::size_t storage_cols(std::size_t cols) noexcept
{
    if constexpr (std::is_same_v<W, q8_t>)
        return (cols + q8_block_size - 1) / q8_block_size;
    else if constexpr (std::is_same_v<W, q4_0_t>)
        return (cols + q4_0_block_size - 1) / q4_0_block_size;
    else if constexpr (std::is_same_v<W, q4_k_t>)
        return (cols + qk_k - 1) / qk_k;
    else
        return cols;
}

template <weight_type W> struct weight_view {
    using format = W;
    using storage = typename W::storage;

    const storage* data = nullptr;
    std::size_t rows = 0; // out
    std::size_t cols = 0; // in (logical elements)
    std::size_t row_stride = 0; // in storage elements (q8: blocks)

    constexpr weight_view() = default;
    // A dense matrix: row_stride = storage_cols<W>(cols).
    constexpr weight_view(const storage* p, std::size_t r, std::size_t c) noexcept
        : data(p)
        , rows(r)
        , cols(c)
        , row_stride(storage_cols<W>(c))
    {
    }
    constexpr weight_view(const storage* p, std::size_t r, std::size_t c, std::size_t stride) noexcept
        : data(p)
        , rows(r)
        , cols(c)
        , row_stride(stride)
    {
    }

    constexpr const storage* row(std::size_t r) const noexcept { return data + r * row_stride; }
    // Bytes the rows [0, rows) occupy when streamed (for benchmarks).
    constexpr std::size_t bytes() const noexcept { return rows * storage_cols<W>(cols) * sizeof(storage); }
};

namespace detail {
// Throws unless w is [rows, cols] with a valid stride.
template <weight_type W>
void check_weight_shape(
    const weight_view<W>& w, std::size_t rows, std::size_t cols, const char* where, const char* name)
{
    check(w.rows == rows && w.cols == cols, where, ": ", name, " (", dtype_name(W::id), ") has shape [", w.rows, ", ",
        w.cols, "], expected [", rows, ", ", cols, "]");
    if constexpr (std::is_same_v<W, q4_k_t>)
        check(w.cols % qk_k == 0, where, ": ", name, " (q4_k) has ", w.cols, " inputs per row, not a multiple of ",
            qk_k, " (a Q4_K super-block covers 256 inputs)");
    check(w.row_stride >= storage_cols<W>(w.cols), where, ": ", name, " has row stride ", w.row_stride, " < ",
        storage_cols<W>(w.cols), " storage elements per row");
    check(w.data != nullptr || w.rows == 0 || w.cols == 0, where, ": ", name, " is null");
}
} // namespace detail

} // namespace kdial
