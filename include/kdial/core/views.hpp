// Non-owning views over caller memory: row-major matrices and spans.
// Every primitive takes its inputs and outputs as views, so weights can live
// in a memory-mapped checkpoint and buffers in a caller-owned workspace.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "error.hpp"

namespace kdial {

// A row-major matrix view: rows x cols elements, row r starting at
// data + r * stride (stride >= cols, in elements).
template <class T> struct matrix_view {
    T* data = nullptr;
    std::size_t rows = 0;
    std::size_t cols = 0;
    std::size_t stride = 0;

    constexpr matrix_view() = default;
    constexpr matrix_view(T* p, std::size_t r, std::size_t c) noexcept
        : data(p)
        , rows(r)
        , cols(c)
        , stride(c)
    {
    }
    constexpr matrix_view(T* p, std::size_t r, std::size_t c, std::size_t s) noexcept
        : data(p)
        , rows(r)
        , cols(c)
        , stride(s)
    {
    }
    // A view of T converts to a view of const T.
    template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>) constexpr matrix_view(
        const matrix_view<U>& o) noexcept
        : data(o.data)
        , rows(o.rows)
        , cols(o.cols)
        , stride(o.stride)
    {
    }

    constexpr T* row(std::size_t r) const noexcept { return data + r * stride; }
    constexpr std::span<T> row_span(std::size_t r) const noexcept { return { row(r), cols }; }
    constexpr T& operator()(std::size_t r, std::size_t c) const noexcept { return data[r * stride + c]; }
    // Rows [begin, begin + count) as a view.
    constexpr matrix_view sub_rows(std::size_t begin, std::size_t count) const noexcept
    {
        return { data + begin * stride, count, cols, stride };
    }
    constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }
};

template <class T> using cmatrix_view = matrix_view<const T>;

namespace detail {
// The first address at or after p that is a multiple of `alignment`: where
// aligned views start in a buffer allocated `alignment` bytes larger than
// they need.
inline std::byte* align_up(std::byte* p, std::size_t alignment) noexcept
{
    return p + (alignment - reinterpret_cast<std::uintptr_t>(p) % alignment) % alignment;
}

// Throws unless view v has exactly rows x cols.
template <class T>
void check_shape(const matrix_view<T>& v, std::size_t rows, std::size_t cols, const char* where, const char* name)
{
    check(v.rows == rows && v.cols == cols, where, ": ", name, " has shape [", v.rows, ", ", v.cols, "], expected [",
        rows, ", ", cols, "]");
    check(v.stride >= v.cols, where, ": ", name, " has row stride ", v.stride, " < cols ", v.cols);
    check(v.data != nullptr || v.rows == 0 || v.cols == 0, where, ": ", name, " is null");
}
} // namespace detail

} // namespace kdial
