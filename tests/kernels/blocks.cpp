// core/blocks.hpp and kernels/gguf_weight.hpp: the Q4_0, Q4_K, Q5_K and Q6_K
// dequantisers bit for bit against an independent unpacking written here
// from the formats' definitions (fields read as bit ranges of the block's
// raw bytes at their byte offsets, values computed in double, where they
// are exact, and rounded once), on random blocks with zero, subnormal and
// f16-max scales; the Q4_0 and Q4_K quantisers within their stated error
// bounds; to_weight in place, repacked within the q8 bound, and its errors.
#include <doctest/doctest.h>

#include <kdial/core/blocks.hpp>
#include <kdial/kernels/gguf_weight.hpp>
#include <kdial/simd/convert.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace kdial;

namespace {

// Bits [pos, pos + n) of a little-endian byte string (n <= 8).
unsigned bits(const std::uint8_t* p, std::size_t pos, unsigned n)
{
    unsigned v = 0;
    for (unsigned i = 0; i < n; ++i)
        v |= ((p[(pos + i) / 8] >> ((pos + i) % 8)) & 1u) << i;
    return v;
}

// A finite f16 from its fields, in double.
double half(const std::uint8_t* p)
{
    const unsigned h = bits(p, 0, 8) | (bits(p, 8, 8) << 8);
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    const double v = e == 0 ? std::ldexp(double(m), -24) : std::ldexp(double(m + 1024), e - 25);
    return (h & 0x8000) ? -v : v;
}

// The reference values of one block (raw bytes b), from the definitions.
std::vector<float> ref_q4_0(const std::uint8_t* b)
{
    std::vector<float> y(32);
    const double d = half(b);
    for (std::size_t i = 0; i < 32; ++i) {
        const unsigned q = bits(b + 2, 8 * (i % 16) + 4 * (i / 16), 4);
        y[i] = float(d * (double(q) - 8.0));
    }
    return y;
}

// 6-bit scale and min of sub-block j from the 12 packed bytes s.
void ref_scale_min(const std::uint8_t* s, std::size_t j, unsigned& sc, unsigned& m)
{
    if (j < 4) {
        sc = bits(s, 8 * j, 6);
        m = bits(s, 8 * (j + 4), 6);
    } else {
        sc = bits(s, 8 * (j + 4), 4) | (bits(s, 8 * (j - 4) + 6, 2) << 4);
        m = bits(s, 8 * (j + 4) + 4, 4) | (bits(s, 8 * j + 6, 2) << 4);
    }
}

// Q4_K (five_bit = false; bytes: d 0, dmin 2, scales 4, qs 16) and Q5_K
// (bytes: d 0, dmin 2, scales 4, qh 16, qs 48).
std::vector<float> ref_k(const std::uint8_t* b, bool five_bit)
{
    std::vector<float> y(256);
    const double d = half(b), dmin = half(b + 2);
    const std::uint8_t* qs = b + (five_bit ? 48 : 16);
    for (std::size_t i = 0; i < 256; ++i) {
        const std::size_t j = i / 32, c = i / 64, l = i % 32, hi = j % 2;
        unsigned sc, m;
        ref_scale_min(b + 4, j, sc, m);
        unsigned q = bits(qs, 8 * (32 * c + l) + 4 * hi, 4);
        if (five_bit)
            q += bits(b + 16, 8 * l + 2 * c + hi, 1) << 4;
        y[i] = float(d * sc * q - dmin * m); // exact in double, one rounding
    }
    return y;
}

// Q6_K (bytes: ql 0, qh 128, scales 192, d 208).
std::vector<float> ref_q6_k(const std::uint8_t* b)
{
    std::vector<float> y(256);
    const double d = half(b + 208);
    for (std::size_t i = 0; i < 256; ++i) {
        const std::size_t h = i / 128, g = (i % 128) / 32, l = i % 32;
        const unsigned lo = bits(b, 8 * (64 * h + 32 * (g % 2) + l) + 4 * (g / 2), 4);
        const unsigned hb = bits(b + 128, 8 * (32 * h + l) + 2 * g, 2);
        const int q = int(lo | (hb << 4)) - 32;
        const int sc = static_cast<std::int8_t>(b[192 + i / 16]);
        y[i] = float(d * sc * q);
    }
    return y;
}

// Random f16 scale bits: zero, the smallest subnormal, a subnormal, f16
// max, or a random finite value (either sign).
std::uint16_t random_scale(std::mt19937& rng, int kind)
{
    switch (kind % 6) {
    case 0:
        return 0;
    case 1:
        return 0x0001;
    case 2:
        return std::uint16_t(rng() % 0x400);
    case 3:
        return 0x7bff; // 65504
    case 4:
        return 0xfbff; // -65504
    default: {
        std::uint16_t h;
        do
            h = std::uint16_t(rng());
        while (((h >> 10) & 0x1f) == 0x1f);
        return h;
    }
    }
}

template <class Block> Block random_block(std::mt19937& rng, int kind)
{
    Block b;
    auto* p = reinterpret_cast<std::uint8_t*>(&b);
    for (std::size_t i = 0; i < sizeof b; ++i)
        p[i] = std::uint8_t(rng());
    const auto put = [&](std::size_t off, std::uint16_t h) {
        p[off] = std::uint8_t(h & 0xff);
        p[off + 1] = std::uint8_t(h >> 8);
    };
    if constexpr (std::is_same_v<Block, q6_k_block>) {
        put(208, random_scale(rng, kind));
        if (kind % 7 == 6) // extreme int8 scales
            for (std::size_t i = 0; i < 16; ++i)
                p[192 + i] = i % 2 ? 0x80 : 0x7f;
    } else {
        put(0, random_scale(rng, kind));
        if constexpr (!std::is_same_v<Block, q4_0_block>) {
            put(2, random_scale(rng, kind / 6 + 1));
            if (kind % 7 == 6) // all 6-bit scales and mins 63
                for (std::size_t i = 0; i < 12; ++i)
                    p[4 + i] = 0xff;
        }
    }
    return b;
}

template <class Block> std::vector<float> reference(const Block& b)
{
    const auto* p = reinterpret_cast<const std::uint8_t*>(&b);
    if constexpr (std::is_same_v<Block, q4_0_block>)
        return ref_q4_0(p);
    else if constexpr (std::is_same_v<Block, q4_k_block>)
        return ref_k(p, false);
    else if constexpr (std::is_same_v<Block, q5_k_block>)
        return ref_k(p, true);
    else
        return ref_q6_k(p);
}

bool same_bits(float a, float b)
{
    return std::memcmp(&a, &b, sizeof a) == 0;
}

} // namespace

