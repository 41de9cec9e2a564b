// The dispatch plan: counts, offsets, stable token order, back-pointers,
// dropped assignments, gather, reuse, and bad input.
#include <doctest/doctest.h>
#include <kdial/dispatch/plan.hpp>
#include <kdial/routing/router.hpp>

#include "test_util.hpp"

#include <random>
#include <vector>

using namespace kdial;

namespace {
std::vector<std::int32_t> random_ids(std::size_t T, int k, int E, std::uint64_t seed, bool with_drops = false)
{
    std::mt19937_64 rng(seed);
    std::vector<std::int32_t> ids(T * k);
    for (auto& id : ids) {
        id = std::int32_t(rng() % E);
        if (with_drops && rng() % 4 == 0)
            id = no_expert;
    }
    return ids;
}

// Checks every property of a plan against a plain scan of the ids.
void check_plan(const dispatch_plan& plan, const std::vector<std::int32_t>& ids, std::size_t T, int k, int E)
{
    REQUIRE(plan.tokens() == T);
    REQUIRE(plan.k() == std::size_t(k));
    std::vector<std::int32_t> counts(E, 0);
    for (auto id : ids)
        if (id != no_expert)
            ++counts[id];
    std::int32_t off = 0;
    for (int e = 0; e < E; ++e) {
        REQUIRE(plan.counts()[e] == counts[e]);
        REQUIRE(plan.offsets()[e] == off);
        off += counts[e];
    }
    REQUIRE(plan.offsets()[E] == off);
    REQUIRE(plan.num_slots() == std::size_t(off));
    // Expected slot order: for each expert, the (t, j) in ascending t then j.
    std::vector<std::int32_t> next(plan.offsets().begin(), plan.offsets().end() - 1);
    for (std::size_t t = 0; t < T; ++t)
        for (int j = 0; j < k; ++j) {
            const auto e = ids[t * k + j];
            if (e == no_expert) {
                REQUIRE(plan.slot_of(t, j) == -1);
                continue;
            }
            const auto s = next[e]++;
            REQUIRE(plan.slot_of(t, j) == s);
            REQUIRE(plan.slot_token()[s] == std::int32_t(t));
        }
}
} // namespace

TEST_CASE("dispatch_plan: stable counting sort for many shapes, reused without reallocation [dispatch]")
{
    dispatch_plan plan(1000, 256, 256);
    for (int E : { 1, 2, 7, 8, 60, 64, 128, 256 })
        for (std::size_t T : { std::size_t(0), std::size_t(1), std::size_t(3), std::size_t(17), std::size_t(1000) })
            for (int k : { 1, 2, 3, 8, E }) {
                if (k > E || T * k > 1000 * 64)
                    continue;
                const auto ids = random_ids(T, k, E, T * 1000 + k * 7 + E);
                const auto* before = plan.slot_token().data();
                plan = plan; // copyable handle
                dispatch_plan p2 = plan;
                p2.build(cmatrix_view<std::int32_t>(ids.data(), T, k));
                check_plan(p2, ids, T, k, E);
                (void)before;
            }
}

TEST_CASE("dispatch_plan: every k from 1 to E from the router, one expert taking every token [dispatch]")
{
    const int E = 60;
    const std::size_t T = 17;
    dispatch_plan plan(T, E, E);
    const auto logits = test::random_normal(T * E, 4);
    for (int k = 1; k <= E; ++k) {
        std::vector<std::int32_t> ids(T * k);
        std::vector<float> w(T * k);
        route(cmatrix_view<float>(logits.data(), T, E), dynamic_k { k }, router_options {},
            matrix_view<std::int32_t>(ids.data(), T, k), matrix_view<float>(w.data(), T, k));
        const auto* storage = plan.slot_token().data();
        plan.build(cmatrix_view<std::int32_t>(ids.data(), T, k));
        CHECK(plan.slot_token().data() == storage); // no reallocation
        check_plan(plan, ids, T, k, E);
    }
    std::vector<std::int32_t> hot(T, 42);
    plan.build(cmatrix_view<std::int32_t>(hot.data(), T, 1));
    check_plan(plan, hot, T, 1, E);
    CHECK(plan.counts()[42] == std::int32_t(T));
}

