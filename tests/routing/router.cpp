// The router against its reference: every k for many E, options, ordering,
// fixed vs dynamic k, thread-count independence and bad input.
#include <doctest/doctest.h>
#include <kdial/routing/router.hpp>

#include "ref/kernels_ref.hpp"
#include "ref/routing_ref.hpp"
#include "test_util.hpp"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

using namespace kdial;

namespace {

struct routed {
    std::vector<std::int32_t> ids;
    std::vector<float> weights;
};

template <class K>
routed run_route(const std::vector<float>& logits, std::size_t T, int E, K k, const router_options& opt)
{
    routed r { std::vector<std::int32_t>(T * k.value(), -7), std::vector<float>(T * k.value(), -7.0f) };
    route(cmatrix_view<float>(logits.data(), T, E), k, opt, matrix_view<std::int32_t>(r.ids.data(), T, k.value()),
        matrix_view<float>(r.weights.data(), T, k.value()));
    return r;
}

void check_against_ref(const std::vector<float>& logits, std::size_t T, int E, int k, const router_options& opt)
{
    const auto ref = ref::route(logits, T, E, k, opt);
    const auto dyn = run_route(logits, T, E, dynamic_k { k }, opt);
    const auto bridged = with_k(k, [&](auto kk) { return run_route(logits, T, E, kk, opt); });
    REQUIRE_MESSAGE(dyn.ids == ref.ids, "E=", E, " k=", k, " T=", T);
    REQUIRE_MESSAGE(test::same_bytes(dyn.weights, ref.weights), "E=", E, " k=", k, " T=", T);
    REQUIRE(bridged.ids == dyn.ids);
    REQUIRE(test::same_bytes(bridged.weights, dyn.weights));
}

} // namespace

TEST_CASE("route: every k in [1, E] matches the reference for E up to 256 [routing][router]")
{
    for (int E : { 1, 2, 7, 8, 60, 64, 128, 256 })
        for (std::size_t T : { std::size_t(0), std::size_t(1), std::size_t(3), std::size_t(17) }) {
            const auto logits = test::random_normal(T * E, 31u * E + T, 2.0f);
            for (int k = 1; k <= E; ++k) {
                check_against_ref(logits, T, E, k, router_options {});
                router_options renorm;
                renorm.renormalize = true;
                check_against_ref(logits, T, E, k, renorm);
            }
        }
}

TEST_CASE("route: T = 1000 with the common k and k = E [routing][router]")
{
    for (int E : { 8, 60, 64, 256 }) {
        const std::size_t T = 1000;
        const auto logits = test::random_normal(T * E, 77u + E, 3.0f);
        for (int k : { 1, 2, 4, 8, E })
            if (k <= E)
                check_against_ref(logits, T, E, k, router_options {});
    }
}

TEST_CASE("route: options — renormalise, sigmoid, bias for selection only, scale [routing][router]")
{
    const int E = 64;
    const std::size_t T = 17;
    const auto logits = test::random_normal(T * E, 5, 1.5f);
    const auto bias = test::random_floats(E, 6, -0.3f, 0.3f);
    for (int k : { 1, 2, 3, 6, 8, 13, 64 }) {
        router_options o;
        o.score = scoring::sigmoid;
        check_against_ref(logits, T, E, k, o);
        o.selection_bias = bias;
        check_against_ref(logits, T, E, k, o);
        o.renormalize = true;
        o.scale = 2.5f;
        check_against_ref(logits, T, E, k, o);
        o.score = scoring::softmax;
        check_against_ref(logits, T, E, k, o);
    }
    SUBCASE("renormalised weights sum to 1, raw softmax weights sum to less")
    {
        router_options o;
        o.renormalize = true;
        const auto r = run_route(logits, T, E, fixed_k<8> {}, o);
        const auto raw = run_route(logits, T, E, fixed_k<8> {}, router_options {});
        for (std::size_t t = 0; t < T; ++t) {
            float s = 0, s_raw = 0;
            for (int j = 0; j < 8; ++j) {
                s += r.weights[t * 8 + j];
                s_raw += raw.weights[t * 8 + j];
                if (j > 0)
                    CHECK(raw.weights[t * 8 + j] <= raw.weights[t * 8 + j - 1]);
            }
            CHECK(s == doctest::Approx(1.0f).epsilon(1e-6));
            CHECK(s_raw < 1.0f);
        }
    }
    SUBCASE("the bias changes which experts are chosen but not their weights")
    {
        std::vector<float> big(E, 0.0f);
        big[63] = 100.0f; // expert 63 always chosen first
        router_options o;
        o.selection_bias = big;
        const auto r = run_route(logits, T, E, fixed_k<2> {}, o);
        for (std::size_t t = 0; t < T; ++t) {
            CHECK(r.ids[t * 2] == 63);
            const auto p = ref::softmax(logits.data() + t * E, E);
            CHECK(r.weights[t * 2] == doctest::Approx(p[63]).epsilon(1e-5));
        }
    }
}