TEST_CASE_TEMPLATE("blocks: dequantize_row equals the definition bit for bit, extreme scales [kernels][blocks]", Block,
    q4_0_block, q4_k_block, q5_k_block, q6_k_block)
{
    constexpr std::size_t G = block_elems<Block>;
    std::mt19937 rng(41);
    const std::size_t nb = 3;
    for (int round = 0; round < 200; ++round) {
        std::vector<Block> row(nb);
        for (std::size_t b = 0; b < nb; ++b)
            row[b] = random_block<Block>(rng, round * 3 + int(b));
        std::vector<float> got(nb * G);
        dequantize_row(row.data(), nb * G, got.data());
        for (std::size_t b = 0; b < nb; ++b) {
            const std::vector<float> want = reference(row[b]);
            for (std::size_t i = 0; i < G; ++i) {
                CAPTURE(round);
                CAPTURE(b);
                CAPTURE(i);
                REQUIRE(same_bits(got[b * G + i], want[i]));
                REQUIRE(same_bits(block_value(row[b], i), want[i]));
            }
        }
    }
}

TEST_CASE("blocks: the kernels' q4_k scale unpacking (all 8 at once) equals the definition [kernels][blocks]")
{
    std::mt19937 rng(40);
    for (int round = 0; round < 500; ++round) {
        const q4_k_block b = random_block<q4_k_block>(rng, round);
        const simd::q4_k_scales all = simd::scales_of(b);
        const double d = half(b.d), dmin = half(b.dmin);
        for (std::size_t j = 0; j < 8; ++j) {
            unsigned sc, m;
            ref_scale_min(b.scales, j, sc, m);
            CAPTURE(round);
            CAPTURE(j);
            REQUIRE(same_bits(all.d[j], float(d * sc)));
            REQUIRE(same_bits(all.m[j], float(dmin * m)));
            REQUIRE(same_bits(simd::sub_scale_of(b, j).d, all.d[j]));
            REQUIRE(same_bits(simd::sub_scale_of(b, j).m, all.m[j]));
        }
    }
}

