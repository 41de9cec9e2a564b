// The MoE layer against a plain double-precision reference (route ->
// experts -> combine) for every k, every weight format, odd sizes, T up to
// 600 (two GEMM row chunks), one expert receiving every token, a shared
// expert; per-token k and threshold routing (uniform k bit-identical to
// forward(), mixed k against the reference); thread-count and repeat
// independence; bad input.
#include <doctest/doctest.h>
#include <kdial/layer/moe_layer.hpp>

#include "ref/kernels_ref.hpp"
#include "ref/routing_k_ref.hpp"
#include "ref/routing_ref.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <random>
#include <vector>

using namespace kdial;

namespace {

template <weight_type W> struct layer_fixture {
    std::size_t d, F, Fs;
    int E;
    std::vector<float> router; // [E, d]
    std::vector<ref::owned_weights<W>> gate, up, down;
    std::optional<ref::owned_weights<W>> sgate, sup, sdown;
    std::vector<float> shared_gate; // [d]

    layer_fixture(std::size_t d_, std::size_t F_, int E_, std::uint64_t seed, std::size_t Fs_ = 0)
        : d(d_)
        , F(F_)
        , Fs(Fs_)
        , E(E_)
    {
        std::mt19937 rng { unsigned(seed) };
        router = test::random_floats(std::size_t(E) * d, seed + 1, -1.0f, 1.0f);
        const float si = 1.0f / std::sqrt(float(d)), so = 1.0f / std::sqrt(float(F));
        for (int e = 0; e < E; ++e) {
            gate.push_back(ref::random_weights<W>(F, d, rng, e % 2, 0, 2.0f * si));
            up.push_back(ref::random_weights<W>(F, d, rng, 0, 0, 2.0f * si));
            down.push_back(ref::random_weights<W>(d, F, rng, 1, 0, so));
        }
        if (Fs) {
            sgate = ref::random_weights<W>(Fs, d, rng, 0, 0, 2.0f * si);
            sup = ref::random_weights<W>(Fs, d, rng, 0, 0, 2.0f * si);
            sdown = ref::random_weights<W>(d, Fs, rng, 0, 0, 1.0f / std::sqrt(float(Fs)));
            shared_gate = test::random_floats(d, seed + 2, -si, si);
        }
    }

    expert_set experts() const
    {
        std::vector<expert_weights<W>> v;
        for (int e = 0; e < E; ++e)
            v.push_back({ gate[e].view, up[e].view, down[e].view });
        return expert_set(std::move(v), d, F);
    }

    moe_layer make(std::size_t max_tokens, int max_k, router_options opt = {}, bool with_gate = true) const
    {
        std::optional<shared_expert> sh;
        if (Fs)
            sh = shared_expert { expert_set(
                                     std::vector<expert_weights<W>> { { sgate->view, sup->view, sdown->view } }, d, Fs),
                with_gate ? cmatrix_view<float>(shared_gate.data(), 1, d) : cmatrix_view<float> {} };
        return moe_layer(
            cmatrix_view<float>(router.data(), std::size_t(E), d), experts(), max_tokens, max_k, opt, std::move(sh));
    }

    // Reference output (double) and its tolerance for the routing the layer
    // chose; also checks that routing against the reference router.
    void check(const moe_layer& layer, const std::vector<float>& X, std::size_t T, int k, const router_options& opt,
        const std::vector<float>& out, bool routed_externally = false, bool with_gate = true) const
    {
        const auto logits = layer.last_logits();
        const auto ids = layer.last_ids();
        const auto w = layer.last_weights();
        if (!routed_externally) {
            // Logits against double precision.
            for (std::size_t t = 0; t < T; ++t)
                for (int e = 0; e < E; ++e) {
                    double s = 0, a = 0;
                    for (std::size_t i = 0; i < d; ++i) {
                        s += double(X[t * d + i]) * router[std::size_t(e) * d + i];
                        a += std::fabs(double(X[t * d + i]) * router[std::size_t(e) * d + i]);
                    }
                    REQUIRE(std::fabs(logits(t, std::size_t(e)) - s) <= 2 * ref::gamma(d) * a + 1e-30);
                }
            // Routing bit-exact against the reference router on those logits.
            const std::vector<float> lg(logits.data, logits.data + T * std::size_t(E));
            const auto r = ref::route(lg, T, E, k, opt);
            for (std::size_t i = 0; i < T * std::size_t(k); ++i) {
                REQUIRE(ids.data[i] == r.ids[i]);
                REQUIRE(w.data[i] == r.weights[i]);
            }
        }
        const std::size_t kc = ids.cols;
        std::vector<double> want(T * d, 0.0), mag(T * d, 0.0);
        auto add_expert = [&](const weight_view<W>& g, const weight_view<W>& u, const weight_view<W>& dn, std::size_t t,
                              double wt) {
            const auto res = ref::swiglu_expert(g, u, dn, X.data() + t * d, 1, d);
            const auto wd = ref::dequantize(dn);
            const std::size_t Fe = g.rows;
            for (std::size_t o = 0; o < d; ++o) {
                double m = 0;
                for (std::size_t f = 0; f < Fe; ++f) {
                    const double sg = std::fabs(ref::silu(res.g[f]));
                    m += (std::fabs(res.h[f]) + res.g_abs[f] * std::fabs(res.u[f]) + sg * res.u_abs[f])
                        * std::fabs(wd[o * Fe + f]);
                }
                want[t * d + o] += wt * res.y[o];
                mag[t * d + o] += std::fabs(wt) * m;
            }
        };
        for (std::size_t t = 0; t < T; ++t) {
            for (std::size_t j = 0; j < kc; ++j) {
                const auto e = ids(t, j);
                if (e < 0)
                    continue;
                add_expert(gate[e].view, up[e].view, down[e].view, t, w(t, j));
            }
            if (Fs) {
                double gl = 1.0;
                if (with_gate) {
                    double s = 0;
                    for (std::size_t i = 0; i < d; ++i)
                        s += double(X[t * d + i]) * shared_gate[i];
                    gl = 1.0 / (1.0 + std::exp(-s));
                }
                add_expert(sgate->view, sup->view, sdown->view, t, gl);
            }
        }
        std::vector<double> tol(T * d);
        for (std::size_t i = 0; i < T * d; ++i)
            tol[i] = 8 * ref::gamma(d + F + Fs + 8) * mag[i] + 1e-30;
        const auto worst = ref::compare(cmatrix_view<float>(out.data(), T, d), want, tol);
        REQUIRE_MESSAGE(worst.ratio <= 1.0, "worst at token ", worst.i, " col ", worst.j, ": got ", worst.got, " want ",
            worst.want, " tol ", worst.tol, " (", dtype_name(W::id), ", T=", T, ", k=", k, ")");
    }
};

template <weight_type W> std::vector<float> run(moe_layer& layer, const std::vector<float>& X, std::size_t T, auto k)
{
    const std::size_t d = layer.hidden();
    std::vector<float> out(T * d, -99.0f);
    layer.forward(cmatrix_view<float>(X.data(), T, d), k, matrix_view<float>(out.data(), T, d));
    return out;
}

} // namespace

