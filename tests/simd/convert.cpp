// simd/convert.hpp and the f16 type: exact f16 widening (scalar, hardware
// and every arch's vector load), round-to-nearest-even narrowing checked at
// every f16 midpoint, and the widening loads of each weight format equal to
// the scalar weight_at on misaligned rows, for every arch this CPU runs.
#include <doctest/doctest.h>

#include <kdial/core/blocks.hpp>
#include <kdial/kernels/quantize.hpp>
#include <kdial/simd/convert.hpp>
#include <kdial/simd/vec.hpp>

#include "kernels/arch_kernels.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

using namespace kdial;

namespace {

// The value of a finite f16 from its fields, in double (independent of
// the bit tricks in f16::to_float).
double f16_value(std::uint16_t h)
{
    const int e = (h >> 10) & 0x1f, m = h & 0x3ff;
    const double v = e == 0 ? std::ldexp(double(m), -24) : std::ldexp(double(m + 1024), e - 25);
    return (h & 0x8000) ? -v : v;
}

} // namespace

TEST_CASE("f16: exact widening of every value, scalar and hardware [simd][convert][f16]")
{
    for (std::uint32_t b = 0; b < 0x10000u; ++b) {
        const f16 h = f16::from_bits(static_cast<std::uint16_t>(b));
        const float f = h.to_float();
        const float hw = simd::widen(h);
        REQUIRE(std::memcmp(&f, &hw, sizeof f) == 0);
        const int e = (b >> 10) & 0x1f;
        if (e == 0x1f) {
            const bool special_ok = (b & 0x3ffu) == 0 ? std::isinf(f) : std::isnan(f);
            REQUIRE(special_ok);
            REQUIRE(std::signbit(f) == bool(b & 0x8000));
            continue;
        }
        REQUIRE(double(f) == f16_value(static_cast<std::uint16_t>(b)));
        REQUIRE(std::signbit(f) == bool(b & 0x8000)); // -0 too
        // Every f16 survives f16 -> f32 -> f16.
        REQUIRE(f16::from_float(f).bits == b);
    }
}

TEST_CASE("f16: narrowing rounds to nearest even at every midpoint [simd][convert][f16]")
{
    // For consecutive positive f16 values a < b, the floats just below, at
    // and just above their midpoint round to a, to the even one, and to b.
    for (std::uint32_t a = 0; a < 0x7c00u; ++a) {
        const std::uint32_t b = a + 1;
        const double mid = (f16_value(std::uint16_t(a)) + (b == 0x7c00u ? 65536.0 : f16_value(std::uint16_t(b)))) / 2;
        const float m = float(mid); // exact: the midpoint has at most 13 significant bits
        REQUIRE(double(m) == mid);
        const std::uint32_t even = (a & 1) ? b : a;
        REQUIRE(f16::from_float(m).bits == even);
        REQUIRE(f16::from_float(std::nextafter(m, 0.0f)).bits == a);
        REQUIRE(f16::from_float(std::nextafter(m, 1e9f)).bits == b);
        REQUIRE(f16::from_float(-m).bits == (even | 0x8000u));
    }
    const float inf = std::numeric_limits<float>::infinity();
    CHECK(f16::from_float(inf).bits == 0x7c00u);
    CHECK(f16::from_float(-inf).bits == 0xfc00u);
    CHECK(f16::from_float(1e10f).bits == 0x7c00u);
    CHECK(std::isnan(f16::from_float(std::numeric_limits<float>::quiet_NaN()).to_float()));
    CHECK(f16::from_float(std::numeric_limits<float>::denorm_min()).bits == 0u);
    CHECK(f16::from_float(-0.0f).bits == 0x8000u);
    CHECK(f16::from_float(65504.0f).bits == 0x7bffu);
}

