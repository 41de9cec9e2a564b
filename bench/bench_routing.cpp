// Benchmarks of stage 1 (route) and stages 2+4 (dispatch + combine).
//
// route:   tokens/s for T tokens, E = 64, k in {1, 2, 4, 8}, fixed and
//          dynamic k. Bytes = T*E*4 (logits read) + T*k*8 (ids + weights
//          written); reported as a fraction of the in-run read bandwidth.
// dispatch+combine: plan build + gather + combine of T tokens, d = 2048.
//          Bytes = gather (T*k*d*4 read + T*k*d*4 written) + combine
//          (T*k*d*4 read + T*d*4 written); reported as a fraction of the
//          in-run memcpy bandwidth (which also counts read + written bytes).
// Args: {T, k, threads}. Each runs inside a tbb::task_arena of `threads`.
#include <kdial/kdial.hpp>

#include "roofline.hpp"

#include <benchmark/benchmark.h>

#include <chrono>
#include <random>
#include <vector>

namespace {

std::vector<float> normal(std::size_t n, unsigned seed)
{
    std::mt19937 rng(seed);
    std::normal_distribution<float> g(0.0f, 2.0f);
    std::vector<float> v(n);
    for (auto& x : v)
        x = g(rng);
    return v;
}

constexpr int E = 64;

template <bool Fixed> void bm_route(benchmark::State& state)
{
    const auto T = std::size_t(state.range(0));
    const int k = int(state.range(1));
    tbb::task_arena arena(int(state.range(2)));
    const auto logits = normal(T * E, 1);
    std::vector<std::int32_t> ids(T * k);
    std::vector<float> w(T * k);
    kdial::bench::limits lim;
    arena.execute([&] { lim = kdial::bench::machine_limits(); });
    double secs = 0;
    auto run = [&](auto kk) {
        for (auto _ : state) {
            const auto t0 = std::chrono::steady_clock::now();
            arena.execute([&] {
                kdial::route(kdial::cmatrix_view<float>(logits.data(), T, E), kk, kdial::router_options {},
                    kdial::matrix_view<std::int32_t>(ids.data(), T, k), kdial::matrix_view<float>(w.data(), T, k));
            });
            secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            benchmark::DoNotOptimize(w.data());
        }
    };
    if constexpr (Fixed)
        kdial::with_k(k, run);
    else
        run(kdial::dynamic_k { k });
    const double bytes = double(T) * (E * 4 + k * 8);
    state.counters["tok/s"] = benchmark::Counter(double(T), benchmark::Counter::kIsIterationInvariantRate);
    state.counters["GB/s"]
        = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
    state.counters["read_bw_GBs"] = lim.read_gbs;
    state.counters["frac_read_bw"] = bytes * double(state.iterations()) / secs / 1e9 / lim.read_gbs;
    state.SetLabel(Fixed ? "fixed_k" : "dynamic_k");
}

void bm_dispatch_combine(benchmark::State& state)
{
    const auto T = std::size_t(state.range(0));
    const int k = int(state.range(1));
    const std::size_t d = 2048;
    tbb::task_arena arena(int(state.range(2)));
    const auto logits = normal(T * E, 2);
    const auto x = normal(T * d, 3);
    std::vector<std::int32_t> ids(T * k);
    std::vector<float> w(T * k), xs(T * k * d), out(T * d);
    kdial::dispatch_plan plan(T, E, k);
    kdial::bench::limits lim;
    arena.execute([&] {
        lim = kdial::bench::machine_limits();
        kdial::route(kdial::cmatrix_view<float>(logits.data(), T, E), kdial::dynamic_k { k }, kdial::router_options {},
            kdial::matrix_view<std::int32_t>(ids.data(), T, k), kdial::matrix_view<float>(w.data(), T, k));
    });
    double secs = 0;
    for (auto _ : state) {
        const auto t0 = std::chrono::steady_clock::now();
        arena.execute([&] {
            plan.build(kdial::cmatrix_view<std::int32_t>(ids.data(), T, k));
            kdial::gather(
                plan, kdial::cmatrix_view<float>(x.data(), T, d), kdial::matrix_view<float>(xs.data(), T * k, d));
            kdial::combine(plan, kdial::cmatrix_view<float>(w.data(), T, k),
                kdial::cmatrix_view<float>(xs.data(), T * k, d), kdial::matrix_view<float>(out.data(), T, d));
        });
        secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        benchmark::DoNotOptimize(out.data());
    }
    const double bytes = double(T) * d * 4 * (3.0 * k + 1.0);
    state.counters["GB/s"]
        = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
    state.counters["memcpy_GBs"] = lim.copy_gbs;
    state.counters["frac_memcpy"] = bytes * double(state.iterations()) / secs / 1e9 / lim.copy_gbs;
    state.counters["tok/s"] = benchmark::Counter(double(T), benchmark::Counter::kIsIterationInvariantRate);
}

void route_args(benchmark::internal::Benchmark* b)
{
    for (int threads : { 1, 2 })
        for (int T : { 1, 64, 512, 4096 })
            for (int k : { 1, 2, 4, 8 })
                b->Args({ T, k, threads });
    b->ArgNames({ "T", "k", "threads" });
}

} // namespace

BENCHMARK(bm_route<true>)->Apply(route_args)->MinTime(0.1);
BENCHMARK(bm_route<false>)->Apply(route_args)->MinTime(0.1);
BENCHMARK(bm_dispatch_combine)->Apply(route_args)->MinTime(0.1);

int main(int argc, char** argv)
{
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv))
        return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