namespace {

// The loop GCC 12.2 at -O2 -march=native (AVX-512) vectorised wrongly when
// q4_0_block::nibble branched on i < 16 (all but ~0.1 % of random blocks
// gave a wrong sum); not inlined, as a kernel's tail would be.
[[gnu::noinline]] std::int32_t nibble_dot(const q4_0_block& w, const std::int8_t* x)
{
    std::int32_t s = 0;
    for (std::size_t l = 0; l < 32; ++l)
        s += (w.nibble(l) - 8) * x[l];
    return s;
}

} // namespace

TEST_CASE("blocks: an int32 sum over q4_0_block::nibble is compiled right [kernels][blocks]")
{
    std::mt19937 rng(5);
    std::size_t wrong = 0;
    for (int t = 0; t < 2000; ++t) {
        q4_0_block w {};
        std::int8_t x[32];
        for (auto& q : w.qs)
            q = std::uint8_t(rng() & 0xff);
        for (auto& v : x)
            v = std::int8_t(int(rng() % 255) - 127);
        std::int32_t want = 0;
        for (std::size_t l = 0; l < 16; ++l)
            want += (int(w.qs[l] & 0xf) - 8) * x[l] + (int(w.qs[l] >> 4) - 8) * x[l + 16];
        wrong += nibble_dot(w, x) != want;
    }
    CHECK(wrong == 0);
}

TEST_CASE("blocks: a partial last q4_0 block and q4_0 padding [kernels][blocks]")
{
    // 40 values: one full block and 8 of the second; the rest of the second
    // holds q = 8 (value 0).
    std::vector<float> w(40);
    for (std::size_t i = 0; i < w.size(); ++i)
        w[i] = float(i) - 17.5f;
    std::vector<q4_0_block> q(2);
    quantize_q4_0(w.data(), 40, 1, 40, q.data(), 2);
    for (std::size_t i = 8; i < 32; ++i)
        CHECK(block_value(q[1], i) == 0.0f);
    std::vector<float> got(40);
    dequantize_row(q.data(), 40, got.data());
    for (std::size_t i = 0; i < 40; ++i)
        CHECK(std::fabs(got[i] - w[i]) <= 17.5 / 8 * (1 + 1e-3));
}

namespace {

// Rows of random values with per-block scales spanning tiny to large, plus
// zero, constant and one-hot blocks.
std::vector<float> test_values(std::size_t n, std::mt19937& rng)
{
    std::uniform_real_distribution<float> U(-1.f, 1.f);
    std::vector<float> w(n);
    for (std::size_t b = 0; b < n / 32; ++b) {
        const float s = std::ldexp(1.0f, int(rng() % 40) - 26); // 2^-26 .. 2^13
        const int kind = int(rng() % 8);
        for (std::size_t i = 0; i < 32; ++i) {
            float v = U(rng) * s;
            if (kind == 0)
                v = 0.0f;
            else if (kind == 1)
                v = s;
            else if (kind == 2)
                v = i == 5 ? -s : 0.0f;
            else if (kind == 3)
                v = std::fabs(v); // all positive: no offset needed (Q4_K)
            w[b * 32 + i] = v;
        }
    }
    return w;
}

} // namespace

TEST_CASE("blocks: quantize_q4_0 stays within its stated bound [kernels][blocks][quantize]")
{
    std::mt19937 rng(42);
    const std::size_t rows = 64, cols = 256;
    const std::vector<float> w = test_values(rows * cols, rng);
    std::vector<q4_0_block> q(rows * cols / 32);
    quantize_q4_0(w.data(), cols, rows, cols, q.data(), cols / 32);
    std::vector<float> v(cols);
    double worst = 0;
    for (std::size_t r = 0; r < rows; ++r) {
        dequantize_row(q.data() + r * cols / 32, cols, v.data());
        for (std::size_t b = 0; b < cols / 32; ++b) {
            double amax = 0, m = 0;
            for (std::size_t i = 0; i < 32; ++i)
                if (std::fabs(w[r * cols + b * 32 + i]) > amax) {
                    amax = std::fabs(w[r * cols + b * 32 + i]);
                    m = w[r * cols + b * 32 + i];
                }
            const double f16_term = amax * std::ldexp(1.0, -11) + std::ldexp(1.0, -22);
            for (std::size_t i = 0; i < 32; ++i) {
                const double x = w[r * cols + b * 32 + i], err = std::fabs(x - double(v[b * 32 + i]));
                // Clamped elements (opposite sign to m) may err by amax / 8;
                // the others by half a step, amax / 16.
                const bool same_side = x * m >= 0;
                const double bound = (same_side ? amax / 16 : amax / 8) * (1 + std::ldexp(1.0, -15)) + f16_term;
                CAPTURE(r);
                CAPTURE(b);
                CAPTURE(i);
                REQUIRE(err <= bound);
                worst = std::max(worst, err / bound);
            }
        }
    }
    MESSAGE("q4_0: worst |w - v| / bound = ", worst);
    CHECK(worst > 0.5); // the bound is not vacuous: errors reach its scale
}

