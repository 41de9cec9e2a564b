// The MoE layer as an engine embeds it: the four stages called one by one
// give the bits of moe::forward; every executor (oneTBB at 1 and 2 threads,
// serial, a std::thread pool) gives the same bits; accumulate is exactly
// out + forward; a workspace laid on caller memory is the owned one; two
// streams running concurrently on one moe_weights give the bits of running
// them one after the other; route(X, W) and the layer pick the same experts
// and weights bit for bit, near-ties included.
#include "layer/fixture.hpp"

#include <kdial/routing/router.hpp>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

using namespace kdial;
using kdial::test::layer_fixture;
using kdial::test::run;

namespace {

// A minimal std::thread executor: each call starts `threads` threads that
// claim tile indices from an atomic counter (claim order does not matter:
// every tile writes its own outputs).
struct spawning_executor {
    int threads = 3;
    void parallel_for(std::size_t n, parallel::tile_fn f) const
    {
        std::atomic<std::size_t> next { 0 };
        auto work = [&] {
            for (std::size_t i; (i = next.fetch_add(1)) < n;)
                f(i);
        };
        std::vector<std::thread> ts;
        for (int t = 1; t < threads; ++t)
            ts.emplace_back(work);
        work();
        for (auto& t : ts)
            t.join();
    }
};
static_assert(parallel::executor<spawning_executor>);

// Runs the stages one by one.
std::vector<float> run_stages(const moe_weights& w, moe_workspace& ws, const std::vector<float>& X, std::size_t T,
    const auto& policy, executor_ref ex = default_executor {})
{
    const std::size_t d = w.hidden();
    const cmatrix_view<float> xv(X.data(), T, d);
    std::vector<float> out(T * d, -99.0f);
    moe::route(w, ws, xv, policy, ex);
    const dispatch_plan& plan = moe::dispatch(w, ws, xv, ex);
    CHECK(plan.tokens() == T);
    moe::run_experts(w, ws, xv, ex);
    moe::combine(w, ws, matrix_view<float>(out.data(), T, d), combine_mode::overwrite, ex);
    return out;
}

} // namespace

TEST_CASE_TEMPLATE("moe: stages one by one give the bits of forward, for every policy [layer][stages]", W, bf16_t, q8_t)
{
    const std::size_t d = 48, F = 40, Fs = 24;
    const int E = 8;
    layer_fixture<W> fx(d, F, E, 201, Fs);
    const auto w = fx.make();
    moe_workspace ws(w.shape(70, 4));
    for (std::size_t T : { std::size_t(1), std::size_t(5), std::size_t(70) }) {
        const auto X = test::random_floats(T * d, 202 + T);
        std::vector<int> ks(T);
        for (std::size_t t = 0; t < T; ++t)
            ks[t] = 1 + int(t % 4);
        CHECK(test::same_bytes(run_stages(w, ws, X, T, fixed_k<2> {}), run(w, ws, X, T, fixed_k<2> {})));
        CHECK(test::same_bytes(run_stages(w, ws, X, T, per_token_k { ks }), run(w, ws, X, T, per_token_k { ks })));
        CHECK(test::same_bytes(run_stages(w, ws, X, T, threshold_options { 0.6f, 1, 4 }),
            run(w, ws, X, T, threshold_options { 0.6f, 1, 4 })));
    }
}

TEST_CASE("moe: stages out of order and an engine's own experts [layer][stages]")
{
    const std::size_t d = 32, F = 24, T = 6;
    layer_fixture<f32_t> fx(d, F, 4, 211);
    const auto w = fx.make();
    moe_workspace ws(w.shape(T, 2));
    const auto X = test::random_floats(T * d, 212);
    const cmatrix_view<float> xv(X.data(), T, d);
    std::vector<float> out(T * d);
    const matrix_view<float> ov(out.data(), T, d);
    CHECK_THROWS_WITH_AS(moe::dispatch(w, ws, xv),
        "kdial::moe::dispatch: the workspace holds no routing (call the stages in order)", kdial::error);
    moe::route(w, ws, xv, 2);
    CHECK_THROWS_WITH_AS(moe::run_experts(w, ws, xv),
        "kdial::moe::run_experts: the workspace holds no plan (call the stages in order)", kdial::error);
    CHECK_THROWS_WITH_AS(moe::combine(w, ws, ov),
        "kdial::moe::combine: the workspace holds no expert outputs (call the stages in order)", kdial::error);
    CHECK_THROWS_WITH_AS(moe::dispatch(w, ws, xv.sub_rows(0, 5)),
        "kdial::moe::dispatch: 5 rows given, the workspace's routing has T = 6", kdial::error);
    // An engine that runs the experts itself: here it replays the outputs
    // kdial's tile scheduler produced, so combine must give forward's bits.
    const auto want = run(w, ws, X, T, 2);
    const std::vector<float> ys(ws.expert_outputs().data, ws.expert_outputs().data + ws.assignments() * d);
    moe::route(w, ws, xv, 2);
    const auto& plan = moe::dispatch(w, ws, xv);
    REQUIRE(plan.num_slots() * d == ys.size());
    std::memcpy(ws.expert_outputs().data, ys.data(), ys.size() * sizeof(float));
    moe::mark_experts_done(w, ws);
    moe::combine(w, ws, ov);
    CHECK(test::same_bytes(out, want));
}