TEST_CASE_TEMPLATE("moe_layer: matches the reference for every k and T, odd d and F [layer]", W, f32_t, bf16_t, q8_t)
{
    const std::size_t d = 37, F = 45;
    for (int E : { 1, 8 }) {
        layer_fixture<W> fx(d, F, E, 100 + E);
        auto layer = fx.make(300, E);
        for (std::size_t T : { std::size_t(1), std::size_t(2), std::size_t(5), std::size_t(64), std::size_t(300) }) {
            const auto X = test::random_floats(T * d, T + 7u);
            for (int k = 1; k <= E; ++k) {
                const auto out = run<W>(layer, X, T, k);
                fx.check(layer, X, T, k, router_options {}, out);
            }
        }
    }
}

TEST_CASE_TEMPLATE("moe_layer: 60 experts, renormalised, k in {1, 2, 4, 7, 60} [layer]", W, f32_t, bf16_t, q8_t)
{
    const std::size_t d = 67, F = 33;
    layer_fixture<W> fx(d, F, 60, 5);
    router_options opt;
    opt.renormalize = true;
    auto layer = fx.make(64, 60, opt);
    for (std::size_t T : { std::size_t(3), std::size_t(64) }) {
        const auto X = test::random_floats(T * d, 9u + T);
        for (int k : { 1, 2, 4, 7, 60 })
            fx.check(layer, X, T, k, opt, run<W>(layer, X, T, k));
    }
}