TEST_CASE("blocks: quantize_q4_k stays within its stated bound [kernels][blocks][quantize]")
{
    std::mt19937 rng(43);
    const std::size_t rows = 64, cols = 512;
    const std::vector<float> w = test_values(rows * cols, rng);
    std::vector<q4_k_block> q(rows * cols / qk_k);
    quantize_q4_k(w.data(), cols, rows, cols, q.data(), cols / qk_k);
    std::vector<float> v(cols);
    double worst = 0;
    for (std::size_t r = 0; r < rows; ++r) {
        dequantize_row(q.data() + r * cols / qk_k, cols, v.data());
        for (std::size_t sb = 0; sb < cols / qk_k; ++sb) {
            const q4_k_block& blk = q[r * cols / qk_k + sb];
            const float* x = w.data() + r * cols + sb * qk_k;
            // Input-side quantities: s_j, lo_j and their maxima.
            double s[8], smax = 0, lmax = 0;
            for (std::size_t j = 0; j < 8; ++j) {
                double mn = 0, mx = -INFINITY;
                for (std::size_t l = 0; l < 32; ++l) {
                    mn = std::min(mn, double(x[32 * j + l]));
                    mx = std::max(mx, double(x[32 * j + l]));
                }
                s[j] = (mx - mn) / 15;
                smax = std::max(smax, s[j]);
                lmax = std::max(lmax, -mn);
            }
            const double dmin = half(blk.dmin), slack = 1 + std::ldexp(1.0, -16);
            CHECK(dmin <= lmax / 63 * (1 + std::ldexp(1.0, -10) + std::ldexp(1.0, -20)) + std::ldexp(1.0, -24));
            for (std::size_t j = 0; j < 8; ++j) {
                unsigned sc, mq;
                ref_scale_min(blk.scales, j, sc, mq);
                const double D = half(blk.d) * sc;
                // Stated: D_j <= s_j + max s / 63 (1 + 2^-10) (+ 2^-24).
                REQUIRE(D <= s[j] * slack + smax / 63 * (1 + std::ldexp(1.0, -10) + std::ldexp(1.0, -20))
                        + std::ldexp(1.0, -24));
                for (std::size_t l = 0; l < 32; ++l) {
                    const double vv = v[sb * qk_k + 32 * j + l], err = std::fabs(double(x[32 * j + l]) - vv);
                    const double bound
                        = std::max(D / 2, dmin) * slack + std::ldexp(std::fabs(vv), -24) + std::ldexp(1.0, -149);
                    CAPTURE(r);
                    CAPTURE(j);
                    CAPTURE(l);
                    REQUIRE(err <= bound);
                    worst = std::max(worst, err / bound);
                }
            }
        }
    }
    MESSAGE("q4_k: worst |w - v| / bound = ", worst);
    CHECK(worst > 0.5);
}

TEST_CASE(
    "blocks: quantisers reject non-finite values and bad shapes, naming row and columns [kernels][blocks][errors]")
{
    std::vector<float> w(256, 1.0f);
    w[40] = NAN;
    std::vector<q4_0_block> a(8);
    std::vector<q4_k_block> b(1);
    CHECK_THROWS_WITH_AS(
        quantize_q4_0(w.data(), 256, 1, 256, a.data(), 8), doctest::Contains("row 0 columns [32, 64)"), kdial::error);
    CHECK_THROWS_WITH_AS(
        quantize_q4_k(w.data(), 256, 1, 256, b.data(), 1), doctest::Contains("row 0 columns [0, 256)"), kdial::error);
    CHECK_THROWS_WITH_AS(
        quantize_q4_k(w.data(), 200, 1, 200, b.data(), 1), doctest::Contains("not a multiple of 256"), kdial::error);
    w[40] = 1e9f; // d = 1e9 / 8 is beyond f16
    CHECK_THROWS_AS(quantize_q4_0(w.data(), 256, 1, 256, a.data(), 8), kdial::error);
}

namespace {
template <class Block> std::span<const std::byte> as_bytes_of(const std::vector<Block>& v)
{
    return std::as_bytes(std::span<const Block>(v));
}
} // namespace