TEST_CASE_TEMPLATE("moe: every executor gives the same bits [layer][determinism][executor]", W, f32_t, bf16_t, q8_t)
{
    const std::size_t d = 96, F = 80, Fs = 40, T = 37;
    layer_fixture<W> fx(d, F, 16, 221, Fs);
    const auto w = fx.make();
    moe_workspace ws(w.shape(T, 4));
    for (std::size_t t : { std::size_t(1), std::size_t(4), T }) {
        const auto X = test::random_floats(t * d, 222 + t);
        const auto want = run(w, ws, X, t, 4);
        std::vector<float> one, two;
        test::with_threads(1, [&] { one = run(w, ws, X, t, 4, tbb_executor {}); });
        test::with_threads(2, [&] { two = run(w, ws, X, t, 4, tbb_executor {}); });
        CHECK(test::same_bytes(one, want));
        CHECK(test::same_bytes(two, want));
        CHECK(test::same_bytes(run(w, ws, X, t, 4, serial_executor {}), want));
        CHECK(test::same_bytes(run(w, ws, X, t, 4, spawning_executor { 3 }), want));
        CHECK(test::same_bytes(run_stages(w, ws, X, t, dynamic_k { 4 }, spawning_executor { 2 }), want));
    }
}

TEST_CASE("moe: accumulate adds exactly the overwritten output to out [layer][accumulate]")
{
    const std::size_t d = 300, F = 48, Fs = 32, T = 9; // d past one 256-column combine chunk
    layer_fixture<bf16_t> fx(d, F, 8, 231, Fs);
    const auto w = fx.make();
    moe_workspace ws(w.shape(T, 3));
    const auto X = test::random_floats(T * d, 232);
    const auto residual = test::random_floats(T * d, 233, -4.0f, 4.0f);
    const auto moe_out = run(w, ws, X, T, 3);
    std::vector<float> want(T * d), got = residual;
    for (std::size_t i = 0; i < want.size(); ++i)
        want[i] = residual[i] + moe_out[i];
    moe::forward(
        w, ws, cmatrix_view<float>(X.data(), T, d), 3, matrix_view<float>(got.data(), T, d), combine_mode::accumulate);
    CHECK(test::same_bytes(got, want));
}

TEST_CASE("moe: a workspace on caller memory equals an owned one; bad memory throws [layer][workspace]")
{
    const std::size_t d = 40, F = 32, Fs = 16, T = 12;
    layer_fixture<f32_t> fx(d, F, 8, 241, Fs);
    const auto w = fx.make();
    const moe_shape shape = w.shape(T, 3);
    const std::size_t n = moe_workspace::bytes_needed(shape);
    CHECK(n % moe_workspace::alignment == 0);
    std::vector<std::byte> mem(n + 2 * moe_workspace::alignment);
    std::byte* p = detail::align_up(mem.data(), moe_workspace::alignment);
    moe_workspace on_caller(shape, std::span<std::byte>(p, n)), owned(shape);
    const auto X = test::random_floats(T * d, 242);
    CHECK(test::same_bytes(run(w, on_caller, X, T, 3), run(w, owned, X, T, 3)));
    // A moved workspace keeps working (its plan still points at its memory).
    moe_workspace moved(std::move(owned));
    CHECK(test::same_bytes(run(w, moved, X, T, 2), run(w, on_caller, X, T, 2)));
    CHECK_THROWS_WITH_AS(moe_workspace(shape, std::span<std::byte>(p, n - 1)),
        doctest::Contains("kdial::moe_workspace: memory has"), kdial::error);
    CHECK_THROWS_WITH_AS(moe_workspace(shape, std::span<std::byte>(p + 4, n)),
        "kdial::moe_workspace: memory is not aligned to 64 bytes", kdial::error);
}

