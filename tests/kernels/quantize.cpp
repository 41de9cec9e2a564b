// q8 (GGUF Q8_0) quantisation and bf16 conversion: the block layout is
// GGUF's byte for byte, the documented error bounds hold, padding and
// all-zero blocks are exact, bad weights are named, bf16 round trips.
#include <doctest/doctest.h>

#include <kdial/kernels/quantize.hpp>
#include <kdial/simd/convert.hpp>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <limits>
#include <random>
#include <string>
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
            // d = max|w| / 127 in f32, stored as the nearest f16.
            const float d = amax / 127.0f;
            REQUIRE(blk.scale_f16().bits == f16::from_float(d).bits);
            const bool subnormal = d < 0x1p-14f;
            for (std::size_t i = 0; i < std::size_t(q8_block_size); ++i) {
                const std::size_t k = k0 + i;
                if (k >= cols) {
                    REQUIRE(blk.q[i] == 0); // zero padding
                    continue;
                }
                REQUIRE(blk.q[i] >= -127);
                const float deq = simd::dequant(blk, i);
                // Documented bound (kernels/quantize.hpp): max|w_b| / 225 with
                // a normal f16 scale, max|w_b| / 254 (1 + 2^-13) + 2^-18 with
                // a subnormal one; plus the rounding of d * q (half an ulp).
                const double bound = (subnormal ? amax / 254.0 * (1 + 0x1p-13) + 0x1p-18 : amax / 225.0)
                    + std::ldexp(double(amax), -24);
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
        const std::size_t rows = 6, stride = storage_cols<q8_t>(cols) + 2;
        std::vector<float> w(rows * cols);
        std::uniform_real_distribution<float> U(-3.f, 3.f);
        for (float& v : w)
            v = U(rng);
        // One block all zero, one a single huge outlier, one row of tiny
        // weights (f16-subnormal scales) and one of mixed magnitudes.
        for (std::size_t k = 0; k < std::min<std::size_t>(cols, 32); ++k)
            w[1 * cols + k] = 0.0f;
        w[2 * cols] = 1e4f;
        for (std::size_t k = 0; k < cols; ++k) {
            w[3 * cols + k] *= 1e-4f;
            w[4 * cols + k] = std::ldexp(w[4 * cols + k], int(k % 41) - 30);
        }
        std::vector<q8_block> q(rows * stride);
        quantize_q8(cmatrix_view<float>(w.data(), rows, cols), q.data(), stride);
        check_q8_rows(w, rows, cols, q, stride);
        CHECK(q[1 * stride].scale() == 0.0f);
        CHECK(q[2 * stride].q[0] == 127);

        // From bf16 and f16 rows: the same as quantising their f32 values.
        std::vector<bf16> wb(rows * cols);
        std::vector<f16> wh(rows * cols);
        std::vector<float> wf(rows * cols), whf(rows * cols);
        for (std::size_t i = 0; i < w.size(); ++i) {
            wb[i] = bf16::from_float(w[i]);
            wf[i] = wb[i].to_float();
            wh[i] = f16::from_float(w[i]);
            whf[i] = wh[i].to_float();
        }
        std::vector<q8_block> qb(rows * stride), qh(rows * stride), qhf(rows * stride);
        quantize_q8(cmatrix_view<bf16>(wb.data(), rows, cols), qb.data(), stride);
        check_q8_rows(wf, rows, cols, qb, stride);
        quantize_q8(cmatrix_view<f16>(wh.data(), rows, cols), qh.data(), stride);
        quantize_q8(cmatrix_view<float>(whf.data(), rows, cols), qhf.data(), stride);
        check_q8_rows(whf, rows, cols, qh, stride);
        for (std::size_t r = 0; r < rows; ++r)
            CHECK(std::memcmp(
                      qh.data() + r * stride, qhf.data() + r * stride, storage_cols<q8_t>(cols) * sizeof(q8_block))
                == 0);
    }
}

TEST_CASE("q8_block: the GGUF Q8_0 layout, byte for byte [kernels][quantize]")
{
    static_assert(sizeof(q8_block) == 34 && alignof(q8_block) == 1);
    static_assert(offsetof(q8_block, q) == 2);
    // A block from the Q8_0 definition: d = f16(max|w| / 127) little-endian
    // in bytes 0-1, then q = round(w / d) as int8. max|w| = 1: d = 1/127 =
    // 2^-7 * 1.00787..., f16 0x2008 (exponent 8, fraction round(8.06) = 8).
    float w[32];
    for (int i = 0; i < 32; ++i)
        w[i] = float(i - 16) / 16.0f; // -1 .. 0.9375
    q8_block b;
    quantize_q8(cmatrix_view<float>(w, 1, 32), &b, 1);
    unsigned char bytes[34];
    std::memcpy(bytes, &b, sizeof bytes);
    CHECK(bytes[0] == 0x08);
    CHECK(bytes[1] == 0x20);
    CHECK(static_cast<std::int8_t>(bytes[2]) == -127); // w = -1
    CHECK(static_cast<std::int8_t>(bytes[2 + 16]) == 0); // w = 0
    CHECK(static_cast<std::int8_t>(bytes[2 + 24]) == 64); // w = 0.5: 63.5 -> 64 (half away from 0)
    for (int i = 0; i < 32; ++i)
        CHECK(b.q[i] == std::int8_t(std::round(w[i] * (1.0f / (1.0f / 127.0f)))));
    CHECK(b.scale() == f16::from_bits(0x2008).to_float());

    // Blocks read in place at an odd address, as in a mapped file.
    alignas(64) unsigned char file[1 + 3 * 34];
    for (int r = 0; r < 3; ++r)
        std::memcpy(file + 1 + 34 * r, &b, 34);
    const auto* blocks = reinterpret_cast<const q8_block*>(file + 1);
    for (std::size_t k = 0; k < 3 * 32; ++k)
        CHECK(simd::weight_at(blocks, k) == simd::weight_at(&b, k % 32));
}

TEST_CASE("quantize_q8: names a non-finite weight and a scale past f16 [kernels][quantize][errors]")
{
    std::vector<float> w(2 * 40, 0.5f);
    std::vector<q8_block> q(2 * 2);
    const auto message = [&] {
        try {
            quantize_q8(cmatrix_view<float>(w.data(), 2, 40), q.data(), 2);
        } catch (const kdial::error& e) {
            return std::string(e.what());
        }
        return std::string("no error");
    };
    CHECK(message() == "no error");
    w[1 * 40 + 35] = std::numeric_limits<float>::infinity();
    CHECK(message() == "quantize_q8: source row 1 column 35 is inf");
    w[1 * 40 + 35] = 0.5f;
    w[7] = 9e6f; // 9e6 / 127 > 65504
    CHECK(message().find("source row 0 columns [0, 32): max |w| = 9e+06 needs a scale beyond the f16 range")
        != std::string::npos);
    w[7] = 8e6f; // 8e6 / 127 = 62992 fits
    CHECK(message() == "no error");
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
    CHECK(simd::scale_of(blk[1]) == blk[1].scale());
    for (std::size_t k = 0; k + L <= 64; k += L) {
        simd::load_weights(static_cast<const q8_block*>(blk), k).store_aligned(out);
        for (std::size_t i = 0; i < L; ++i)
            CHECK(out[i] == simd::weight_at(static_cast<const q8_block*>(blk), k + i));
    }
}