TEST_CASE("to_weight: Q4_0, Q4_K, Q8_0 in place; Q5_K and Q6_K repacked to q8 within the bound [kernels][blocks][gguf]")
{
    std::mt19937 rng(44);
    const std::size_t rows = 6, cols = 512, nb = rows * cols / qk_k;
    {
        std::vector<q4_0_block> a(rows * cols / 32);
        for (std::size_t i = 0; i < a.size(); ++i)
            a[i] = random_block<q4_0_block>(rng, 5);
        const gguf_weight g = to_weight(2, as_bytes_of(a), rows, cols, "blk.0.ffn_up_exps.weight");
        REQUIRE(std::holds_alternative<weight_view<q4_0_t>>(g.view));
        CHECK(!g.repacked());
        CHECK(std::get<weight_view<q4_0_t>>(g.view).data == a.data());
        CHECK(rows_of(g.view) == rows);
        CHECK(cols_of(g.view) == cols);
    }
    {
        std::vector<q4_k_block> a(nb);
        for (auto& b : a)
            b = random_block<q4_k_block>(rng, 5);
        const gguf_weight g = to_weight(12, as_bytes_of(a), rows, cols, "t");
        REQUIRE(std::holds_alternative<weight_view<q4_k_t>>(g.view));
        CHECK(std::get<weight_view<q4_k_t>>(g.view).data == a.data());
    }
    const auto repacked = [&](auto tag, std::uint32_t type) {
        using Block = decltype(tag);
        std::vector<Block> a(nb);
        for (auto& b : a) {
            b = random_block<Block>(rng, 5);
            // Moderate scales: q8's range ends at 65504 * 127.
            auto* p = reinterpret_cast<std::uint8_t*>(&b);
            const std::size_t off = std::is_same_v<Block, q6_k_block> ? 208 : 0;
            p[off + 1] &= 0x3f;
            if constexpr (!std::is_same_v<Block, q6_k_block>)
                p[3] &= 0x3f;
        }
        const gguf_weight g = to_weight(type, as_bytes_of(a), rows, cols, "t");
        REQUIRE(g.repacked());
        REQUIRE(std::holds_alternative<weight_view<q8_t>>(g.view));
        const auto& v = std::get<weight_view<q8_t>>(g.view);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t b = 0; b < cols / 32; ++b) {
                double amax = 0;
                float orig[32];
                for (std::size_t i = 0; i < 32; ++i) {
                    orig[i] = block_value(a[r * cols / qk_k + b * 32 / qk_k], (b * 32) % qk_k + i);
                    amax = std::max(amax, double(std::fabs(orig[i])));
                }
                for (std::size_t i = 0; i < 32; ++i) {
                    const double err = std::fabs(double(orig[i]) - double(block_value(v.row(r)[b], i)));
                    REQUIRE(err <= amax / 225 + std::ldexp(1.0, -18));
                }
            }
    };
    repacked(q5_k_block {}, 13);
    repacked(q6_k_block {}, 14);
}

TEST_CASE("to_weight: errors name the tensor and the type [kernels][blocks][gguf][errors]")
{
    std::vector<std::byte> bytes(4096);
    const auto span = std::span<const std::byte>(bytes);
    CHECK_THROWS_WITH_AS(to_weight(3, span.first(20 * 8), 8, 32, "blk.1.attn_q.weight"),
        doctest::Contains("'blk.1.attn_q.weight' has GGUF type Q4_1"), kdial::error);
    CHECK_THROWS_WITH_AS(to_weight(99, span, 8, 32, "x"), doctest::Contains("type 99"), kdial::error);
    CHECK_THROWS_WITH_AS(to_weight(12, span.first(144), 1, 128, "blk.0.ffn_down_exps.weight"),
        doctest::Contains("not a multiple of its block of 256"), kdial::error);
    CHECK_THROWS_WITH_AS(
        to_weight(2, span.first(18 * 3), 2, 32, "t"), doctest::Contains("needs 36 bytes, 54 given"), kdial::error);
    CHECK_THROWS_WITH_AS(to_weight(2, span.first(18), std::size_t(1) << 62, 32, "t"),
        doctest::Contains("needs more than"), kdial::error);
    CHECK_THROWS_WITH_AS(to_weight(0, span.subspan(1, 16), 1, 4, "t"), doctest::Contains("not aligned"), kdial::error);
    CHECK_NOTHROW(to_weight(0, span.first(16), 2, 2, "t"));
}
