// Weight element types: f32, bf16, f16 and q8 (GGUF Q8_0 blocks).
// The dtype is a runtime enum at the edge (a checkpoint says what it holds)
// and a compile-time type inside the kernels; visit_dtype() joins the two.
//
// bf16: the top 16 bits of an IEEE float; widening is an exact 16-bit shift.
// f16: IEEE binary16; every f16 (subnormals and inf included) widens to
// f32 exactly (a NaN to a quiet NaN). Narrowing (both) rounds to nearest-even (NaN stays NaN).
// These are the portable scalar conversions; simd/convert.hpp widens with
// the CPU's instructions (F16C, NEON) and gives the same values.
//
// q8: the GGUF Q8_0 block, byte for byte: an f16 scale d followed by 32 int8
// values q (34 bytes, no padding, alignment 1), value = d * q. The block
// covers 32 consecutive inputs of a weight row. Quantisation follows GGUF:
// d = max|w| / 127 in f32, stored rounded to f16, q = round(w * (1 / d))
// with the f32 d. Error bound per element, derived in kernels/quantize.hpp:
// |w - d16 q| <= max|w_block| / 225, plus at most 2^-18 when d16 is an f16
// subnormal (max|w_block| < 127 * 2^-14, about 0.0078).
#pragma once

#include <bit>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <utility>

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

// IEEE binary16: 1 sign bit, 5 exponent bits (bias 15), 10 fraction bits.
struct f16 {
    std::uint16_t bits = 0;

    static constexpr f16 from_bits(std::uint16_t b) noexcept
    {
        f16 r;
        r.bits = b;
        return r;
    }
    // Round-to-nearest-even narrowing: |f| >= 65520 gives inf, values below
    // the normal range round to f16 subnormals (2^-24 steps), NaN maps to a
    // quiet NaN with the top fraction bits kept.
    static constexpr f16 from_float(float f) noexcept
    {
        const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
        const auto sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
        const std::uint32_t a = u & 0x7fffffffu;
        if (a > 0x7f800000u) // NaN
            return from_bits(static_cast<std::uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu)));
        if (a >= 0x477ff000u) // >= 65520 (halfway between 65504 and 2^16): inf
            return from_bits(static_cast<std::uint16_t>(sign | 0x7c00u));
        if (a >= 0x38800000u) { // >= 2^-14: normal; rebias the exponent 127 -> 15
            std::uint32_t r = a - 0x38000000u;
            r += 0xfffu + ((r >> 13) & 1u); // a carry into the exponent is right too
            return from_bits(static_cast<std::uint16_t>(sign | (r >> 13)));
        }
        const std::uint32_t e = a >> 23;
        if (e < 102) // below 2^-25 (half the smallest subnormal), f32 subnormals included
            return from_bits(sign);
        // Subnormal: |f| = m * 2^(e - 150) = (m >> s) * 2^-24, s = 126 - e in [14, 24].
        const std::uint32_t m = (a & 0x7fffffu) | 0x800000u, s = 126 - e;
        std::uint32_t q = m >> s;
        const std::uint32_t rem = m & ((1u << s) - 1), half = 1u << (s - 1);
        q += rem > half || (rem == half && (q & 1u)) ? 1u : 0u;
        return from_bits(static_cast<std::uint16_t>(sign | q));
    }
    // Exact widening (a signalling NaN comes back quiet).
    constexpr float to_float() const noexcept
    {
        const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
        const std::uint32_t e = (bits >> 10) & 0x1fu, m = bits & 0x3ffu;
        if (e == 0x1fu) // inf; NaN made quiet, payload kept (as F16C and NEON do)
            return std::bit_cast<float>(sign | 0x7f800000u | (m << 13) | (m != 0 ? 0x400000u : 0u));
        if (e != 0)
            return std::bit_cast<float>(sign | ((e + 112) << 23) | (m << 13));
        // Zero or subnormal: m * 2^-24, exact in f32.
        const float v = static_cast<float>(m) * 0x1p-24f;
        return sign ? -v : v;
    }
};

// One q8 block in the GGUF Q8_0 layout: d (f16, little-endian bytes), then
// 32 int8 (34 bytes, 1.0625 B/weight). Alignment 1, so blocks can sit at
// any address of a mapped GGUF file; d is read byte-wise.
inline constexpr int q8_block_size = 32;
struct q8_block {
    std::uint8_t d[2];
    std::int8_t q[q8_block_size];

    // The scale as f16, and widened to f32 (exact).
    constexpr f16 scale_f16() const noexcept { return f16::from_bits(static_cast<std::uint16_t>(d[0] | (d[1] << 8))); }
    constexpr float scale() const noexcept { return scale_f16().to_float(); }
    constexpr void set_scale(f16 s) noexcept
    {
        d[0] = static_cast<std::uint8_t>(s.bits & 0xffu);
        d[1] = static_cast<std::uint8_t>(s.bits >> 8);
    }
};
static_assert(sizeof(q8_block) == 34 && alignof(q8_block) == 1);

// f16 is appended so that the values of the older types stay.
enum class dtype { f32, bf16, q8, f16 };

inline std::string_view dtype_name(dtype t) noexcept
{
    switch (t) {
    case dtype::f32:
        return "f32";
    case dtype::bf16:
        return "bf16";
    case dtype::q8:
        return "q8";
    case dtype::f16:
        return "f16";
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
struct f16_t {
    static constexpr dtype id = dtype::f16;
    using storage = f16;
};
struct q8_t {
    static constexpr dtype id = dtype::q8;
    using storage = q8_block;
};

template <class W>
concept weight_type
    = std::same_as<W, f32_t> || std::same_as<W, bf16_t> || std::same_as<W, f16_t> || std::same_as<W, q8_t>;

// Calls f(f32_t{}), f(bf16_t{}), f(f16_t{}) or f(q8_t{}) for the runtime dtype.
template <class F> decltype(auto) visit_dtype(dtype t, F&& f)
{
    switch (t) {
    case dtype::f32:
        return std::forward<F>(f)(f32_t {});
    case dtype::bf16:
        return std::forward<F>(f)(bf16_t {});
    case dtype::f16:
        return std::forward<F>(f)(f16_t {});
    case dtype::q8:
        return std::forward<F>(f)(q8_t {});
    }
    throw error(detail::cat("unsupported dtype value ", static_cast<int>(t)));
}

} // namespace kdial
