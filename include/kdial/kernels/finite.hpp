// Scans for non-finite values (NaN, +-inf) in weight or activation buffers
// of any float format, by their bits: an IEEE value is non-finite exactly
// when its exponent field is all ones. Used to check weights at load
// (olmoe --check-weights) and, where a caller wants it, activations.
// Invariants: no allocation; the data may be unaligned (a view into a
// mapped file); blocks of 256 values are tested with a branch-free
// reduction the compiler vectorises, and only a flagged block is searched.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>

#include "../core/dtype.hpp"

namespace kdial {

namespace detail {

// First i in [0, n) whose value (U bits at p + i * sizeof(U)) has all of
// `exp_mask` set, or n.
template <class U> inline std::size_t first_exp_all_ones(const std::byte* p, std::size_t n, U exp_mask) noexcept
{
    constexpr std::size_t block = 256;
    auto at = [&](std::size_t i) {
        U u;
        std::memcpy(&u, p + i * sizeof(U), sizeof(U));
        return (u & exp_mask) == exp_mask;
    };
    for (std::size_t b = 0; b < n; b += block) {
        const std::size_t e = b + block < n ? b + block : n;
        unsigned any = 0;
        for (std::size_t i = b; i < e; ++i)
            any |= static_cast<unsigned>(at(i));
        if (any)
            for (std::size_t i = b; i < e; ++i)
                if (at(i))
                    return i;
    }
    return n;
}

} // namespace detail

// Index of the first non-finite value, or the size when all are finite.
inline std::size_t first_non_finite(std::span<const float> x) noexcept
{
    return detail::first_exp_all_ones<std::uint32_t>(
        reinterpret_cast<const std::byte*>(x.data()), x.size(), 0x7f800000u);
}
inline std::size_t first_non_finite(std::span<const bf16> x) noexcept
{
    return detail::first_exp_all_ones<std::uint16_t>(
        reinterpret_cast<const std::byte*>(x.data()), x.size(), std::uint16_t(0x7f80u));
}

// The float formats a raw buffer may hold.
enum class float_format { f16, bf16, f32, f64 };

// The same over n values of `fmt` stored at p (any alignment): IEEE half,
// bfloat16, float or double bits.
inline std::size_t first_non_finite(const std::byte* p, std::size_t n, float_format fmt) noexcept
{
    switch (fmt) {
    case float_format::f16:
        return detail::first_exp_all_ones<std::uint16_t>(p, n, std::uint16_t(0x7c00u));
    case float_format::bf16:
        return detail::first_exp_all_ones<std::uint16_t>(p, n, std::uint16_t(0x7f80u));
    case float_format::f32:
        return detail::first_exp_all_ones<std::uint32_t>(p, n, 0x7f800000u);
    case float_format::f64:
        return detail::first_exp_all_ones<std::uint64_t>(p, n, 0x7ff0000000000000ull);
    }
    return n;
}

} // namespace kdial