TEST_CASE_TEMPLATE(
    "moe_layer: one expert receives every token, past one GEMM row chunk [layer]", W, f32_t, bf16_t, q8_t)
{
    const std::size_t d = 40, F = 72, T = 600;
    layer_fixture<W> fx(d, F, 8, 77);
    std::vector<float> bias(8, 0.0f);
    bias[3] = 100.0f;
    router_options opt;
    opt.selection_bias = bias;
    auto layer = fx.make(T, 2, opt);
    const auto X = test::random_floats(T * d, 78);
    for (int k : { 1, 2 }) {
        const auto out = run<W>(layer, X, T, k);
        CHECK(layer.last_plan().counts()[3] == std::int32_t(T));
        fx.check(layer, X, T, k, opt, out);
    }
}

TEST_CASE_TEMPLATE("moe_layer: shared expert with and without its sigmoid gate [layer]", W, f32_t, bf16_t, q8_t)
{
    const std::size_t d = 36, F = 20, Fs = 53;
    layer_fixture<W> fx(d, F, 6, 91, Fs);
    for (bool with_gate : { true, false }) {
        auto layer = fx.make(70, 6, {}, with_gate);
        for (std::size_t T : { std::size_t(1), std::size_t(70) }) {
            const auto X = test::random_floats(T * d, 92 + T);
            for (int k : { 1, 4, 6 })
                fx.check(layer, X, T, k, router_options {}, run<W>(layer, X, T, k), false, with_gate);
        }
    }
}

TEST_CASE_TEMPLATE(
    "moe_layer: bit-identical for 1 and 2 threads, repeated calls, fixed and dynamic k [layer][determinism]", W, f32_t,
    bf16_t, q8_t)
{
    const std::size_t d = 256, F = 96, T = 200;
    layer_fixture<W> fx(d, F, 16, 3, 64);
    auto layer = fx.make(T, 8);
    const auto X = test::random_floats(T * d, 4);
    for (std::size_t t : { std::size_t(1), std::size_t(3), T }) {
        std::vector<float> one, two, again, fixed;
        test::with_threads(1, [&] { one = run<W>(layer, X, t, dynamic_k { 8 }); });
        test::with_threads(2, [&] { two = run<W>(layer, X, t, dynamic_k { 8 }); });
        test::with_threads(2, [&] { again = run<W>(layer, X, t, dynamic_k { 8 }); });
        fixed = run<W>(layer, X, t, fixed_k<8> {});
        CHECK(test::same_bytes(one, two));
        CHECK(test::same_bytes(one, again));
        CHECK(test::same_bytes(one, fixed));
    }
}

TEST_CASE("moe_layer: forward_routed with the layer's own routing equals forward; dropped slots [layer]")
{
    const std::size_t d = 48, F = 40, T = 33;
    layer_fixture<bf16_t> fx(d, F, 8, 12);
    auto layer = fx.make(T, 4);
    const auto X = test::random_floats(T * d, 13);
    const auto out = run<bf16_t>(layer, X, T, 4);
    std::vector<std::int32_t> ids(layer.last_ids().data, layer.last_ids().data + T * 4);
    std::vector<float> w(layer.last_weights().data, layer.last_weights().data + T * 4);
    std::vector<float> out2(T * d);
    layer.forward_routed(cmatrix_view<float>(X.data(), T, d), cmatrix_view<std::int32_t>(ids.data(), T, 4),
        cmatrix_view<float>(w.data(), T, 4), matrix_view<float>(out2.data(), T, d));
    CHECK(test::same_bytes(out, out2));
    // Per-token k: token t keeps its first 1 + t % 4 experts.
    for (std::size_t t = 0; t < T; ++t)
        for (std::size_t j = 1 + t % 4; j < 4; ++j)
            ids[t * 4 + j] = no_expert;
    layer.forward_routed(cmatrix_view<float>(X.data(), T, d), cmatrix_view<std::int32_t>(ids.data(), T, 4),
        cmatrix_view<float>(w.data(), T, 4), matrix_view<float>(out2.data(), T, d));
    fx.check(layer, X, T, 4, router_options {}, out2, true);
}