TEST_CASE("route: ties, negative logits and order of outputs [routing][router]")
{
    // Token 0: three-way tie at the top; token 1: all equal negative logits.
    const std::vector<float> logits { 1.0f, 3.0f, 3.0f, -5.0f, 3.0f, 2.0f, -4.0f, -4.0f, -4.0f, -4.0f, -4.0f, -4.0f };
    const auto r = run_route(logits, 2, 6, dynamic_k { 4 }, router_options {});
    CHECK(r.ids == std::vector<std::int32_t> { 1, 2, 4, 5, 0, 1, 2, 3 });
    CHECK(r.weights[0] == r.weights[1]);
    CHECK(r.weights[1] == r.weights[2]);
    CHECK(r.weights[3] < r.weights[2]);
    for (int j = 0; j < 4; ++j)
        CHECK(r.weights[4 + j] == doctest::Approx(1.0 / 6.0).epsilon(1e-6));
}

TEST_CASE("scores: softmax matches double precision and never overflows [routing][scores]")
{
    for (std::size_t n :
        { std::size_t(1), std::size_t(5), std::size_t(8), std::size_t(60), std::size_t(64), std::size_t(257) }) {
        auto x = test::random_normal(n, n, 4.0f);
        x[0] = 80.0f; // exp(80) overflows float without the max shift
        const auto p = ref::softmax(x.data(), n);
        softmax_inplace(x.data(), n);
        double sum = 0;
        for (std::size_t i = 0; i < n; ++i) {
            CHECK(std::abs(x[i] - p[i]) <= 2e-6 * p[i] + 1e-30);
            sum += x[i];
        }
        CHECK(sum == doctest::Approx(1.0).epsilon(1e-5));
    }
    std::vector<float> s { -100.0f, -1.0f, 0.0f, 1.0f, 100.0f, 3.0f, -3.0f, 0.5f, 20.0f };
    auto expect = s;
    sigmoid_inplace(s.data(), s.size());
    for (std::size_t i = 0; i < s.size(); ++i)
        CHECK(s[i] == doctest::Approx(1.0 / (1.0 + std::exp(-double(expect[i])))).epsilon(1e-6));
}

TEST_CASE("route: byte-identical with 1 and 2 threads [routing][router][determinism]")
{
    const int E = 64;
    const std::size_t T = 4096;
    const auto logits = test::random_normal(T * E, 99, 2.0f);
    routed one, two;
    test::with_threads(1, [&] { one = run_route(logits, T, E, dynamic_k { 8 }, router_options {}); });
    test::with_threads(2, [&] { two = run_route(logits, T, E, dynamic_k { 8 }, router_options {}); });
    CHECK(one.ids == two.ids);
    CHECK(test::same_bytes(one.weights, two.weights));
}

TEST_CASE("route: from hidden states equals route from precomputed logits [routing][router]")
{
    const std::size_t T = 9, d = 37;
    const int E = 7;
    const auto X = test::random_floats(T * d, 1);
    const auto W = test::random_floats(E * d, 2);
    std::vector<float> logits(T * E);
    std::vector<std::int32_t> ids(T * 3);
    std::vector<float> w(T * 3);
    route(cmatrix_view<float>(X.data(), T, d), cmatrix_view<float>(W.data(), E, d), fixed_k<3> {}, router_options {},
        matrix_view<float>(logits.data(), T, E), matrix_view<std::int32_t>(ids.data(), T, 3),
        matrix_view<float>(w.data(), T, 3));
    for (std::size_t t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e) {
            double s = 0;
            for (std::size_t i = 0; i < d; ++i)
                s += double(X[t * d + i]) * W[e * d + i];
            CHECK(logits[t * E + e] == doctest::Approx(s).epsilon(1e-5));
        }
    const auto r = run_route(logits, T, E, dynamic_k { 3 }, router_options {});
    CHECK(r.ids == ids);
    CHECK(test::same_bytes(r.weights, w));
}

