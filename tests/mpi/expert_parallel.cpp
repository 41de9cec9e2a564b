// Expert parallelism over MPI (include/kdial/distributed/): every rank
// builds the same random layer, runs moe::forward in one process on the
// tokens of all ranks concatenated (the reference), then the distributed
// forward on its own tokens with only its own experts, and compares bytes.
// Cases use CHECK, never REQUIRE, on results: a rank that stopped early would
// leave the others waiting in a collective. Tags: [mpi] (and [threads]
// where a case starts its own arena threads).
#include <doctest/doctest.h>

#include <kdial/distributed/expert_parallel.hpp>

#include "layer/fixture.hpp"
#include "test_util.hpp"

#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using namespace kdial;
using kdial::distributed::expert_placement;

int world_rank()
{
    int r = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &r);
    return r;
}
int world_size()
{
    int n = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &n);
    return n;
}

// This rank's experts from a full fixture, in placement order.
template <weight_type W>
expert_set local_experts(const test::layer_fixture<W>& fx, const expert_placement& pl, int rank)
{
    std::vector<expert_weights<W>> v;
    for (std::int32_t e : pl.experts_of(rank))
        v.push_back({ fx.gate[std::size_t(e)].view, fx.up[std::size_t(e)].view, fx.down[std::size_t(e)].view });
    if (v.empty())
        return expert_set {};
    return expert_set(std::move(v), fx.d, fx.F);
}

struct split {
    std::vector<std::size_t> T; // tokens per rank
    std::size_t g0 = 0, mine = 0, all = 0, max = 1;
    explicit split(std::vector<std::size_t> per_rank)
        : T(std::move(per_rank))
    {
        const int me = world_rank();
        for (int r = 0; r < int(T.size()); ++r) {
            if (r < me)
                g0 += T[std::size_t(r)];
            all += T[std::size_t(r)];
            max = std::max(max, T[std::size_t(r)]);
        }
        mine = T[std::size_t(me)];
    }
};

// Tokens per rank: pattern[r % pattern.size()].
split tokens_per_rank(std::vector<std::size_t> pattern)
{
    std::vector<std::size_t> t(static_cast<std::size_t>(world_size()));
    for (std::size_t r = 0; r < t.size(); ++r)
        t[r] = pattern[r % pattern.size()];
    return split(std::move(t));
}

struct run_options {
    router_options routing {};
    bool with_gate = true;
    combine_mode mode = combine_mode::overwrite;
    act_mode act = act_mode::exact; // both sides
};

// Runs the reference and the distributed layer with `make_policy(g0, T)`
// (the policy for rows [g0, g0 + T) of the concatenated batch); returns
// whether this rank's rows are byte-identical. `ws` (optional) is reused.
template <weight_type W, class MakePolicy>
bool same_as_one_process(const test::layer_fixture<W>& fx, const expert_placement& pl, const split& s, int max_k,
    MakePolicy make_policy, const run_options& o = {}, distributed::ep_stats* stats = nullptr)
{
    const std::size_t d = fx.d;
    const auto X = test::random_floats(s.all * d, 77 + s.all, -1.0f, 1.0f);
    const auto base = test::random_floats(s.all * d, 78, -1.0f, 1.0f);
    const moe_weights full = fx.make(o.routing, o.with_gate);
    moe_workspace ws(full.shape(std::max<std::size_t>(1, s.all), max_k));
    ws.set_act_mode(o.act);
    std::vector<float> want = base;
    moe::forward(full, ws, cmatrix_view<float>(X.data(), s.all, d), make_policy(0, s.all),
        matrix_view<float>(want.data(), s.all, d), o.mode);

    const int me = world_rank();
    const distributed::ep_weights ew(
        MPI_COMM_WORLD, pl, full.router(), local_experts(fx, pl, me), o.routing, full.shared());
    distributed::ep_workspace ews(ew, s.max, max_k);
    ews.set_act_mode(o.act);
    std::vector<float> got(base.begin() + std::ptrdiff_t(s.g0 * d), base.begin() + std::ptrdiff_t((s.g0 + s.mine) * d));
    distributed::forward(ew, ews, cmatrix_view<float>(X.data() + s.g0 * d, s.mine, d), make_policy(s.g0, s.mine),
        matrix_view<float>(got.data(), s.mine, d), o.mode);
    if (stats)
        *stats = ews.stats();
    return s.mine == 0 || std::memcmp(got.data(), want.data() + s.g0 * d, s.mine * d * sizeof(float)) == 0;
}