TEST_CASE_TEMPLATE("convert: each arch's widening loads equal weight_at, misaligned [simd][convert]", W, f32_t, bf16_t,
    f16_t, q8_t, q4_0_t, q4_k_t)
{
    using S = typename W::storage;
    constexpr bool blocks = simd::weight_group < S >> 1;
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> U(-2.f, 2.f);
    const std::size_t cols = std::is_same_v<W, q4_k_t> ? 2 * qk_k : 3 * q8_block_size;
    std::vector<float> f(cols);
    for (float& v : f)
        v = U(rng);
    f[3] = 1e-6f; // f16 subnormal
    f[40] = -0.0f;
    // One row, in storage format W, one storage element into its buffer.
    std::vector<S> buf(storage_cols<W>(cols) + 2);
    S* row = buf.data() + 1;
    if constexpr (std::is_same_v<W, q8_t>) {
        quantize_q8(cmatrix_view<float>(f.data(), 1, cols), row, storage_cols<W>(cols));
    } else if constexpr (std::is_same_v<W, q4_0_t>) {
        quantize_q4_0(f.data(), cols, 1, cols, row, storage_cols<W>(cols));
    } else if constexpr (std::is_same_v<W, q4_k_t>) {
        quantize_q4_k(f.data(), cols, 1, cols, row, storage_cols<W>(cols));
    } else {
        for (std::size_t i = 0; i < cols; ++i) {
            if constexpr (std::is_same_v<W, f32_t>)
                row[i] = f[i];
            else
                row[i] = S::from_float(f[i]);
        }
    }
    for (const auto* arch : test::kernel_archs()) {
        CAPTURE(arch->name);
        const std::size_t L = arch->lanes;
        float out[64];
        // Every vector position (block formats: within a block of 32), so
        // every start alignment of the storage is taken.
        for (std::size_t k = 0; k + L <= cols; k += (blocks ? L : 1)) {
            arch->get<W>().load(row, k, out);
            for (std::size_t i = 0; i < L; ++i) {
                const float want = simd::weight_at(static_cast<const S*>(row), k + i);
                REQUIRE(std::memcmp(&out[i], &want, sizeof want) == 0);
            }
        }
    }
}

TEST_CASE("dot_w / axpy_w: bf16 and f16 give the bits of their widened copy; float within the bound / fma per element "
          "[simd][convert][kernels]")
{
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> U(-3.f, 3.f);
    for (const std::size_t n : { 1, 7, 8, 15, 16, 17, 31, 33, 64, 100, 128, 131 }) {
        CAPTURE(n);
        // One element into each buffer: misaligned for every arch.
        std::vector<float> a(n + 1), b(n + 1), wb(n + 1), wh(n + 1), y0(n + 1);
        std::vector<bf16> b16(n + 1);
        std::vector<f16> h16(n + 1);
        for (std::size_t i = 0; i < n + 1; ++i) {
            a[i] = U(rng);
            b[i] = U(rng);
            y0[i] = U(rng);
            b16[i] = bf16::from_float(b[i]);
            h16[i] = f16::from_float(b[i]);
            wb[i] = b16[i].to_float();
            wh[i] = h16[i].to_float();
        }
        const auto same = [](float x, float y) { return std::memcmp(&x, &y, sizeof x) == 0; };
        // float: a sum of n products in float differs from the exact one by
        // at most gamma_n * sum |a b| (n u / (1 - n u)).
        double exact = 0, mag = 0;
        for (std::size_t i = 1; i <= n; ++i) {
            exact += double(a[i]) * double(b[i]);
            mag += std::fabs(double(a[i]) * double(b[i]));
        }
        const double u = std::ldexp(1.0, -24), gamma = double(n) * u / (1.0 - double(n) * u);
        CHECK(std::fabs(double(simd::dot_w(a.data() + 1, b.data() + 1, n)) - exact) <= gamma * mag);
        CHECK(same(simd::dot_w(a.data() + 1, b16.data() + 1, n), simd::dot(a.data() + 1, wb.data() + 1, n)));
        CHECK(same(simd::dot_w(a.data() + 1, h16.data() + 1, n), simd::dot(a.data() + 1, wh.data() + 1, n)));
        CHECK_FALSE(same(simd::dot_w(a.data() + 1, b16.data() + 1, n), simd::dot(a.data() + 1, b.data() + 1, n)));
        const float alpha = U(rng);
        std::vector<float> y1 = y0, y2 = y0;
        simd::axpy_w(alpha, b16.data() + 1, y1.data() + 1, n);
        simd::axpy(alpha, wb.data() + 1, y2.data() + 1, n);
        CHECK(std::memcmp(y1.data(), y2.data(), (n + 1) * sizeof(float)) == 0);
        y1 = y0;
        y2 = y0;
        simd::axpy_w(alpha, b.data() + 1, y1.data() + 1, n);
        for (std::size_t i = 1; i <= n; ++i) // one correctly rounded fma per element
            y2[i] = std::fma(alpha, b[i], y0[i]);
        CHECK(std::memcmp(y1.data(), y2.data(), (n + 1) * sizeof(float)) == 0);
        CHECK(y1[0] == y0[0]); // nothing before the range is touched
    }
}
