// q8 quantisation and bf16 conversion: the documented error bounds hold,
// padding and all-zero blocks are exact, bf16 round trips.
#include <doctest/doctest.h>

#include <kdial/kernels/quantize.hpp>
#include <kdial/simd/convert.hpp>

#include <cmath>
#include <random>
#include <vector>

using namespace kdial;

namespace {

// Checks every block of q [rows, ceil(cols/32)] against the f32 source.
void check_q8_rows(
    const std::vector<float>& w, std::size_t rows, std::size_t cols, const std::vector<q8_block>& q, std::size_t stride)
{
    double worst = 0;
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t b = 0; b * q8_block_size < cols; ++b) {
            const q8_block& blk = q[r * stride + b];
            float amax = 0;
            const std::size_t k0 = b * q8_block_size;
            for (std::size_t k = k0; k < std::min(cols, k0 + q8_block_size); ++k)
                amax = std::max(amax, std::fabs(w[r * cols + k]));
            REQUIRE(blk.scale == amax / 127.0f);
            for (std::size_t i = 0; i < std::size_t(q8_block_size); ++i) {
                const std::size_t k = k0 + i;
                if (k >= cols) {
                    REQUIRE(blk.q[i] == 0); // zero padding
                    continue;
                }
                REQUIRE(blk.q[i] >= -127);
                const float deq = simd::dequant(blk, i);
                // Documented bound max|w_b| / 254, plus one rounding of the
                // division and of scale * q (a few ulp of amax).
                const double bound = amax / 254.0 + 4.0 * std::ldexp(double(amax), -24);
                const double err = std::fabs(double(deq) - double(w[r * cols + k]));
                worst = std::max(worst, bound > 0 ? err / bound : err);
                if (!(err <= bound)) {
                    INFO("row ", r, " col ", k, " w = ", w[r * cols + k], " dequantised ", deq, " bound ", bound);
                    REQUIRE(err <= bound);
                }
            }
        }
    CHECK(worst <= 1.0);
}

} // namespace

TEST_CASE("quantize_q8: error within the documented bound, odd widths [kernels][quantize]")
{
    std::mt19937 rng(7);
    for (std::size_t cols : { 1u, 5u, 31u, 32u, 33u, 64u, 95u, 257u }) {
        const std::size_t rows = 5, stride = storage_cols<q8_t>(cols) + 2;
        std::vector<float> w(rows * cols);
        std::uniform_real_distribution<float> U(-3.f, 3.f);
        for (float& v : w)
            v = U(rng);
        // Make one block all zero, one a single huge outlier.
        for (std::size_t k = 0; k < std::min<std::size_t>(cols, 32); ++k)
            w[1 * cols + k] = 0.0f;
        w[2 * cols] = 1e4f;
        std::vector<q8_block> q(rows * stride);
        quantize_q8(cmatrix_view<float>(w.data(), rows, cols), q.data(), stride);
        check_q8_rows(w, rows, cols, q, stride);
        CHECK(q[1 * stride].scale == 0.0f);
        CHECK(q[2 * stride].q[0] == 127);

        // From bf16 rows: the same as quantising their f32 values.
        std::vector<bf16> wb(rows * cols);
        std::vector<float> wf(rows * cols);
        for (std::size_t i = 0; i < w.size(); ++i) {
            wb[i] = bf16::from_float(w[i]);
            wf[i] = wb[i].to_float();
        }
        std::vector<q8_block> qb(rows * stride);
        quantize_q8(cmatrix_view<bf16>(wb.data(), rows, cols), qb.data(), stride);
        check_q8_rows(wf, rows, cols, qb, stride);
    }
}

TEST_CASE("quantize_q8: rejects mismatched strides [kernels][quantize][errors]")
{
    std::vector<float> w(2 * 40, 1.0f);
    std::vector<q8_block> q(4);
    CHECK_THROWS_WITH_AS(quantize_q8(cmatrix_view<float>(w.data(), 2, 40), q.data(), 1),
        "quantize_q8: destination row stride 1 < 2 blocks", kdial::error);
}

TEST_CASE("bf16: round trip and narrowing error [kernels][convert]")
{
    // Every non-NaN bf16 survives bf16 -> f32 -> bf16.
    for (std::uint32_t b = 0; b < 0x10000u; ++b) {
        const bf16 v = bf16::from_bits(static_cast<std::uint16_t>(b));
        const float f = v.to_float();
        if (std::isnan(f))
            continue;
        REQUIRE(bf16::from_float(f).bits == v.bits);
    }
    // Narrowing f32 -> bf16 is within half an ulp (2^-8 relative: 8 significant bits).
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> U(-1e3f, 1e3f);
    for (int i = 0; i < 10000; ++i) {
        const float f = U(rng);
        const float g = bf16::from_float(f).to_float();
        REQUIRE(std::fabs(g - f) <= std::ldexp(std::fabs(f), -8));
    }
}

TEST_CASE("convert: vector loads match the scalar widening [kernels][convert]")
{
    using B = xsimd::batch<float>;
    constexpr std::size_t L = B::size;
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> U(-2.f, 2.f);
    std::vector<bf16> h(L + 1);
    for (auto& v : h)
        v = bf16::from_float(U(rng));
    alignas(64) float out[L];
    simd::load_bf16(h.data() + 1).store_aligned(out); // misaligned on purpose
    for (std::size_t i = 0; i < L; ++i)
        CHECK(out[i] == h[i + 1].to_float());

    std::vector<float> w(64);
    for (float& v : w)
        v = U(rng);
    q8_block blk[2];
    quantize_q8(cmatrix_view<float>(w.data(), 1, 64), blk, 2);
    for (std::size_t k = 0; k + L <= 64; k += L) {
        simd::load_weights(static_cast<const q8_block*>(blk), k).store_aligned(out);
        for (std::size_t i = 0; i < L; ++i)
            CHECK(out[i] == simd::weight_at(static_cast<const q8_block*>(blk), k + i));
    }
}