namespace {
// Router logits of T rows against each row alone and against the one-row
// GEMV, bit for bit; and against double precision.
template <weight_type W> void check_router_rows(std::size_t E, std::size_t d, std::size_t T, std::uint32_t seed)
{
    std::mt19937 rng(seed);
    const auto w = ref::random_weights<W>(E, d, rng);
    const auto x = ref::random_matrix(T, d, rng, 3);
    std::vector<float> all(T * E), one(E), gemv(E);
    router_logits(cmatrix_view<float>(x.view), any_weight_view(w.view), matrix_view<float>(all.data(), T, E));
    int same_alone = 0, same_gemv = 0, close = 0;
    for (std::size_t t = 0; t < T; ++t) {
        const auto row = cmatrix_view<float>(x.view).sub_rows(t, 1);
        router_logits(row, any_weight_view(w.view), matrix_view<float>(one.data(), 1, E));
        linear(w.view, row, 0, E, matrix_view<float>(gemv.data(), 1, E));
        for (std::size_t e = 0; e < E; ++e) {
            same_alone += all[t * E + e] == one[e];
            same_gemv += one[e] == gemv[e];
            double s = 0, a = 0;
            for (std::size_t i = 0; i < d; ++i) {
                const double p = double(simd::weight_at(w.view.row(e), i)) * x.view(t, i);
                s += p;
                a += std::abs(p);
            }
            close += std::abs(all[t * E + e] - s) <= 1e-5 * a + 1e-30;
        }
    }
    const int n = int(T * E);
    INFO(dtype_name(W::id), " E ", E, " d ", d, " T ", T);
    CHECK(same_alone == n);
    CHECK(same_gemv == n);
    CHECK(close == n);
}
} // namespace

TEST_CASE("router_logits: a token's logits are the same bits alone and in a batch of any size, any weight type "
          "[routing][router][determinism]")
{
    // Row groups of 4 (or 2), weight rows in pairs: odd E and T leave
    // remainders; T = 70 spans two 64-row tiles; E = 1 is a shared-expert
    // gate; d = 256 + 13 leaves a scalar tail (f32, bf16), q8 needs d % 32 == 0.
    std::uint32_t seed = 11;
    for (std::size_t T : { 1, 2, 3, 4, 5, 7, 8, 13, 70 })
        for (std::size_t E : { 1, 2, 7, 64 }) {
            check_router_rows<f32_t>(E, 269, T, seed++);
            check_router_rows<bf16_t>(E, 269, T, seed++);
            check_router_rows<q8_t>(E, 256, T, seed++);
        }
}

TEST_CASE("route: bad input throws a clear kdial::error and leaves the outputs untouched [routing][router][errors]")
{
    const int E = 8;
    const std::size_t T = 4;
    auto logits = test::random_normal(T * E, 3);
    std::vector<std::int32_t> ids(T * 8, -7);
    std::vector<float> w(T * 8, -7.0f);
    auto call = [&](auto k, std::size_t rows_out, std::size_t cols_out, const router_options& o = {}) {
        route(cmatrix_view<float>(logits.data(), T, E), k, o, matrix_view<std::int32_t>(ids.data(), rows_out, cols_out),
            matrix_view<float>(w.data(), rows_out, cols_out));
    };
    auto untouched = [&] {
        for (auto v : ids)
            if (v != -7)
                return false;
        for (auto v : w)
            if (v != -7.0f)
                return false;
        return true;
    };
    CHECK_THROWS_WITH_AS(call(dynamic_k { 0 }, T, 0), "kdial::route: k = 0 outside [1, E = 8]", kdial::error);
    CHECK_THROWS_WITH_AS(call(dynamic_k { 9 }, T, 9), "kdial::route: k = 9 outside [1, E = 8]", kdial::error);
    CHECK_THROWS_WITH_AS(
        call(fixed_k<2> {}, T, 3), "kdial::route: ids has shape [4, 3], expected [4, 2]", kdial::error);
    CHECK_THROWS_WITH_AS(
        call(fixed_k<2> {}, T - 1, 2), "kdial::route: ids has shape [3, 2], expected [4, 2]", kdial::error);
    std::vector<float> short_bias(3, 0.0f);
    router_options ob;
    ob.selection_bias = short_bias;
    CHECK_THROWS_WITH_AS(
        call(fixed_k<2> {}, T, 2, ob), "kdial::route: selection_bias has 3 entries, expected E = 8", kdial::error);
    CHECK(untouched());

    SUBCASE("non-finite logits are rejected, naming token, expert and value")
    {
        logits[2 * E + 5] = std::numeric_limits<float>::quiet_NaN();
        CHECK_THROWS_WITH_AS(call(fixed_k<2> {}, T, 2),
            "kdial::route: router logit of token 2, expert 5 is non-finite (nan)", kdial::error);
        logits[2 * E + 5] = 0.0f;
        logits[3 * E + 0] = std::numeric_limits<float>::infinity();
        CHECK_THROWS_WITH_AS(call(dynamic_k { 3 }, T, 3),
            "kdial::route: router logit of token 3, expert 0 is non-finite (inf)", kdial::error);
        logits[3 * E + 0] = -std::numeric_limits<float>::infinity();
        CHECK_THROWS_WITH_AS(call(dynamic_k { 3 }, T, 3),
            "kdial::route: router logit of token 3, expert 0 is non-finite (-inf)", kdial::error);
        CHECK(untouched());
    }
}
