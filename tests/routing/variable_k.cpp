// Per-token k and threshold routing against their plain references (each
// token exactly as the reference router routes it at its kept count), the
// limits p -> 0 (k_min) and p = 1 (k_max), thread-count independence and
// bad input.
#include <doctest/doctest.h>
#include <kdial/routing/threshold.hpp>
#include <kdial/routing/variable_k.hpp>

#include "ref/routing_k_ref.hpp"
#include "test_util.hpp"

#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace kdial;

namespace {

struct routed {
    std::vector<std::int32_t> ids;
    std::vector<float> weights;
    std::vector<int> kept;
};

routed run_rules(const std::vector<float>& logits, std::size_t T, int E, const std::vector<token_k>& rules, int kc,
    const router_options& opt)
{
    routed r { std::vector<std::int32_t>(T * kc, -7), std::vector<float>(T * kc, -7.0f), std::vector<int>(T, -7) };
    route_token_k(cmatrix_view<float>(logits.data(), T, E), rules, opt, matrix_view<std::int32_t>(r.ids.data(), T, kc),
        matrix_view<float>(r.weights.data(), T, kc), r.kept);
    return r;
}

routed run_threshold(const std::vector<float>& logits, std::size_t T, int E, const threshold_options& th, int kc,
    const router_options& opt)
{
    routed r { std::vector<std::int32_t>(T * kc, -7), std::vector<float>(T * kc, -7.0f), std::vector<int>(T, -7) };
    route_threshold(cmatrix_view<float>(logits.data(), T, E), th, opt, matrix_view<std::int32_t>(r.ids.data(), T, kc),
        matrix_view<float>(r.weights.data(), T, kc), r.kept);
    return r;
}

void require_same(const routed& got, const ref::routing& want, const std::vector<int>& kept, const std::string& what)
{
    REQUIRE_MESSAGE(got.ids == want.ids, what);
    REQUIRE_MESSAGE(test::same_bytes(got.weights, want.weights), what);
    REQUIRE_MESSAGE(got.kept == kept, what);
}

std::vector<router_options> option_sets(int E, std::vector<float>& bias)
{
    bias = test::random_floats(std::size_t(E), 99u + E, -0.05f, 0.05f);
    router_options plain, renorm, scaled, biased, sig;
    renorm.renormalize = true;
    scaled.renormalize = true;
    scaled.scale = 2.5f;
    biased.selection_bias = bias;
    sig.score = scoring::sigmoid;
    return { plain, renorm, scaled, biased, sig };
}

} // namespace

TEST_CASE("route_variable_k: each token gets route() at its own k, bit for bit, then no_expert [routing][variable_k]")
{
    for (int E : { 1, 8, 60, 64 }) {
        std::vector<float> bias;
        for (const auto& opt : option_sets(E, bias))
            for (std::size_t T : { std::size_t(0), std::size_t(1), std::size_t(5), std::size_t(70) }) {
                const auto logits = test::random_normal(T * E, 7u * E + T, 2.0f);
                std::mt19937 rng(unsigned(E + T));
                std::vector<int> k(T);
                int kmax = 1;
                for (auto& x : k) {
                    x = 1 + int(rng() % unsigned(E));
                    kmax = std::max(kmax, x);
                }
                for (int kc : { kmax, std::min(E, kmax + 3) }) {
                    routed r { std::vector<std::int32_t>(T * kc, -7), std::vector<float>(T * kc, -7.0f), {} };
                    route_variable_k(cmatrix_view<float>(logits.data(), T, E), k, opt,
                        matrix_view<std::int32_t>(r.ids.data(), T, kc), matrix_view<float>(r.weights.data(), T, kc));
                    std::vector<token_k> rules;
                    for (int x : k)
                        rules.push_back({ x, x, 1.0f });
                    std::vector<int> kept;
                    const auto want = ref::route_token_k(logits, T, E, rules, kc, opt, &kept);
                    r.kept = kept;
                    require_same(r, want, kept, "E=" + std::to_string(E) + " T=" + std::to_string(T));
                    // Equal to route() at k for tokens that all share one k.
                    if (T > 0) {
                        std::vector<int> same(T, k[0]);
                        std::vector<std::int32_t> ids(T * k[0]), ids2(T * k[0]);
                        std::vector<float> w(T * k[0]), w2(T * k[0]);
                        route_variable_k(cmatrix_view<float>(logits.data(), T, E), same, opt,
                            matrix_view<std::int32_t>(ids.data(), T, k[0]), matrix_view<float>(w.data(), T, k[0]));
                        route(cmatrix_view<float>(logits.data(), T, E), dynamic_k { k[0] }, opt,
                            matrix_view<std::int32_t>(ids2.data(), T, k[0]), matrix_view<float>(w2.data(), T, k[0]));
                        REQUIRE(ids == ids2);
                        REQUIRE(test::same_bytes(w, w2));
                    }
                }
            }
    }
}