auto every_token_k(int k)
{
    return [k](std::size_t, std::size_t) { return dynamic_k { k }; };
}

} // namespace

TEST_CASE_TEMPLATE(
    "expert parallel: bit-identical to one process for k = 1..E, T = 0 on a rank [mpi]", W, f32_t, bf16_t, q8_t)
{
    const int N = world_size(), me = world_rank();
    const test::layer_fixture<W> fx(64, 32, 7, 5);
    for (const auto& pl : { expert_placement::contiguous(7, N),
             expert_placement(
                 [&] {
                     std::vector<int> o(7);
                     for (int e = 0; e < 7; ++e)
                         o[std::size_t(e)] = (2 * e + 1) % N; // scattered, uneven
                     return o;
                 }(),
                 N) }) {
        const split s = tokens_per_rank({ 6, 0, 11 });
        for (int k = 1; k <= 7; ++k) {
            CAPTURE(k);
            CAPTURE(me);
            distributed::ep_stats st;
            CHECK(same_as_one_process(fx, pl, s, k, every_token_k(k), {}, &st));
            CHECK(st.calls == 1);
            // Only rows for other ranks' experts travel; k rows per token at most.
            CHECK(st.rows_sent <= s.mine * std::size_t(k));
        }
    }
}

TEST_CASE("expert parallel: T = 1 on some ranks, renormalised and sigmoid routing, accumulate [mpi]")
{
    const int N = world_size();
    const test::layer_fixture<f32_t> fx(40, 24, 5, 9);
    const auto pl = expert_placement::contiguous(5, N);
    for (const auto& pattern : { std::vector<std::size_t> { 1, 3, 1 }, std::vector<std::size_t> { 1, 1 },
             std::vector<std::size_t> { 2, 1, 0 }, std::vector<std::size_t> { 0 } }) {
        const split s = tokens_per_rank(pattern);
        for (int k : { 1, 2, 5 }) {
            CAPTURE(k);
            run_options o;
            CHECK(same_as_one_process(fx, pl, s, k, every_token_k(k), o));
            o.routing.renormalize = true;
            o.mode = combine_mode::accumulate;
            CHECK(same_as_one_process(fx, pl, s, k, every_token_k(k), o));
            o.routing.score = scoring::sigmoid;
            o.routing.scale = 2.5f;
            CHECK(same_as_one_process(fx, pl, s, k, every_token_k(k), o));
        }
    }
}

TEST_CASE("expert parallel: a k per token and thresholds drop work, dropped slots never sent [mpi]")
{
    const int N = world_size();
    const int E = 8;
    const test::layer_fixture<bf16_t> fx(32, 16, E, 3);
    const auto pl = expert_placement::contiguous(std::size_t(E), N);
    const split s = tokens_per_rank({ 9, 4, 13 });
    std::vector<int> ks(s.all);
    std::mt19937 rng(4);
    for (int& k : ks)
        k = 1 + int(rng() % unsigned(E));
    CHECK(same_as_one_process(fx, pl, s, E,
        [&](std::size_t g0, std::size_t T) { return per_token_k { std::span<const int>(ks.data() + g0, T) }; }));
    CHECK(same_as_one_process(fx, pl, s, E, [](std::size_t, std::size_t) { return threshold_options { 0.5f, 1, 4 }; }));
    // A given routing with holes: the rows sent are exactly the kept
    // assignments bound for other ranks.
    std::vector<std::int32_t> ids(s.all * 3, no_expert);
    std::vector<float> wts(s.all * 3, 0.25f);
    for (std::size_t t = 0; t < s.all; ++t)
        for (std::size_t j = 0; j < 3; ++j)
            if ((t + j) % 3 != 0)
                ids[t * 3 + j] = std::int32_t((t * 3 + j * 5) % std::size_t(E));
    distributed::ep_stats st;
    CHECK(same_as_one_process(
        fx, pl, s, 3,
        [&](std::size_t g0, std::size_t T) {
            return given_routing { cmatrix_view<std::int32_t>(ids.data() + g0 * 3, T, 3),
                cmatrix_view<float>(wts.data() + g0 * 3, T, 3) };
        },
        {}, &st));
    std::size_t remote = 0;
    const int me = world_rank();
    for (std::size_t t = s.g0; t < s.g0 + s.mine; ++t)
        for (std::size_t j = 0; j < 3; ++j)
            remote += ids[t * 3 + j] != no_expert && pl.owner(std::size_t(ids[t * 3 + j])) != me;
    CHECK(st.rows_sent == remote);
}

