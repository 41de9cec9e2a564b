// The test fixture of the MoE layer tests: random routers, experts (any
// weight format, padded rows) and a shared expert, a double-precision
// reference check of a forward call, and a forward helper.
#pragma once

#include <doctest/doctest.h>
#include <kdial/layer/moe.hpp>

#include "ref/kernels_ref.hpp"
#include "ref/routing_k_ref.hpp"
#include "ref/routing_ref.hpp"
#include "test_util.hpp"

#include <algorithm>
#include <cmath>
#include <optional>
#include <random>
#include <vector>

namespace kdial::test {

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

    moe_weights make(router_options opt = {}, bool with_gate = true) const
    {
        std::optional<shared_expert> sh;
        if (Fs)
            sh = shared_expert { expert_set(
                                     std::vector<expert_weights<W>> { { sgate->view, sup->view, sdown->view } }, d, Fs),
                with_gate ? any_weight_view(weight_view<f32_t>(shared_gate.data(), 1, d)) : any_weight_view {} };
        return moe_weights(cmatrix_view<float>(router.data(), std::size_t(E), d), experts(), opt, std::move(sh));
    }

    // Reference output (double) and its tolerance for the routing the layer
    // chose; also checks that routing against the reference router.
    void check(const moe_workspace& ws, const std::vector<float>& X, std::size_t T, int k, const router_options& opt,
        const std::vector<float>& out, bool routed_externally = false, bool with_gate = true) const
    {
        const auto logits = ws.logits();
        const auto ids = ws.ids();
        const auto w = ws.routing_weights();
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

// moe::forward on X [T, d] into a fresh output.
inline std::vector<float> run(const moe_weights& w, moe_workspace& ws, const std::vector<float>& X, std::size_t T,
    const auto& policy, executor_ref ex = default_executor {})
{
    const std::size_t d = w.hidden();
    std::vector<float> out(T * d, -99.0f);
    moe::forward(w, ws, cmatrix_view<float>(X.data(), T, d), policy, matrix_view<float>(out.data(), T, d),
        combine_mode::overwrite, ex);
    return out;
}

} // namespace kdial::test