TEST_CASE("route_threshold: p -> 0 keeps k_min, p = 1 keeps k_max, between matches the reference [routing][threshold]")
{
    for (int E : { 8, 60, 64 }) {
        std::vector<float> bias;
        for (const auto& opt : option_sets(E, bias)) {
            const std::size_t T = 50;
            // Peaked and flat routers: both ends of the kept-count range occur.
            for (float sigma : { 0.3f, 4.0f }) {
                const auto logits = test::random_normal(T * E, 11u * E + unsigned(sigma * 10), sigma);
                for (int kmin : { 1, 2 })
                    for (int kmax : { kmin, 4, E }) {
                        if (kmax < kmin)
                            continue;
                        const std::string what = "E=" + std::to_string(E) + " k in [" + std::to_string(kmin) + ", "
                            + std::to_string(kmax) + "] sigma=" + std::to_string(sigma);
                        for (float p : { 0.0f, 1e-12f, 1e-6f }) {
                            const auto r = run_threshold(logits, T, E, { p, kmin, kmax }, kmax, opt);
                            REQUIRE_MESSAGE(r.kept == std::vector<int>(T, kmin), what, " p=", p);
                            // And exactly route() at k_min.
                            const auto want = ref::route_token_k(
                                logits, T, E, std::vector<token_k>(T, { kmin, kmin, 1 }), kmax, opt);
                            REQUIRE(r.ids == want.ids);
                            REQUIRE(test::same_bytes(r.weights, want.weights));
                        }
                        {
                            const auto r = run_threshold(logits, T, E, { 1.0f, kmin, kmax }, kmax, opt);
                            REQUIRE_MESSAGE(r.kept == std::vector<int>(T, kmax), what, " p=1");
                            const auto want = ref::route(logits, T, E, kmax, opt);
                            REQUIRE(r.ids == want.ids);
                            REQUIRE(test::same_bytes(r.weights, want.weights));
                        }
                        int prev_sum = 0;
                        for (float p : { 0.1f, 0.3f, 0.5f, 0.7f, 0.9f, 0.99f }) {
                            const auto r = run_threshold(logits, T, E, { p, kmin, kmax }, kmax, opt);
                            std::vector<int> kept;
                            const auto want = ref::route_token_k(
                                logits, T, E, std::vector<token_k>(T, { kmin, kmax, p }), kmax, opt, &kept);
                            require_same(r, want, kept, what + " p=" + std::to_string(p));
                            int sum = 0;
                            for (int n : kept) {
                                REQUIRE(n >= kmin);
                                REQUIRE(n <= kmax);
                                sum += n;
                            }
                            REQUIRE(sum >= prev_sum); // monotone in p
                            prev_sum = sum;
                        }
                    }
            }
        }
    }
}

TEST_CASE(
    "route_token_k: mixed rules in one batch; byte-identical with 1 and 2 threads [routing][variable_k][determinism]")
{
    const int E = 64;
    const std::size_t T = 777;
    const auto logits = test::random_normal(T * E, 5, 1.5f);
    std::vector<token_k> rules(T);
    for (std::size_t t = 0; t < T; ++t)
        rules[t]
            = t % 3 == 0 ? token_k { int(1 + t % 8), int(1 + t % 8), 1.0f } : token_k { 1, 8, float(t % 10) / 10.0f };
    router_options opt;
    opt.renormalize = true;
    routed a, b;
    test::with_threads(1, [&] { a = run_rules(logits, T, E, rules, 8, opt); });
    test::with_threads(2, [&] { b = run_rules(logits, T, E, rules, 8, opt); });
    std::vector<int> kept;
    const auto want = ref::route_token_k(logits, T, E, rules, 8, opt, &kept);
    require_same(a, want, kept, "1 thread");
    REQUIRE(a.ids == b.ids);
    REQUIRE(test::same_bytes(a.weights, b.weights));
    REQUIRE(a.kept == b.kept);
}

TEST_CASE(
    "route_variable_k / route_threshold: bad input throws a clear kdial::error, nothing written [routing][errors]")
{
    const int E = 8;
    const std::size_t T = 3;
    auto logits = test::random_normal(T * E, 3);
    std::vector<std::int32_t> ids(T * 4, -7);
    std::vector<float> w(T * 4, -7.0f);
    const matrix_view<std::int32_t> iv(ids.data(), T, 4);
    const matrix_view<float> wv(w.data(), T, 4);
    const cmatrix_view<float> lv(logits.data(), T, E);
    const std::vector<int> k_bad { 1, 0, 2 }, k_big { 1, 9, 2 }, k_wide { 1, 5, 2 }, k_short { 1, 2 };
    CHECK_THROWS_WITH(route_variable_k(lv, k_bad, {}, iv, wv),
        doctest::Contains("token 1 asks for k in [0, 0], which must satisfy 1 <= k_min <= k_max <= E = 8"));
    CHECK_THROWS_WITH(route_variable_k(lv, k_big, {}, iv, wv), doctest::Contains("token 1 asks for k in [9, 9]"));
    CHECK_THROWS_WITH(
        route_variable_k(lv, k_wide, {}, iv, wv), doctest::Contains("ids has 4 columns, the largest k is 5"));
    CHECK_THROWS_WITH(route_variable_k(lv, k_short, {}, iv, wv), doctest::Contains("2 k values for T = 3 tokens"));
    CHECK_THROWS_WITH(
        route_threshold(lv, { 1.5f, 1, 4 }, {}, iv, wv), doctest::Contains("threshold p = 1.5 outside [0, 1]"));
    CHECK_THROWS_WITH(route_threshold(lv, { std::numeric_limits<float>::quiet_NaN(), 1, 4 }, {}, iv, wv),
        doctest::Contains("outside [0, 1]"));
    CHECK_THROWS_WITH(route_threshold(lv, { 0.5f, 3, 2 }, {}, iv, wv),
        doctest::Contains("k range [3, 2] must satisfy 1 <= k_min <= k_max <= E = 8"));
    logits[5] = std::numeric_limits<float>::infinity();
    CHECK_THROWS_WITH(route_threshold(lv, { 0.5f, 1, 4 }, {}, iv, wv),
        doctest::Contains("router logit of token 0, expert 5 is non-finite"));
    CHECK(ids == std::vector<std::int32_t>(T * 4, -7));
    CHECK(w == std::vector<float>(T * 4, -7.0f));
}