TEST_CASE("moe_layer: bad input throws a kdial::error naming the problem, nothing written [layer][errors]")
{
    const std::size_t d = 16, F = 24;
    layer_fixture<f32_t> fx(d, F, 4, 1);
    // Router rows vs experts, hidden size, max_k.
    CHECK_THROWS_WITH_AS(moe_layer(cmatrix_view<float>(fx.router.data(), 3, d), fx.experts(), 8, 2),
        "kdial::moe_layer: router weight has 3 rows but there are 4 experts", kdial::error);
    CHECK_THROWS_WITH_AS(moe_layer(cmatrix_view<float>(fx.router.data(), 4, d), fx.experts(), 8, 5),
        "kdial::moe_layer: max_k = 5 outside [1, E = 4]", kdial::error);
    // An expert whose down_proj has the wrong shape.
    {
        std::vector<expert_weights<f32_t>> v;
        for (int e = 0; e < 4; ++e)
            v.push_back({ fx.gate[e].view, fx.up[e].view, fx.down[e].view });
        v[2].down.rows = d + 1;
        CHECK_THROWS_WITH_AS(expert_set(v, d, F),
            "kdial::expert_set: expert 2: down_proj (f32) has shape [17, 24], expected [16, 24]", kdial::error);
    }
    auto layer = fx.make(8, 2);
    const auto X = test::random_floats(9 * d, 2);
    std::vector<float> out(9 * d, -5.0f);
    CHECK_THROWS_WITH_AS(layer.forward(cmatrix_view<float>(X.data(), 9, d), 2, matrix_view<float>(out.data(), 9, d)),
        "kdial::moe_layer::forward: T = 9 exceeds the workspace's max_tokens = 8", kdial::error);
    CHECK_THROWS_WITH_AS(layer.forward(cmatrix_view<float>(X.data(), 8, d), 3, matrix_view<float>(out.data(), 8, d)),
        "kdial::moe_layer::forward: T * k = 8 * 3 exceeds the workspace's 16 slots", kdial::error);
    CHECK_THROWS_WITH_AS(layer.forward(cmatrix_view<float>(X.data(), 8, d), 0, matrix_view<float>(out.data(), 8, d)),
        "kdial::moe_layer::forward: k = 0 outside [1, E = 4]", kdial::error);
    CHECK_THROWS_WITH_AS(layer.forward(cmatrix_view<float>(X.data(), 8, d), 2, matrix_view<float>(out.data(), 7, d)),
        "kdial::moe_layer::forward: out has shape [7, 16], expected [8, 16]", kdial::error);
    CHECK_THROWS_WITH_AS(
        layer.forward(cmatrix_view<float>(X.data(), 8, d - 1), 2, matrix_view<float>(out.data(), 8, d)),
        "kdial::moe_layer::forward: X has shape [8, 15], expected [8, 16]", kdial::error);
    auto Xbad = X;
    Xbad[3 * d] = std::nanf("");
    CHECK_THROWS_WITH_AS(layer.forward(cmatrix_view<float>(Xbad.data(), 8, d), 2, matrix_view<float>(out.data(), 8, d)),
        "kdial::route: router logit of token 3, expert 0 is non-finite (nan)", kdial::error);
    for (float v : out)
        REQUIRE(v == -5.0f);
    CHECK_THROWS_WITH_AS(
        visit_dtype(static_cast<dtype>(7), [](auto) { return 0; }), "unsupported dtype value 7", kdial::error);
}

TEST_CASE("moe_layer: layers sharing one workspace give the results of layers with their own [layer]")
{
    const std::size_t d = 40, F = 24, T = 20;
    layer_fixture<bf16_t> a(d, F, 8, 21), b(d, F, 8, 22);
    auto ws = std::make_shared<moe_workspace>(T, T * 4, 8, d, F);
    moe_layer la(cmatrix_view<float>(a.router.data(), 8, d), a.experts(), ws);
    moe_layer lb(cmatrix_view<float>(b.router.data(), 8, d), b.experts(), ws);
    auto own_a = a.make(T, 4), own_b = b.make(T, 4);
    const auto X = test::random_floats(T * d, 23);
    CHECK(la.max_k(T) == 4);
    for (int k : { 1, 3, 4 }) {
        CHECK(test::same_bytes(run<bf16_t>(la, X, T, k), run<bf16_t>(own_a, X, T, k)));
        CHECK(test::same_bytes(run<bf16_t>(lb, X, T, k), run<bf16_t>(own_b, X, T, k)));
    }
    CHECK_THROWS_WITH_AS(run<bf16_t>(la, X, T, 5),
        "kdial::moe_layer::forward: T * k = 20 * 5 exceeds the workspace's 80 slots", kdial::error);
    auto small = std::make_shared<moe_workspace>(T, T, 8, d, F - 1);
    CHECK_THROWS_AS(moe_layer(cmatrix_view<float>(a.router.data(), 8, d), a.experts(), small), kdial::error);
}

