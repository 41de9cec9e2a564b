// The one way kdial's multi-row kernels cut n rows into register groups:
// g = ceil(n / M) near-equal groups (n = 5, M = 4: 3 + 2; n = 9: 3 + 3 + 3),
// each handed to a kernel instantiated for its row count. Used by the small
// exact path (rows.hpp) and the int8 paths (qdot.hpp), so a row's group
// depends on n and M only.
#pragma once

#include <cstddef>
#include <utility>

namespace kdial::detail {

// Calls f.template operator()<NR>(i0) for each group [i0, i0 + NR). Every
// NR lies in [Lo, M] when n >= Lo * ceil(n / M) (the caller's bound: e.g.
// n >= 5 for Lo = 3, M >= 6); f is instantiated for Lo..M only.
template <int Lo, int M, class F> inline void for_row_groups(std::size_t n, F&& f) noexcept
{
    static_assert(1 <= Lo && Lo <= M);
    const std::size_t g = (n + M - 1) / M;
    if (g == 0)
        return;
    const std::size_t base = n / g, extra = n % g;
    std::size_t i0 = 0;
    for (std::size_t j = 0; j < g; ++j) {
        const std::size_t nr = base + (j < extra ? 1 : 0);
        [&]<int... I>(std::integer_sequence<int, I...>)
        {
            (void)((nr == std::size_t(Lo + I) && (f.template operator()<Lo + I>(i0), true)) || ...);
        }
        (std::make_integer_sequence<int, M - Lo + 1> {});
        i0 += nr;
    }
}

// Calls f.template operator()<r>() for r = 0 .. R-1, unrolled: kernels
// whose accumulators are indexed by r keep them in registers only when r is
// a constant (GCC 12 and clang 14 leave them on the stack in a loop over r).
template <int R, class F> inline void for_each_index(F&& f) noexcept
{
    [&]<int... r>(std::integer_sequence<int, r...>)
    {
        (f.template operator()<r>(), ...);
    }
    (std::make_integer_sequence<int, R> {});
}

} // namespace kdial::detail