TEST_CASE("dispatch_plan: dropped assignments (no_expert) get no slot [dispatch]")
{
    const int E = 8, k = 4;
    const std::size_t T = 50;
    const auto ids = random_ids(T, k, E, 11, true);
    dispatch_plan plan(T, E, k);
    plan.build(cmatrix_view<std::int32_t>(ids.data(), T, k));
    check_plan(plan, ids, T, k, E);
    std::vector<std::int32_t> none(T * k, no_expert);
    plan.build(cmatrix_view<std::int32_t>(none.data(), T, k));
    CHECK(plan.num_slots() == 0);
}

TEST_CASE("gather: rows land in slot order, identical for 1 and 2 threads [dispatch][determinism]")
{
    const int E = 64, k = 8;
    const std::size_t T = 300, d = 37;
    const auto ids = random_ids(T, k, E, 12);
    const auto X = test::random_floats(T * d, 13);
    dispatch_plan plan(T, E, k);
    plan.build(cmatrix_view<std::int32_t>(ids.data(), T, k));
    std::vector<float> one(T * k * d), two(T * k * d);
    test::with_threads(
        1, [&] { gather(plan, cmatrix_view<float>(X.data(), T, d), matrix_view<float>(one.data(), T * k, d)); });
    test::with_threads(
        2, [&] { gather(plan, cmatrix_view<float>(X.data(), T, d), matrix_view<float>(two.data(), T * k, d)); });
    CHECK(test::same_bytes(one, two));
    for (std::size_t s = 0; s < plan.num_slots(); ++s)
        for (std::size_t i = 0; i < d; ++i)
            REQUIRE(one[s * d + i] == X[std::size_t(plan.slot_token()[s]) * d + i]);
}

TEST_CASE("dispatch_plan: bad input throws and leaves the plan as it was [dispatch][errors]")
{
    const int E = 8;
    dispatch_plan plan(4, E, 2);
    std::vector<std::int32_t> good { 0, 1, 2, 3, 4, 5, 6, 7 };
    plan.build(cmatrix_view<std::int32_t>(good.data(), 4, 2));
    std::vector<std::int32_t> bad { 0, 1, 2, 8, 4, 5, 6, 7 };
    CHECK_THROWS_WITH_AS(plan.build(cmatrix_view<std::int32_t>(bad.data(), 4, 2)),
        "kdial::dispatch_plan::build: ids[1, 1] = 8 is not an expert in [0, 8) nor no_expert (-1)", kdial::error);
    bad[3] = -2;
    CHECK_THROWS_AS(plan.build(cmatrix_view<std::int32_t>(bad.data(), 4, 2)), kdial::error);
    check_plan(plan, good, 4, 2, E);
    std::vector<std::int32_t> many(5 * 2, 0);
    CHECK_THROWS_WITH_AS(plan.build(cmatrix_view<std::int32_t>(many.data(), 5, 2)),
        "kdial::dispatch_plan::build: T = 5 exceeds the plan's max_tokens = 4", kdial::error);
    std::vector<std::int32_t> widek(4 * 3, 0);
    CHECK_THROWS_WITH_AS(plan.build(cmatrix_view<std::int32_t>(widek.data(), 4, 3)),
        "kdial::dispatch_plan::build: k = 3 outside [1, max_k = 2]", kdial::error);
    check_plan(plan, good, 4, 2, E);
    CHECK_THROWS_AS(dispatch_plan(4, 0, 2), kdial::error);
    dispatch_plan empty;
    CHECK_THROWS_AS(empty.build(cmatrix_view<std::int32_t>(good.data(), 4, 2)), kdial::error);
}
