// Weight element types: f32, bf16, f16, q8 (GGUF Q8_0 blocks), and the
// 4-bit GGUF blocks q4_0 (Q4_0) and q4_k (Q4_K), which the kernels also run
// in place; the Q5_K and Q6_K block layouts are here for loaders (they are
// repacked to q8 at load, see kernels/blocks.hpp).
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
#include <cstddef>
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

// Little-endian f16 from two bytes (the block scales of the GGUF formats).
constexpr f16 f16_at(const std::uint8_t* p) noexcept
{
    return f16::from_bits(static_cast<std::uint16_t>(p[0] | (p[1] << 8)));
}

// One GGUF Q4_0 block: f16 d, then 16 bytes holding 32 unsigned 4-bit q
// (18 bytes, 0.5625 B/weight). Element i < 16 is the low nibble of qs[i],
// element 16 + i its high nibble; value = d * (q - 8), exact in f32 (an
// 11-bit d times an integer in [-8, 7]).
inline constexpr int q4_0_block_size = 32;
struct q4_0_block {
    std::uint8_t d[2];
    std::uint8_t qs[q4_0_block_size / 2];

    constexpr f16 scale_f16() const noexcept { return f16_at(d); }
    constexpr float scale() const noexcept { return scale_f16().to_float(); }
    constexpr void set_scale(f16 s) noexcept
    {
        d[0] = static_cast<std::uint8_t>(s.bits & 0xffu);
        d[1] = static_cast<std::uint8_t>(s.bits >> 8);
    }
    // q of element i (< 32), in [0, 15]. Branch-free: GCC 12.2 at -O2
    // -march=native (AVX-512) vectorises an int32 sum over
    // `i < 16 ? qs[i] & 0xf : qs[i - 16] >> 4`, i < 32, wrongly (reproduced:
    // tests/kernels/blocks.cpp); this form it compiles right.
    constexpr int nibble(std::size_t i) const noexcept { return (qs[i % 16] >> (4 * (i / 16))) & 0xf; }
};
static_assert(sizeof(q4_0_block) == 18 && alignof(q4_0_block) == 1);

// The GGUF K-quant super-block covers 256 consecutive inputs of a row (a
// row's length must be a multiple of 256: GGUF stores no partial blocks).
inline constexpr int qk_k = 256;

// The 6-bit scale (sc) and min (m) of sub-block j < 8 of a Q4_K/Q5_K
// super-block, from its 12 packed bytes s: sub-blocks 0-3 keep both in the
// low 6 bits of s[j] and s[j + 4]; sub-blocks 4-7 keep their low 4 bits in
// the nibbles of s[j + 4] (sc low, m high) and their top 2 bits in the top
// 2 bits of s[j - 4] (sc) and s[j] (m).
struct k_scale_min {
    int sc, m;
};
constexpr k_scale_min k_scale_min_at(const std::uint8_t* s, std::size_t j) noexcept
{
    if (j < 4)
        return { s[j] & 63, s[j + 4] & 63 };
    return { (s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4) };
}

// One GGUF Q4_K super-block (144 bytes, 4.5 bits/weight): f16 d, f16 dmin,
// 12 bytes of packed 6-bit scales and mins (k_scale_min_at) for 8
// sub-blocks of 32, and 128 bytes of 4-bit q. Elements 64c .. 64c + 31 are
// the low nibbles of qs[32c .. 32c + 31], elements 64c + 32 .. 64c + 63
// their high nibbles; element i is in sub-block j = i / 32 and has the value
// d * sc_j * q - dmin * m_j (exact in double, rounded once to f32).
struct q4_k_block {
    std::uint8_t d[2];
    std::uint8_t dmin[2];
    std::uint8_t scales[12];
    std::uint8_t qs[qk_k / 2];
};
static_assert(sizeof(q4_k_block) == 144 && alignof(q4_k_block) == 1);

// One GGUF Q5_K super-block (176 bytes, 5.5 bits/weight): as Q4_K plus a
// fifth bit per element: element 64c + l (l < 32) adds 16 if bit 2c of
// qh[l] is set, element 64c + 32 + l if bit 2c + 1 is; q in [0, 31].
struct q5_k_block {
    std::uint8_t d[2];
    std::uint8_t dmin[2];
    std::uint8_t scales[12];
    std::uint8_t qh[qk_k / 8];
    std::uint8_t qs[qk_k / 2];
};
static_assert(sizeof(q5_k_block) == 176 && alignof(q5_k_block) == 1);

// One GGUF Q6_K super-block (210 bytes, 6.5625 bits/weight): two halves of
// 128 elements; in half h, element 128h + 32g + l (g < 4, l < 32) takes
// its low 4 bits from ql[64h + l + 32 (g % 2)] (low nibble for g < 2, high
// for g >= 2) and its top 2 bits from bits 2g, 2g + 1 of qh[32h + l];
// q in [-32, 31] after subtracting 32. 16 int8 scales, one per 16
// elements; value = d * scales[i / 16] * q (f16 d at the end).
struct q6_k_block {
    std::uint8_t ql[qk_k / 2];
    std::uint8_t qh[qk_k / 4];
    std::int8_t scales[qk_k / 16];
    std::uint8_t d[2];
};
static_assert(sizeof(q6_k_block) == 210 && alignof(q6_k_block) == 1);

// Values are appended so that those of the older types stay.
enum class dtype { f32, bf16, q8, f16, q4_0, q4_k };

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
    case dtype::q4_0:
        return "q4_0";
    case dtype::q4_k:
        return "q4_k";
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
struct q4_0_t {
    static constexpr dtype id = dtype::q4_0;
    using storage = q4_0_block;
};
struct q4_k_t {
    static constexpr dtype id = dtype::q4_k;
    using storage = q4_k_block;
};

template <class W>
concept weight_type = std::same_as<W, f32_t> || std::same_as<W, bf16_t> || std::same_as<W, f16_t> || std::same_as<W,
    q8_t> || std::same_as<W, q4_0_t> || std::same_as<W, q4_k_t>;

// Calls f(f32_t{}), f(bf16_t{}), f(f16_t{}), f(q8_t{}), f(q4_0_t{}) or
// f(q4_k_t{}) for the runtime dtype.
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
    case dtype::q4_0:
        return std::forward<F>(f)(q4_0_t {});
    case dtype::q4_k:
        return std::forward<F>(f)(q4_k_t {});
    }
    throw error(detail::cat("unsupported dtype value ", static_cast<int>(t)));
}

} // namespace kdial