TEST_CASE("expert parallel: a hot expert receives every token of every rank, past a GEMM row chunk [mpi]")
{
    const int N = world_size();
    const int E = 6;
    const test::layer_fixture<q8_t> fx(64, 32, E, 21);
    const auto pl = expert_placement::contiguous(std::size_t(E), N);
    const split s = tokens_per_rank({ 300, 1, 260 }); // expert 4 gets > 512 rows
    std::vector<std::int32_t> ids(s.all * 2);
    std::vector<float> wts(s.all * 2);
    for (std::size_t t = 0; t < s.all; ++t) {
        ids[t * 2] = 4;
        ids[t * 2 + 1] = std::int32_t(t % 4);
        wts[t * 2] = 0.75f;
        wts[t * 2 + 1] = 0.25f;
    }
    CHECK(same_as_one_process(fx, pl, s, 2, [&](std::size_t g0, std::size_t T) {
        return given_routing { cmatrix_view<std::int32_t>(ids.data() + g0 * 2, T, 2),
            cmatrix_view<float>(wts.data() + g0 * 2, T, 2) };
    }));
}

TEST_CASE("expert parallel: shared expert and gate, router and shared rows across chunk boundaries [mpi]")
{
    const int N = world_size();
    const test::layer_fixture<f32_t> fx(48, 16, 4, 31, 24);
    const auto pl = expert_placement::contiguous(4, N);
    // 510 + a few: the router's 64-row chunks and the shared expert's 512-row
    // chunk are cut between ranks; 1 + 1 (+ 1): a GEMV chunk split.
    for (const auto& pattern : { std::vector<std::size_t> { 510, 4, 5 }, std::vector<std::size_t> { 1 },
             std::vector<std::size_t> { 2, 1, 0 }, std::vector<std::size_t> { 3, 7, 2 } }) {
        const split s = tokens_per_rank(pattern);
        CAPTURE(s.all);
        for (int k : { 1, 3 }) {
            CHECK(same_as_one_process(fx, pl, s, k, every_token_k(k)));
            run_options o;
            o.with_gate = false;
            CHECK(same_as_one_process(fx, pl, s, k, every_token_k(k), o));
        }
    }
}