TEST_CASE("moe: two streams on one moe_weights, concurrently, give the bits of running them in turn [layer][streams]")
{
    const std::size_t d = 64, F = 48, Fs = 24, T = 20;
    layer_fixture<bf16_t> fx(d, F, 8, 251, Fs);
    const auto w = fx.make(); // shared, read-only
    std::vector<std::vector<float>> X;
    for (int s = 0; s < 2; ++s)
        X.push_back(test::random_floats(T * d, 252 + std::uint64_t(s)));
    auto stream = [&](int s, std::vector<float>& out) {
        moe_workspace ws(w.shape(T, 4));
        out = test::random_floats(T * d, 260 + std::uint64_t(s)); // the residual
        for (int step = 0; step < 6; ++step)
            moe::forward(w, ws, cmatrix_view<float>(X[std::size_t(s)].data(), T, d), 1 + (step + s) % 4,
                matrix_view<float>(out.data(), T, d), combine_mode::accumulate);
    };
    std::vector<float> a1, b1, a2, b2;
    stream(0, a1);
    stream(1, b1);
    std::thread ta([&] { stream(0, a2); }), tb([&] { stream(1, b2); });
    ta.join();
    tb.join();
    CHECK(test::same_bytes(a1, a2));
    CHECK(test::same_bytes(b1, b2));
    CHECK(!test::same_bytes(a1, b1));
}

TEST_CASE("moe: route(X, W) and the layer pick the same experts and weights bit for bit, near-ties included "
          "[layer][routing]")
{
    const std::size_t d = 70;
    const int E = 8;
    for (std::size_t T : { std::size_t(3), std::size_t(64), std::size_t(130) }) {
        layer_fixture<f32_t> fx(d, 16, E, 271);
        // Near-ties: expert 5's router row is expert 2's with one element
        // nudged by an ulp, expert 7's is expert 1's exactly.
        for (std::size_t i = 0; i < d; ++i) {
            fx.router[5 * d + i] = fx.router[2 * d + i];
            fx.router[7 * d + i] = fx.router[1 * d + i];
        }
        fx.router[5 * d + 3] = std::nextafter(fx.router[5 * d + 3], 2.0f);
        const auto w = fx.make();
        moe_workspace ws(w.shape(T, 4));
        const auto X = test::random_floats(T * d, 272 + T);
        run(w, ws, X, T, fixed_k<4> {});
        std::vector<float> logits(T * std::size_t(E)), wts(T * 4);
        std::vector<std::int32_t> ids(T * 4);
        route(cmatrix_view<float>(X.data(), T, d), cmatrix_view<float>(fx.router.data(), std::size_t(E), d),
            fixed_k<4> {}, router_options {}, matrix_view<float>(logits.data(), T, std::size_t(E)),
            matrix_view<std::int32_t>(ids.data(), T, 4), matrix_view<float>(wts.data(), T, 4));
        const auto lg = ws.logits();
        CHECK(test::same_bytes(std::vector<float>(lg.data, lg.data + T * std::size_t(E)), logits));
        CHECK(std::vector<std::int32_t>(ws.ids().data, ws.ids().data + T * 4) == ids);
        CHECK(test::same_bytes(std::vector<float>(ws.routing_weights().data, ws.routing_weights().data + T * 4), wts));
    }
}

TEST_CASE("moe: a bf16 router runs through the same logits as route(X, W) [layer][routing]")
{
    const std::size_t d = 48, T = 10;
    const int E = 8;
    layer_fixture<f32_t> fx(d, 24, E, 281);
    std::vector<bf16> rb(fx.router.size());
    for (std::size_t i = 0; i < rb.size(); ++i)
        rb[i] = bf16::from_float(fx.router[i]);
    const any_weight_view router = weight_view<bf16_t>(rb.data(), std::size_t(E), d);
    const moe_weights w(router, fx.experts());
    moe_workspace ws(w.shape(T, 2));
    const auto X = test::random_floats(T * d, 282);
    run(w, ws, X, T, 2);
    std::vector<float> logits(T * std::size_t(E)), wts(T * 2);
    std::vector<std::int32_t> ids(T * 2);
    route(cmatrix_view<float>(X.data(), T, d), router, dynamic_k { 2 }, router_options {},
        matrix_view<float>(logits.data(), T, std::size_t(E)), matrix_view<std::int32_t>(ids.data(), T, 2),
        matrix_view<float>(wts.data(), T, 2));
    CHECK(std::vector<std::int32_t>(ws.ids().data, ws.ids().data + T * 2) == ids);
    const auto lg = ws.logits();
    for (std::size_t t = 0; t < T; ++t)
        for (std::size_t e = 0; e < std::size_t(E); ++e) {
            REQUIRE(lg(t, e) == logits[t * std::size_t(E) + e]);
            double s = 0, a = 0;
            for (std::size_t i = 0; i < d; ++i) {
                s += double(X[t * d + i]) * double(rb[e * d + i].to_float());
                a += std::fabs(double(X[t * d + i]) * double(rb[e * d + i].to_float()));
            }
            REQUIRE(std::fabs(lg(t, e) - s) <= 2 * ref::gamma(d) * a + 1e-30);
        }
}
