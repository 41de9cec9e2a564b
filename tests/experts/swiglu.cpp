// experts/swiglu.hpp: one expert's FFN against the double reference with a
// derived error bound, every dtype and row count; shape checks name tensors.
#include <doctest/doctest.h>

#include <kdial/experts/swiglu.hpp>

#include "ref/kernels_ref.hpp"

#include <random>
#include <string>
#include <vector>

using namespace kdial;

TEST_CASE_TEMPLATE(
    "swiglu_expert: matches reference within derived bound [experts][swiglu]", W, f32_t, bf16_t, q8_t, q4_0_t)
{
    std::mt19937 rng(21);
    struct shape {
        std::size_t d, F;
    };
    for (shape s : { shape { 1, 1 }, shape { 33, 19 }, shape { 67, 45 }, shape { 129, 301 } }) {
        const auto g = ref::random_weights<W>(s.F, s.d, rng, 1, 1, 0.5f);
        const auto u = ref::random_weights<W>(s.F, s.d, rng, 0, 0, 0.5f);
        const auto dn = ref::random_weights<W>(s.d, s.F, rng, 2, 1, 0.5f);
        const expert_weights<W> ew { g.view, u.view, dn.view };
        check_expert_weights(ew, s.d, s.F);
        const std::vector<float> wd = ref::dequantize(dn.view);
        for (std::size_t n : { 0u, 1u, 2u, 3u, 5u, 17u, 64u, 300u }) {
            CAPTURE(s.d);
            CAPTURE(s.F);
            CAPTURE(n);
            const auto x = ref::random_matrix(n, s.d, rng, 3, 1);
            auto h = ref::filled_matrix(n, s.F, 1, 1);
            auto y = ref::filled_matrix(n, s.d, 2, 1);
            check_swiglu_expert(ew, x.view, h.view, y.view);
            swiglu_expert(ew, x.view, h.view, y.view);

            const ref::swiglu_result r = ref::swiglu_expert(g.view, u.view, dn.view, x.view.data, n, x.view.stride);
            // Error bound. Front half (see the gate_up test):
            //   dh <= 1.1 eg (|u| + eu) + (|g| + eg) eu + 16 ulp |h|,  eg = gamma_d Sg.
            // Down projection of the computed h (|h| + dh) in f32 plus the
            // propagated error: dy <= sum_f |wd| dh_f + gamma_F sum_f |wd| (|h_f| + dh_f).
            const double gd = ref::gamma(s.d), gF = ref::gamma(s.F), ulp = std::ldexp(1.0, -24);
            std::vector<double> dh(n * s.F);
            for (std::size_t i = 0; i < n * s.F; ++i) {
                const double eg = gd * r.g_abs[i], eu = gd * r.u_abs[i];
                dh[i] = 1.1 * eg * (std::fabs(r.u[i]) + eu) + (std::fabs(r.g[i]) + eg) * eu
                    + 16 * ulp * std::fabs(r.h[i]);
            }
            std::vector<double> tol(n * s.d);
            for (std::size_t i = 0; i < n; ++i)
                for (std::size_t o = 0; o < s.d; ++o) {
                    double prop = 0, mag = 0;
                    for (std::size_t f = 0; f < s.F; ++f) {
                        const double a = std::fabs(double(wd[o * s.F + f]));
                        prop += a * dh[i * s.F + f];
                        mag += a * (std::fabs(r.h[i * s.F + f]) + dh[i * s.F + f]);
                    }
                    tol[i * s.d + o] = prop + gF * mag + 1e-30;
                }
            const ref::worst wo = ref::compare(y.view, r.y, tol);
            INFO("worst element [", wo.i, ", ", wo.j, "]: got ", wo.got, " want ", wo.want, " tol ", wo.tol, " (",
                wo.ratio, " x tol)");
            CHECK(wo.ratio <= 1.0);
        }
    }
}

TEST_CASE("swiglu_expert: shape errors name the tensor [experts][swiglu][errors]")
{
    std::mt19937 rng(22);
    const auto g = ref::random_weights<bf16_t>(8, 16, rng);
    const auto u = ref::random_weights<bf16_t>(8, 16, rng);
    const auto dn = ref::random_weights<bf16_t>(16, 8, rng);
    const auto bad = ref::random_weights<bf16_t>(8, 15, rng);
    CHECK_NOTHROW(check_expert_weights(expert_weights<bf16_t> { g.view, u.view, dn.view }, 16, 8));
    CHECK_THROWS_WITH_AS(
        check_expert_weights(expert_weights<bf16_t> { g.view, bad.view, dn.view }, 16, 8, "layer 3 expert 5"),
        "layer 3 expert 5: up_proj (bf16) has shape [8, 15], expected [8, 16]", kdial::error);
    CHECK_THROWS_WITH_AS(check_expert_weights(expert_weights<bf16_t> { g.view, u.view, g.view }, 16, 8),
        "expert: down_proj (bf16) has shape [8, 16], expected [16, 8]", kdial::error);
    CHECK_THROWS_WITH_AS(check_expert_weights(expert_weights<bf16_t> { dn.view, u.view, dn.view }, 16, 8),
        "expert: gate_proj (bf16) has shape [16, 8], expected [8, 16]", kdial::error);

    const auto x = ref::random_matrix(3, 16, rng);
    auto h = ref::filled_matrix(3, 7);
    auto y = ref::filled_matrix(3, 16);
    CHECK_THROWS_WITH_AS(
        check_swiglu_expert(expert_weights<bf16_t> { g.view, u.view, dn.view }, x.view, h.view, y.view),
        "swiglu_expert: H has shape [3, 7], expected [3, 8]", kdial::error);
}