TEST_CASE_TEMPLATE("expert parallel: int8 activations, routed and shared experts, give the bits of one process "
                   "[mpi][qdot]",
    W, q8_t, q4_0_t, q4_k_t)
{
    // q4_k rows are whole super-blocks of 256 inputs; d = 80 pads q8 / q4_0
    // rows to 96.
    constexpr bool k4 = std::is_same_v<W, q4_k_t>;
    const std::size_t d = k4 ? 256 : 80, F = k4 ? 256 : 48, Fs = k4 ? 256 : 72;
    const int N = world_size(), me = world_rank();
    const test::layer_fixture<W> fx(d, F, 5, 41, Fs);
    const auto pl = expert_placement::contiguous(5, N);
    // Prefill past the shared expert's GEMM row chunk (510 + a few), a GEMV
    // chunk split across ranks, T = 0 on a rank, single tokens.
    for (const auto& pattern : { std::vector<std::size_t> { 510, 4, 5 }, std::vector<std::size_t> { 2, 1, 0 },
             std::vector<std::size_t> { 3, 7, 2 }, std::vector<std::size_t> { 1 } }) {
        const split s = tokens_per_rank(pattern);
        CAPTURE(s.all);
        CAPTURE(me);
        for (int k : { 1, 2, 5 }) {
            CAPTURE(k);
            run_options o;
            o.act = act_mode::int8;
            CHECK(same_as_one_process(fx, pl, s, k, every_token_k(k), o));
            o.with_gate = false;
            o.mode = combine_mode::accumulate;
            CHECK(same_as_one_process(fx, pl, s, k, every_token_k(k), o));
        }
    }
    // The int8 path really ran: its outputs differ from exact activations'.
    const moe_weights full = fx.make();
    const distributed::ep_weights ew(MPI_COMM_WORLD, pl, full.router(), local_experts(fx, pl, me), {}, full.shared());
    distributed::ep_workspace ews(ew, 6, 2);
    CHECK(ews.act() == act_mode::exact);
    const auto X = test::random_floats(6 * d, 90 + std::uint64_t(me), -1.0f, 1.0f);
    std::vector<float> exact(6 * d), int8(6 * d);
    distributed::forward(ew, ews, cmatrix_view<float>(X.data(), 6, d), 2, matrix_view<float>(exact.data(), 6, d));
    ews.set_act_mode(act_mode::int8);
    CHECK(ews.act() == act_mode::int8);
    distributed::forward(ew, ews, cmatrix_view<float>(X.data(), 6, d), 2, matrix_view<float>(int8.data(), 6, d));
    CHECK(!test::same_bytes(exact, int8));
    double worst = 0, scale = 0;
    for (std::size_t i = 0; i < exact.size(); ++i) {
        worst = std::max(worst, double(std::abs(exact[i] - int8[i])));
        scale = std::max(scale, double(std::abs(exact[i])));
    }
    CHECK(worst <= 0.05 * scale); // rounding of int8 activations, not a wrong kernel
}

TEST_CASE("expert parallel: more ranks than experts (a rank holds none) [mpi]")
{
    const int N = world_size();
    const test::layer_fixture<f32_t> fx(32, 16, 2, 8);
    const auto pl = expert_placement::contiguous(2, N);
    const auto pl_one = expert_placement(std::vector<int>(2, N - 1), N); // all on the last rank
    const split s = tokens_per_rank({ 5, 2, 7 });
    for (int k : { 1, 2 }) {
        CHECK(same_as_one_process(fx, pl, s, k, every_token_k(k)));
        CHECK(same_as_one_process(fx, pl_one, s, k, every_token_k(k)));
    }
}

TEST_CASE("expert parallel: 1 and 2 threads give the same bits [mpi][threads]")
{
    const int N = world_size();
    const test::layer_fixture<bf16_t> fx(64, 96, 6, 12, 32);
    const auto pl = expert_placement::contiguous(6, N);
    const split s = tokens_per_rank({ 40, 9, 70 });
    for (int th : { 1, 2 })
        test::with_threads(th, [&] { CHECK(same_as_one_process(fx, pl, s, 3, every_token_k(3))); });
}