// ---- per-token k, threshold routing, renormalisation override ----

TEST_CASE_TEMPLATE("moe_layer: forward_variable_k — uniform k is forward() bit for bit; mixed k matches the reference "
                   "[layer][variable_k]",
    W, f32_t, bf16_t, q8_t)
{
    const std::size_t d = 40, F = 36;
    const int E = 8;
    layer_fixture<W> fx(d, F, E, 31, 24);
    for (bool renorm : { false, true }) {
        router_options opt;
        opt.renormalize = renorm;
        auto layer = fx.make(300, E, opt);
        for (std::size_t T : { std::size_t(1), std::size_t(4), std::size_t(7), std::size_t(300) }) {
            const auto X = test::random_floats(T * d, 40u + T);
            std::vector<float> out(T * d, -9.0f);
            // Uniform: the same plan, the same kernels, the same bytes.
            for (int k : { 1, 3, 8 }) {
                const auto want = run<W>(layer, X, T, k);
                const std::vector<int> ks(T, k);
                layer.forward_variable_k(cmatrix_view<float>(X.data(), T, d), ks, matrix_view<float>(out.data(), T, d));
                REQUIRE(test::same_bytes(out, want));
                // A threshold whose range is one k is that k.
                layer.forward_threshold(
                    cmatrix_view<float>(X.data(), T, d), { 0.5f, k, k }, matrix_view<float>(out.data(), T, d));
                REQUIRE(test::same_bytes(out, want));
            }
            // Mixed: routing exactly the reference's per token, output within
            // the derived bound of the double reference for that routing.
            std::vector<int> ks(T);
            for (std::size_t t = 0; t < T; ++t)
                ks[t] = 1 + int((t * 5) % std::size_t(E));
            layer.forward_variable_k(cmatrix_view<float>(X.data(), T, d), ks, matrix_view<float>(out.data(), T, d));
            std::vector<token_k> rules;
            for (int k : ks)
                rules.push_back({ k, k, 1.0f });
            const auto lg = layer.last_logits();
            const std::vector<float> logits(lg.data, lg.data + T * std::size_t(E));
            const int kc = *std::max_element(ks.begin(), ks.end());
            const auto want = ref::route_token_k(logits, T, E, rules, kc, opt);
            const auto ids = layer.last_ids();
            const auto w = layer.last_weights();
            REQUIRE(ids.cols == std::size_t(kc));
            REQUIRE(std::vector<std::int32_t>(ids.data, ids.data + T * kc) == want.ids);
            REQUIRE(test::same_bytes(std::vector<float>(w.data, w.data + T * kc), want.weights));
            REQUIRE(std::vector<int>(layer.last_kept().begin(), layer.last_kept().end()) == ks);
            std::size_t sum = 0;
            for (int k : ks)
                sum += std::size_t(k);
            REQUIRE(layer.last_assignments() == sum);
            fx.check(layer, X, T, kc, opt, out, true);
            // And the same bytes for 1 and 2 threads.
            std::vector<float> one(T * d), two(T * d);
            test::with_threads(1, [&] {
                layer.forward_variable_k(cmatrix_view<float>(X.data(), T, d), ks, matrix_view<float>(one.data(), T, d));
            });
            test::with_threads(2, [&] {
                layer.forward_variable_k(cmatrix_view<float>(X.data(), T, d), ks, matrix_view<float>(two.data(), T, d));
            });
            REQUIRE(test::same_bytes(one, out));
            REQUIRE(test::same_bytes(two, out));
        }
    }
}

