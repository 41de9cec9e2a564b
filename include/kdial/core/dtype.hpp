// Weight element types: f32, bf16 and q8 (8-bit block quantisation).
// The dtype is a runtime enum at the edge (a checkpoint says what it holds)
// and a compile-time type inside the kernels; visit_dtype() joins the two.
//
// bf16: the top 16 bits of an IEEE float; widening is an exact 16-bit shift.
// Narrowing rounds to nearest-even (NaN stays NaN).
//
// q8: int8 values with one f32 scale per block of 32 consecutive inputs of a
// weight row (scale = max|w| / 127, q = round(w / scale)). Per element the
// error is at most scale / 2 = max|w_block| / 254, so a dot product of
// length n with x has |error| <= sum_blocks (max|w_b| / 254) * sum_{i in b} |x_i|.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <string_view>

#include "error.hpp"

namespace kdial {

struct bf16 {
    std::uint16_t bits = 0;

    static constexpr bf16 from_bits(std::uint16_t b) noexcept
    {
        bf16 r;
        r.bits = b;
        return r;
    }
    // Round-to-nearest-even narrowing; NaN maps to a quiet NaN.
    static bf16 from_float(float f) noexcept
    {
        std::uint32_t u = std::bit_cast<std::uint32_t>(f);
        if ((u & 0x7fffffffu) > 0x7f800000u)
            return from_bits(static_cast<std::uint16_t>((u >> 16) | 0x40u));
        u += 0x7fffu + ((u >> 16) & 1u);
        return from_bits(static_cast<std::uint16_t>(u >> 16));
    }
    float to_float() const noexcept { return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16); }
};

// One q8 block: 32 int8 values and their f32 scale (36 bytes, 1.125 B/weight).
inline constexpr int q8_block_size = 32;
struct q8_block {
    float scale;
    std::int8_t q[q8_block_size];
};
static_assert(sizeof(q8_block) == 36);

enum class dtype { f32, bf16, q8 };

inline std::string_view dtype_name(dtype t) noexcept
{
    switch (t) {
    case dtype::f32:
        return "f32";
    case dtype::bf16:
        return "bf16";
    case dtype::q8:
        return "q8";
    }
    return "?";
}

// Marker types carrying a dtype into templates.
struct f32_t {
    static constexpr dtype id = dtype::f32;
    using storage = float;
};
struct bf16_t {
    static constexpr dtype id = dtype::bf16;
    using storage = bf16;
};
struct q8_t {
    static constexpr dtype id = dtype::q8;
    using storage = q8_block;
};

template <class W>
concept weight_type = std::same_as<W, f32_t> || std::same_as<W, bf16_t> || std::same_as<W, q8_t>;

// Calls f(f32_t{}), f(bf16_t{}) or f(q8_t{}) for the runtime dtype.
template <class F> decltype(auto) visit_dtype(dtype t, F&& f)
{
    switch (t) {
    case dtype::f32:
        return std::forward<F>(f)(f32_t {});
    case dtype::bf16:
        return std::forward<F>(f)(bf16_t {});
    case dtype::q8:
        return std::forward<F>(f)(q8_t {});
    }
    throw error(detail::cat("unsupported dtype value ", static_cast<int>(t)));
}

} // namespace kdial
