// Combine against its reference (bit-exact: both use one fused multiply-add
// per term in rank order), the identity-expert round trip, the shared-expert
// term, thread-count independence and bad input.
#include <doctest/doctest.h>
#include <kdial/combine/combine.hpp>
#include <kdial/routing/router.hpp>

#include "ref/routing_ref.hpp"
#include "test_util.hpp"

#include <vector>

using namespace kdial;

namespace {
struct setup {
    std::size_t T, d;
    int E, k;
    std::vector<float> X, logits, w;
    std::vector<std::int32_t> ids;
    dispatch_plan plan;

    setup(std::size_t T_, std::size_t d_, int E_, int k_, std::uint64_t seed, bool renorm = false)
        : T(T_)
        , d(d_)
        , E(E_)
        , k(k_)
        , X(test::random_floats(T_ * d_, seed))
        , logits(test::random_normal(T_ * E_, seed + 1))
        , w(T_ * k_)
        , ids(T_ * k_)
        , plan(T_, E_, k_)
    {
        router_options o;
        o.renormalize = renorm;
        route(cmatrix_view<float>(logits.data(), T, E), dynamic_k { k }, o, matrix_view<std::int32_t>(ids.data(), T, k),
            matrix_view<float>(w.data(), T, k));
        plan.build(cmatrix_view<std::int32_t>(ids.data(), T, k));
    }
};
} // namespace

TEST_CASE("dispatch then combine with identity experts gives sum_j w[t,j] * x[t] [combine]")
{
    for (int E : { 1, 7, 8, 60, 64 })
        for (std::size_t T : { std::size_t(0), std::size_t(1), std::size_t(3), std::size_t(17) })
            for (int k = 1; k <= E; k += (E > 8 ? 7 : 1)) {
                const std::size_t d = 37;
                setup s(T, d, E, k, T * 100 + E * 3 + k);
                std::vector<float> Xs(std::max<std::size_t>(1, s.plan.num_slots()) * d), out(T * d, -1.0f);
                gather(s.plan, cmatrix_view<float>(s.X.data(), T, d),
                    matrix_view<float>(Xs.data(), s.plan.num_slots(), d));
                combine(s.plan, cmatrix_view<float>(s.w.data(), T, k),
                    cmatrix_view<float>(Xs.data(), s.plan.num_slots(), d), matrix_view<float>(out.data(), T, d));
                const auto expect = ref::combine(
                    T, k, d, s.w, [&](std::size_t t, std::size_t) { return s.X.data() + t * d; }, nullptr, nullptr);
                REQUIRE_MESSAGE(test::same_bytes(out, expect), "E=", E, " T=", T, " k=", k);
            }
}

TEST_CASE("combine: random expert outputs, shared expert with sigmoid gate, dropped slots [combine]")
{
    const std::size_t T = 33, d = 45;
    const int E = 60, k = 4;
    setup s(T, d, E, k, 21, true);
    const auto Y = test::random_floats(s.plan.num_slots() * d, 22);
    const auto S = test::random_floats(T * d, 23);
    const auto g = test::random_normal(T, 24);
    std::vector<float> out(T * d);
    const shared_expert_term sh { cmatrix_view<float>(S.data(), T, d), g };
    combine(s.plan, cmatrix_view<float>(s.w.data(), T, k), cmatrix_view<float>(Y.data(), s.plan.num_slots(), d),
        matrix_view<float>(out.data(), T, d), sh);
    auto row = [&](std::size_t t, std::size_t j) { return Y.data() + std::size_t(s.plan.slot_of(t, j)) * d; };
    CHECK(test::same_bytes(out, ref::combine(T, k, d, s.w, row, S.data(), g.data())));

    // Without a gate the shared term enters with factor 1.
    combine(s.plan, cmatrix_view<float>(s.w.data(), T, k), cmatrix_view<float>(Y.data(), s.plan.num_slots(), d),
        matrix_view<float>(out.data(), T, d), shared_expert_term { cmatrix_view<float>(S.data(), T, d), {} });
    CHECK(test::same_bytes(out, ref::combine(T, k, d, s.w, row, S.data(), nullptr)));

    // Drop every second assignment: those terms vanish.
    for (std::size_t i = 0; i < s.ids.size(); i += 2)
        s.ids[i] = no_expert;
    s.plan.build(cmatrix_view<std::int32_t>(s.ids.data(), T, k));
    const auto Y2 = test::random_floats(s.plan.num_slots() * d, 25);
    combine(s.plan, cmatrix_view<float>(s.w.data(), T, k), cmatrix_view<float>(Y2.data(), s.plan.num_slots(), d),
        matrix_view<float>(out.data(), T, d));
    const auto expect = ref::combine(
        T, k, d, s.w,
        [&](std::size_t t, std::size_t j) -> const float* {
            const auto sl = s.plan.slot_of(t, j);
            return sl < 0 ? nullptr : Y2.data() + std::size_t(sl) * d;
        },
        nullptr, nullptr);
    CHECK(test::same_bytes(out, expect));
}

TEST_CASE("combine: byte-identical with 1 and 2 threads [combine][determinism]")
{
    const std::size_t T = 1000, d = 129;
    setup s(T, d, 64, 8, 31);
    const auto Y = test::random_floats(s.plan.num_slots() * d, 32);
    std::vector<float> one(T * d), two(T * d);
    auto run = [&](std::vector<float>& out) {
        combine(s.plan, cmatrix_view<float>(s.w.data(), T, 8), cmatrix_view<float>(Y.data(), s.plan.num_slots(), d),
            matrix_view<float>(out.data(), T, d));
    };
    test::with_threads(1, [&] { run(one); });
    test::with_threads(2, [&] { run(two); });
    CHECK(test::same_bytes(one, two));
}

TEST_CASE("combine: bad shapes throw and leave out untouched [combine][errors]")
{
    const std::size_t T = 5, d = 8;
    setup s(T, d, 8, 2, 41);
    const auto Y = test::random_floats(s.plan.num_slots() * d, 42);
    std::vector<float> out(T * d, -3.0f);
    CHECK_THROWS_WITH_AS(
        combine(s.plan, cmatrix_view<float>(s.w.data(), T, 3), cmatrix_view<float>(Y.data(), s.plan.num_slots(), d),
            matrix_view<float>(out.data(), T, d)),
        "kdial::combine: weights has shape [5, 3], expected [5, 2]", kdial::error);
    CHECK_THROWS_AS(combine(s.plan, cmatrix_view<float>(s.w.data(), T, 2),
                        cmatrix_view<float>(Y.data(), s.plan.num_slots() - 1, d), matrix_view<float>(out.data(), T, d)),
        kdial::error);
    const auto S = test::random_floats(T * d, 43);
    std::vector<float> g(T - 1);
    CHECK_THROWS_WITH_AS(
        combine(s.plan, cmatrix_view<float>(s.w.data(), T, 2), cmatrix_view<float>(Y.data(), s.plan.num_slots(), d),
            matrix_view<float>(out.data(), T, d), shared_expert_term { cmatrix_view<float>(S.data(), T, d), g }),
        "kdial::combine: shared expert gate has 4 entries, expected T = 5", kdial::error);
    for (auto v : out)
        REQUIRE(v == -3.0f);
}