TEST_CASE(
    "moe_layer: forward_threshold — p -> 0 is k_min, p = 1 is k_max, between matches the reference [layer][threshold]")
{
    const std::size_t d = 48, F = 32, T = 64;
    const int E = 16;
    layer_fixture<bf16_t> fx(d, F, E, 55);
    auto layer = fx.make(T, E);
    const auto X = test::random_floats(T * d, 56, -2.0f, 2.0f);
    std::vector<float> out(T * d);
    const cmatrix_view<float> xv(X.data(), T, d);
    const matrix_view<float> ov(out.data(), T, d);
    layer.forward_threshold(xv, { 1e-9f, 2, 6 }, ov);
    REQUIRE(test::same_bytes(out, run<bf16_t>(layer, X, T, 2)));
    layer.forward_threshold(xv, { 1.0f, 2, 6 }, ov);
    REQUIRE(test::same_bytes(out, run<bf16_t>(layer, X, T, 6)));
    for (float p : { 0.2f, 0.5f, 0.8f }) {
        layer.forward_threshold(xv, { p, 1, 6 }, ov);
        const auto lg = layer.last_logits();
        const std::vector<float> logits(lg.data, lg.data + T * std::size_t(E));
        std::vector<int> kept;
        const auto want = ref::route_token_k(logits, T, E, std::vector<token_k>(T, { 1, 6, p }), 6, {}, &kept);
        REQUIRE(std::vector<int>(layer.last_kept().begin(), layer.last_kept().end()) == kept);
        const auto ids = layer.last_ids();
        REQUIRE(std::vector<std::int32_t>(ids.data, ids.data + T * 6) == want.ids);
        fx.check(layer, X, T, 6, {}, out, true);
    }
}

TEST_CASE("moe_layer: set_renormalize overrides the routing options at any k [layer]")
{
    const std::size_t d = 32, F = 24, T = 9;
    layer_fixture<f32_t> fx(d, F, 8, 71);
    auto plain = fx.make(T, 8);
    router_options on;
    on.renormalize = true;
    auto renorm = fx.make(T, 8, on);
    const auto X = test::random_floats(T * d, 72);
    plain.set_renormalize(true);
    for (int k : { 1, 2, 5 })
        REQUIRE(test::same_bytes(run<f32_t>(plain, X, T, k), run<f32_t>(renorm, X, T, k)));
    plain.set_renormalize(false);
    REQUIRE(!test::same_bytes(run<f32_t>(plain, X, T, 2), run<f32_t>(renorm, X, T, 2)));
}

TEST_CASE("moe_layer: per-token k bad input throws a kdial::error naming the problem [layer][errors]")
{
    const std::size_t d = 16, F = 24, T = 4;
    layer_fixture<f32_t> fx(d, F, 4, 1);
    auto layer = fx.make(T, 2);
    const auto X = test::random_floats(T * d, 2);
    std::vector<float> out(T * d, -1.0f);
    const cmatrix_view<float> xv(X.data(), T, d);
    const matrix_view<float> ov(out.data(), T, d);
    CHECK_THROWS_WITH_AS(layer.forward_variable_k(xv, std::vector<int> { 1, 2, 5, 1 }, ov),
        "kdial::moe_layer::forward_variable_k: k = 5 for token 2 outside [1, E = 4]", kdial::error);
    CHECK_THROWS_WITH_AS(layer.forward_variable_k(xv, std::vector<int> { 1, 2 }, ov),
        "kdial::moe_layer::forward_variable_k: 2 k values for T = 4 tokens", kdial::error);
    CHECK_THROWS_WITH_AS(layer.forward_variable_k(xv, std::vector<int> { 1, 3, 1, 1 }, ov),
        "kdial::moe_layer::forward_variable_k: T * max k = 4 * 3 exceeds the workspace's 8 slots", kdial::error);
    CHECK_THROWS_WITH_AS(layer.forward_threshold(xv, { -0.5f, 1, 2 }, ov),
        "kdial::moe_layer::forward_threshold: threshold p = -0.5 outside [0, 1]", kdial::error);
    CHECK_THROWS_WITH_AS(layer.forward_threshold(xv, { 0.5f, 1, 5 }, ov),
        "kdial::moe_layer::forward_threshold: k range [1, 5] must satisfy 1 <= k_min <= k_max <= E = 4", kdial::error);
    CHECK(out == std::vector<float>(T * d, -1.0f));
}
