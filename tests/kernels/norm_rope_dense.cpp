// RMSNorm, RoPE and dense_linear against plain references; dense_linear's
// thread-count independence.
#include <doctest/doctest.h>
#include <kdial/kernels/dense.hpp>
#include <kdial/kernels/rmsnorm.hpp>
#include <kdial/kernels/rope.hpp>

#include "ref/kernels_ref.hpp"
#include "test_util.hpp"

#include <cmath>
#include <random>
#include <vector>

using namespace kdial;

TEST_CASE("rmsnorm: matches double precision, eps inside the square root, in place [kernels][rmsnorm]")
{
    for (std::size_t n : { std::size_t(1), std::size_t(7), std::size_t(16), std::size_t(67), std::size_t(2048) }) {
        const std::size_t T = 5;
        auto x = test::random_floats(T * n, n, -3.0f, 3.0f);
        x[0] = 0.0f;
        const auto g = test::random_floats(n, n + 1, 0.5f, 1.5f);
        std::vector<float> y(T * n);
        const float eps = 1e-5f;
        rmsnorm(cmatrix_view<float>(x.data(), T, n), g.data(), eps, matrix_view<float>(y.data(), T, n));
        for (std::size_t t = 0; t < T; ++t) {
            double ss = 0;
            for (std::size_t i = 0; i < n; ++i)
                ss += double(x[t * n + i]) * x[t * n + i];
            const double r = 1.0 / std::sqrt(ss / double(n) + eps);
            for (std::size_t i = 0; i < n; ++i)
                REQUIRE(std::fabs(y[t * n + i] - g[i] * x[t * n + i] * r)
                    <= 4e-6 * std::fabs(g[i] * x[t * n + i] * r) + 1e-30);
        }
        auto inplace = x;
        rmsnorm(cmatrix_view<float>(inplace.data(), T, n), g.data(), eps, matrix_view<float>(inplace.data(), T, n));
        CHECK(test::same_bytes(inplace, y));
    }
    // All-zero row: eps keeps it finite (0 * r = 0).
    std::vector<float> z(8, 0.0f), g(8, 1.0f), out(8, -1.0f);
    rmsnorm(cmatrix_view<float>(z.data(), 1, 8), g.data(), 1e-6f, matrix_view<float>(out.data(), 1, 8));
    for (float v : out)
        CHECK(v == 0.0f);
}

TEST_CASE("rope: rotate-half pairs (i, i + rot/2), angles pos * theta^(-2i/rot), norms preserved [kernels][rope]")
{
    const std::size_t hd = 16, heads = 3, T = 4, pos0 = 5;
    const double theta = 10000.0;
    std::vector<float> inv(hd / 2), c(T * hd / 2), s(T * hd / 2);
    rope_inv_freq(theta, hd, inv.data());
    for (std::size_t i = 0; i < hd / 2; ++i)
        CHECK(inv[i] == doctest::Approx(std::pow(theta, -2.0 * double(i) / double(hd))).epsilon(1e-6));
    rope_tables(pos0, T, inv.data(), hd, c.data(), s.data());
    auto x = test::random_floats(T * heads * hd, 3);
    const auto x0 = x;
    apply_rope(matrix_view<float>(x.data(), T, heads * hd), heads, hd, hd, c.data(), s.data());
    for (std::size_t t = 0; t < T; ++t)
        for (std::size_t h = 0; h < heads; ++h) {
            double n0 = 0, n1 = 0;
            for (std::size_t i = 0; i < hd / 2; ++i) {
                const double a = double(pos0 + t) * inv[i];
                const double xa = x0[t * heads * hd + h * hd + i], xb = x0[t * heads * hd + h * hd + i + hd / 2];
                const double ya = xa * std::cos(a) - xb * std::sin(a), yb = xb * std::cos(a) + xa * std::sin(a);
                REQUIRE(x[t * heads * hd + h * hd + i] == doctest::Approx(ya).epsilon(1e-5).scale(1));
                REQUIRE(x[t * heads * hd + h * hd + i + hd / 2] == doctest::Approx(yb).epsilon(1e-5).scale(1));
                n0 += xa * xa + xb * xb;
                n1 += double(x[t * heads * hd + h * hd + i]) * x[t * heads * hd + h * hd + i]
                    + double(x[t * heads * hd + h * hd + i + hd / 2]) * x[t * heads * hd + h * hd + i + hd / 2];
            }
            CHECK(n1 == doctest::Approx(n0).epsilon(1e-5));
        }
    // Position 0 is the identity.
    std::vector<float> c0(hd / 2), s0(hd / 2);
    rope_tables(0, 1, inv.data(), hd, c0.data(), s0.data());
    auto y = test::random_floats(hd, 4);
    const auto y0 = y;
    apply_rope(matrix_view<float>(y.data(), 1, hd), 1, hd, hd, c0.data(), s0.data());
    CHECK(test::same_bytes(y, y0));
}

TEST_CASE_TEMPLATE("dense_linear: matches the reference with bias, bit-identical for 1 and 2 threads [kernels][dense]",
    W, f32_t, bf16_t, f16_t, q8_t, q4_0_t, q4_k_t)
{
    std::mt19937 rng(5);
    for (std::size_t n : { std::size_t(1), std::size_t(3), std::size_t(70), std::size_t(300) }) {
        const std::size_t O = 333, K = std::is_same_v<W, q4_k_t> ? 256 : 129;
        auto w = ref::random_weights<W>(O, K, rng);
        const auto X = test::random_floats(n * K, n);
        const auto bias = test::random_floats(O, n + 9);
        std::vector<float> one(n * O), two(n * O);
        const any_weight_view aw = w.view;
        CHECK(rows_of(aw) == O);
        CHECK(cols_of(aw) == K);
        CHECK(type_of(aw) == W::id);
        test::with_threads(1, [&] {
            dense_linear(aw, cmatrix_view<float>(X.data(), n, K), matrix_view<float>(one.data(), n, O), bias.data());
        });
        test::with_threads(2, [&] {
            dense_linear(aw, cmatrix_view<float>(X.data(), n, K), matrix_view<float>(two.data(), n, O), bias.data());
        });
        CHECK(test::same_bytes(one, two));
        std::vector<double> want, mag;
        ref::linear(ref::dequantize(w.view), O, K, X.data(), n, K, want, mag);
        std::vector<double> tol(n * O);
        for (std::size_t i = 0; i < n * O; ++i) {
            want[i] += bias[i % O];
            tol[i] = 2 * ref::gamma(K + 1) * (mag[i] + std::fabs(bias[i % O])) + 1e-30;
        }
        const auto worst = ref::compare(cmatrix_view<float>(one.data(), n, O), want, tol);
        REQUIRE_MESSAGE(worst.ratio <= 1.0, "n=", n, " worst at ", worst.i, ",", worst.j);
    }
    std::vector<float> X(4 * 5), Y(4 * 6);
    std::mt19937 r2(1);
    auto w = ref::random_weights<W>(7, std::is_same_v<W, q4_k_t> ? 256 : 5, r2);
    CHECK_THROWS_AS(
        dense_linear(any_weight_view(w.view), cmatrix_view<float>(X.data(), 4, 5), matrix_view<float>(Y.data(), 4, 6)),
        kdial::error);
}
