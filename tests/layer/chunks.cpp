// The row chunks of the tile scheduler (detail::near_equal_chunks, shared
// with distributed/): a partition of [0, n) into ceil(n / max) chunks of at
// most max rows whose sizes differ by at most one (longer ones first), and
// of() finds the chunk of every row. The kernel row classes (row_class).
#include <doctest/doctest.h>

#include <kdial/layer/moe.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <vector>

TEST_CASE("moe near_equal_chunks: a partition into near-equal chunks, of() inverts it [layer][moe]")
{
    for (const std::size_t max : { std::size_t(1), std::size_t(3), std::size_t(7), kdial::moe_workspace::gemm_rows })
        for (std::size_t n = 0; n <= 3 * max + 5; n += (n < 2 * max ? 1 : 3)) {
            CAPTURE(max);
            CAPTURE(n);
            const kdial::detail::near_equal_chunks c(n, max);
            CHECK(c.count == (n + max - 1) / max);
            std::size_t next = 0, shortest = n, longest = 0;
            for (std::size_t j = 0; j < c.count; ++j) {
                const std::size_t r = c.rows(j);
                CHECK(c.begin(j) == next);
                CHECK((r >= 1 && r <= max));
                CHECK((j == 0 || r <= c.rows(j - 1)));
                shortest = std::min(shortest, r);
                longest = std::max(longest, r);
                for (std::size_t g = next; g < next + r; ++g)
                    CHECK(c.of(g) == j);
                next += r;
            }
            CHECK(next == n);
            CHECK((c.count == 0 || longest - shortest <= 1));
        }
}

TEST_CASE("moe row_class: GEMV counts apart, then one class per path [layer][moe]")
{
    using kdial::dtype;
    std::size_t largest = 0;
    for (const dtype t : { dtype::f32, dtype::bf16, dtype::q8, dtype::f16, dtype::q4_0, dtype::q4_k }) {
        CAPTURE(kdial::dtype_name(t));
        const std::size_t s = kdial::small_max_rows_of(t);
        largest = std::max(largest, s);
        CHECK(s > kdial::gemv_max_rows);
        for (std::size_t n = 1; n <= kdial::gemv_max_rows; ++n)
            CHECK(kdial::row_class(n, t) == n);
        for (std::size_t n = kdial::gemv_max_rows + 1; n <= s; ++n)
            CHECK(kdial::row_class(n, t) == kdial::row_class(s, t));
        CHECK(kdial::row_class(s + 1, t) == kdial::row_class(kdial::moe_workspace::gemm_rows, t));
        CHECK(kdial::row_class(s + 1, t) != kdial::row_class(s, t));
        CHECK(kdial::row_class(kdial::gemv_max_rows, t) != kdial::row_class(kdial::gemv_max_rows + 1, t));
    }
    CHECK(largest == kdial::small_max_rows); // small_max_rows bounds every type's

    // What the class promises: a row gets the same bits from any call of
    // its class (past the GEMV), whatever the other rows.
    // f32 weights; rows.cpp and linear.cpp check the paths of every type.
    constexpr dtype t = dtype::f32;
    constexpr std::size_t K = 1100, O = 40, N = 2 * kdial::small_max_rows + 3;
    const auto wv = kdial::test::random_floats(O * K, 21), xv = kdial::test::random_floats(N * K, 22);
    const auto w = kdial::detail::as_weight(kdial::cmatrix_view<float>(wv.data(), O, K));
    auto first_rows = [&](std::size_t n, std::size_t rows) {
        std::vector<float> y(n * O);
        kdial::linear(w, kdial::cmatrix_view<float>(xv.data(), n, K), 0, O, kdial::matrix_view<float>(y.data(), n, O));
        y.resize(rows * O);
        return y;
    };
    const std::size_t lo = kdial::gemv_max_rows + 1, hi = kdial::small_max_rows_of(t) + 1;
    const auto small = first_rows(lo, lo), big = first_rows(hi, hi);
    for (std::size_t n = lo; n <= N; ++n) {
        CAPTURE(n);
        if (kdial::row_class(n, t) == kdial::row_class(lo, t))
            CHECK(kdial::test::same_bytes(first_rows(n, lo), small));
        else
            CHECK(kdial::test::same_bytes(first_rows(n, hi), big));
    }
}