TEST_CASE("expert parallel: ranks that disagree fail on every rank with a clear error [mpi]")
{
    const int N = world_size(), me = world_rank();
    const test::layer_fixture<f32_t> fx(32, 16, 6, 2);
    const test::layer_fixture<f32_t> narrow(32, 8, 6, 2);
    const moe_weights full = fx.make();
    const auto pl = expert_placement::contiguous(6, N);

    // Another FFN size on the last rank.
    const auto& mine = me == N - 1 ? narrow : fx;
    CHECK_THROWS_WITH_AS(distributed::ep_weights(MPI_COMM_WORLD, pl, full.router(), local_experts(mine, pl, me)),
        doctest::Contains("ranks disagree on the expert FFN size F"), kdial::error);

    // Another placement on rank 0.
    std::vector<int> owner(6, 0);
    for (int e = 0; e < 6; ++e)
        owner[std::size_t(e)] = e % N;
    const auto other = me == 0 ? expert_placement(owner, N) : pl;
    CHECK_THROWS_WITH_AS(distributed::ep_weights(MPI_COMM_WORLD, other, full.router(), local_experts(fx, other, me)),
        doctest::Contains("ranks disagree on the placement"), kdial::error);

    // A rank holding the wrong experts for the placement: its message on every rank.
    CHECK_THROWS_WITH_AS(distributed::ep_weights(MPI_COMM_WORLD, pl, full.router(),
                             local_experts(fx, me == 1 ? expert_placement::contiguous(6, 1) : pl, me == 1 ? 0 : me)),
        doctest::Contains("rank 1 of"), kdial::error);

    // Workspace sizes differ.
    const distributed::ep_weights ew(MPI_COMM_WORLD, pl, full.router(), local_experts(fx, pl, me));
    CHECK_THROWS_WITH_AS(distributed::ep_workspace(ew, me == 0 ? 8 : 9, 2),
        doctest::Contains("ranks disagree on the workspace"), kdial::error);

    // A bad call on one rank (k > E): every rank throws, then works on.
    distributed::ep_workspace ws(ew, 4, 6);
    const auto X = test::random_floats(4 * 32, 5);
    std::vector<float> out(4 * 32);
    const int bad_k = me == N - 1 ? 7 : 2;
    CHECK_THROWS_AS(distributed::forward(
                        ew, ws, cmatrix_view<float>(X.data(), 4, 32), bad_k, matrix_view<float>(out.data(), 4, 32)),
        kdial::error);
    const split s = tokens_per_rank({ 4 });
    CHECK(same_as_one_process(fx, pl, s, 2, every_token_k(2)));
    // A slot budget below T * k: k = 6 fits 2 tokens, not 4.
    distributed::ep_workspace tight(ew, 4, 6, 12);
    CHECK_THROWS_WITH_AS(
        distributed::forward(ew, tight, cmatrix_view<float>(X.data(), 4, 32), 6, matrix_view<float>(out.data(), 4, 32)),
        doctest::Contains("slots"), kdial::error);
    CHECK_NOTHROW(distributed::forward(
        ew, tight, cmatrix_view<float>(X.data(), 2, 32), 6, matrix_view<float>(out.data(), 2, 32)));
    // A non-finite router logit on one rank: every rank throws.
    std::vector<float> Xn = X;
    if (me == 0)
        Xn[3] = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_AS(
        distributed::forward(ew, ws, cmatrix_view<float>(Xn.data(), 4, 32), 2, matrix_view<float>(out.data(), 4, 32)),
        kdial::error);
    CHECK_NOTHROW(
        distributed::forward(ew, ws, cmatrix_view<float>(X.data(), 4, 32), 2, matrix_view<float>(out.data(), 4, 32)));
}

TEST_CASE("expert placement: contiguous blocks and wire order [mpi]")
{
    const auto p = expert_placement::contiguous(64, 3);
    CHECK(p.count(0) == 22);
    CHECK(p.count(1) == 21);
    CHECK(p.count(2) == 21);
    CHECK(p.owner(21) == 0);
    CHECK(p.owner(22) == 1);
    CHECK(p.experts_of(2)[0] == 43);
    const expert_placement q(std::vector<int> { 1, 0, 1, 0 }, 2);
    CHECK(q.experts_of(0)[0] == 1);
    CHECK(q.experts_of(0)[1] == 3);
    CHECK(q.wire(2) == 3);
    CHECK(q.wire_begin(1) == 2);
    CHECK(p.hash() != expert_placement::contiguous(64, 4).hash());
    CHECK_THROWS_WITH_AS(
        expert_placement(std::vector<int> { 0, 2 }, 2), doctest::Contains("placed on rank 2"), kdial::error);
}
