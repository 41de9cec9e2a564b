// Benchmarks of stage 1 (route) and stages 2+4 (dispatch + combine), and of
// combine with k at compile time (combine_k, below).
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
#include <cmath>
#include <cstring>
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

// combine_k: stage 4 alone, serial, d = 2048: kdial::combine (k passes of
// axpy over a 256-float chunk of the row, k at run time) against one
// register-resident sum per vector, acc = fma(w_j, y_j, acc) for j in rank
// order: the same operations per element, so the same bits (checked before
// timing), with k at run time (dynamic_k) or at compile time (fixed_k<N>,
// the loop over j unrolled): does a compile-time k pay below routing?
// Bytes = T*k*d*4 read + T*d*4 written. Args: {T, k, variant: 0
// kdial::combine, 1 fused dynamic_k, 2 fused fixed_k}. Measured (loaded
// 2-core AVX-512 machine, CPU time; README "k is a compile-time constant
// only in routing"): fused 1.8-2.5x faster than kdial::combine, fixed_k a
// further 3-11 %; the stage is under 0.6 % of an MoE layer call.
template <kdial::k_extent K>
void combine_fused(const kdial::dispatch_plan& plan, const float* w, const float* Y, float* out, std::size_t d, K kk)
{
    using B = xsimd::batch<float>;
    constexpr std::size_t W = B::size;
    constexpr int cap = K::is_fixed ? K::max_value : 8;
    const int k = kk.value();
    for (std::size_t t = 0; t < plan.tokens(); ++t) {
        const float* y[cap];
        float wj[cap];
        for (int j = 0; j < k; ++j) { // top-k routing: no dropped slots
            y[j] = Y + std::size_t(plan.slot_of(t, std::size_t(j))) * d;
            wj[j] = w[t * std::size_t(k) + std::size_t(j)];
        }
        float* o = out + t * d;
        for (std::size_t i = 0; i + W <= d; i += W) {
            B acc(0.0f);
            for (int j = 0; j < k; ++j)
                acc = kdial::simd::fma(B(wj[j]), B::load_unaligned(y[j] + i), acc);
            acc.store_unaligned(o + i);
        }
    } // d = 2048 here: a multiple of every vector width, no scalar tail
}

void bm_combine_k(benchmark::State& state)
{
    const auto T = std::size_t(state.range(0));
    const int k = int(state.range(1)), variant = int(state.range(2));
    const std::size_t d = 2048;
    const auto logits = normal(T * E, 4);
    const auto y = normal(T * std::size_t(k) * d, 5);
    std::vector<std::int32_t> ids(T * std::size_t(k));
    std::vector<float> w(T * std::size_t(k)), ref(T * d), out(T * d);
    kdial::dispatch_plan plan(T, E, k);
    kdial::route(kdial::cmatrix_view<float>(logits.data(), T, E), kdial::dynamic_k { k }, kdial::router_options {},
        kdial::matrix_view<std::int32_t>(ids.data(), T, std::size_t(k)),
        kdial::matrix_view<float>(w.data(), T, std::size_t(k)), kdial::serial_executor {});
    plan.build(kdial::cmatrix_view<std::int32_t>(ids.data(), T, std::size_t(k)));
    const kdial::cmatrix_view<float> wv(w.data(), T, std::size_t(k)), yv(y.data(), T * std::size_t(k), d);
    auto run = [&](float* o) {
        if (variant == 0)
            kdial::combine(plan, wv, yv, kdial::matrix_view<float>(o, T, d), {}, kdial::combine_mode::overwrite,
                kdial::serial_executor {});
        else if (variant == 1)
            combine_fused(plan, w.data(), y.data(), o, d, kdial::dynamic_k { k });
        else
            kdial::with_k(k, [&](auto kk) { combine_fused(plan, w.data(), y.data(), o, d, kk); });
    };
    kdial::combine(plan, wv, yv, kdial::matrix_view<float>(ref.data(), T, d), {}, kdial::combine_mode::overwrite,
        kdial::serial_executor {});
    run(out.data());
    if (std::memcmp(out.data(), ref.data(), out.size() * sizeof(float)) != 0) {
        state.SkipWithError("combine variant differs from kdial::combine");
        return;
    }
    for (auto _ : state) {
        run(out.data());
        benchmark::DoNotOptimize(out.data());
        benchmark::ClobberMemory();
    }
    const double bytes = double(T) * d * 4 * (k + 1.0);
    state.counters["GB/s"]
        = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
    state.SetLabel(variant == 0 ? "kdial::combine" : variant == 1 ? "fused dynamic_k" : "fused fixed_k");
}

void combine_k_args(benchmark::internal::Benchmark* b)
{
    for (int T : { 1, 512 })
        for (int k : { 1, 2, 8 })
            for (int v : { 0, 1, 2 })
                b->Args({ T, k, v });
    b->ArgNames({ "T", "k", "variant" });
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
BENCHMARK(bm_combine_k)->Apply(combine_k_args)->MinTime(0.1);

int main(int argc, char** argv)
{
    benchmark::Initialize(&argc, argv);
    if (benchmark::ReportUnrecognizedArguments(argc, argv))
        return 1;
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}
