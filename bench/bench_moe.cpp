// The whole MoE layer (route -> dispatch -> experts -> combine) at OLMoE's
// sizes: d = 2048, F = 1024, E = 64, for k in {1, 2, 4, 8} and weights in
// f32 / bf16 / q8, with 1 and 2 threads.
//
// Formulas (stated once):
//   decode bytes  = router E*d*4 + (experts used) * 3*F*d*bytes_per_weight
//                   (bf16 2, f32 4, q8 36/32); T = 1 so experts used = k.
//   prefill flops = 2 * (T*k) * 3*F*d   (expert FLOPs; the router adds 2*T*E*d)
// Counters: frac_bw = (decode bytes / time) / in-run read bandwidth;
//           frac_peak = (prefill flops / time) / in-run FMA peak;
//           frac_roof = max(bytes / bandwidth, flops / peak) / time (prefill:
//           the weight bytes the experts used, once each).
// Decode cycles through a pool of layers larger than the last-level cache
// (>= 2 GiB of weights) so every call streams its experts from memory.
// Each benchmark makes one untimed call first (page faults on the fresh
// workspace). The weights sit where std::vector puts them (16 bytes past a
// 64-byte boundary with glibc), as tensors in a safetensors file sit at
// some multiple of 8 bytes: the timed case is the misaligned one.
// Args: {T, k, threads}. skew/: routing skew at T = 512 (bm_skew). dense/:
// dense_linear at T = 1 and 512 (bm_dense).
#include <kdial/kdial.hpp>

#include "roofline.hpp"

#include <benchmark/benchmark.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace {

constexpr std::size_t d_model = 2048, d_ffn = 1024, n_experts = 64;

// splitmix64. The half-finalizer this replaced (xor-shift, multiply,
// xor-shift, no increment) left inputs that differ by small strides
// correlated (0.3 between tokens): routing at T = 512, k = 1 then sent half
// the rows to 15 of the 64 experts and none to 9, where uniform routing
// gives each ~8. Skew has its own benchmark (skew/).
std::uint64_t mix(std::uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
float unit(std::uint64_t i)
{
    return float(mix(i) >> 40) * (2.0f / 16777216.0f) - 1.0f;
} // [-1, 1)

// One layer's storage: E experts, each gate [F,d], up [F,d], down [d,F].
template <kdial::weight_type W> struct layer_storage {
    using S = typename W::storage;
    std::vector<S> gate, up, down;
    std::vector<float> router;
    std::optional<kdial::moe_weights> layer;

    static void fill(std::vector<S>& v, std::size_t n, std::uint64_t seed, float scale)
    {
        v.resize(n);
        tbb::parallel_for(
            tbb::blocked_range<std::size_t>(0, n, std::size_t(1) << 16), [&](const tbb::blocked_range<std::size_t>& r) {
                for (std::size_t i = r.begin(); i != r.end(); ++i) {
                    const std::uint64_t h = seed * 0x9e3779b97f4a7c15ull + i;
                    if constexpr (std::is_same_v<W, kdial::f32_t>)
                        v[i] = scale * unit(h);
                    else if constexpr (std::is_same_v<W, kdial::bf16_t>)
                        v[i] = kdial::bf16::from_float(scale * unit(h));
                    else {
                        v[i].set_scale(kdial::f16::from_float(scale / 127.0f));
                        for (int j = 0; j < kdial::q8_block_size; ++j)
                            v[i].q[j] = std::int8_t(int(mix(h * 32 + j) % 255) - 127);
                    }
                }
            });
    }

    explicit layer_storage(std::uint64_t seed)
    {
        const std::size_t row_d = kdial::storage_cols<W>(d_model), row_f = kdial::storage_cols<W>(d_ffn);
        fill(gate, n_experts * d_ffn * row_d, seed * 3 + 0, 0.03f);
        fill(up, n_experts * d_ffn * row_d, seed * 3 + 1, 0.03f);
        fill(down, n_experts * d_model * row_f, seed * 3 + 2, 0.03f);
        router.resize(n_experts * d_model);
        for (std::size_t i = 0; i < router.size(); ++i)
            router[i] = 0.05f * unit(seed * 1000003 + i);
        // Stacked tensors: gate, up [E, F, d], down [E, d, F].
        using SW = kdial::stacked_weight<W>;
        layer.emplace(kdial::cmatrix_view<float>(router.data(), n_experts, d_model),
            kdial::expert_set::stacked(n_experts, SW { gate.data(), d_ffn, d_model }, SW { up.data(), d_ffn, d_model },
                SW { down.data(), d_model, d_ffn }));
    }
};

// A pool of layers holding at least `min_bytes` of expert weights (cached
// across benchmarks of the same format and size).
template <kdial::weight_type W> std::vector<std::unique_ptr<layer_storage<W>>>& pool(std::size_t layers)
{
    static std::vector<std::unique_ptr<layer_storage<W>>> p;
    if (p.size() != layers) {
        p.clear();
        for (std::size_t i = 0; i < layers; ++i)
            p.push_back(std::make_unique<layer_storage<W>>(i + 1));
    }
    return p;
}

// The counters of a timed run: ms per call, GB/s and GFLOP/s, and as a
// fraction of this run's limits frac_bw (T = 1, weight streaming) or
// frac_peak (T > 1).
void set_rates(
    benchmark::State& state, const kdial::bench::limits& lim, std::size_t T, double secs, double bytes, double flops)
{
    state.counters["ms"] = secs / double(state.iterations()) * 1e3;
    state.counters["GB/s"] = bytes / secs / 1e9;
    state.counters["GFLOP/s"] = flops / secs / 1e9;
    if (T == 1)
        state.counters["frac_bw"] = bytes / secs / 1e9 / lim.read_gbs;
    else {
        state.counters["frac_peak"] = flops / secs / 1e9 / lim.fma_gflops;
        // Of the roofline: the least time the weight bytes (at the read
        // bandwidth) and the FLOPs (at the peak) allow, over the time taken.
        // At 8 rows per expert, f32 weights carry 4 FLOP per byte: below
        // peak / bandwidth there, the stream bounds frac_peak under 1.
        if (bytes > 0)
            state.counters["frac_roof"] = std::max(bytes / 1e9 / lim.read_gbs, flops / 1e9 / lim.fma_gflops) / secs;
    }
}

// Calls f once untimed (the page faults of fresh buffers and workspace are
// not a layer's cost in an engine that reuses them), then once per
// benchmark iteration; returns the seconds of the timed calls.
template <class F> double time_calls(benchmark::State& state, F&& f, const float* out)
{
    f();
    double secs = 0;
    for (auto _ : state) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        benchmark::DoNotOptimize(out);
    }
    return secs;
}

template <kdial::weight_type W> void bm_moe(benchmark::State& state)
{
    const auto T = std::size_t(state.range(0));
    const int k = int(state.range(1));
    tbb::task_arena arena(int(state.range(2)));
    kdial::bench::limits lim;
    arena.execute([&] { lim = kdial::bench::machine_limits(); });
    const std::size_t layer_bytes
        = n_experts * 3 * d_ffn * kdial::storage_cols<W>(d_model) * sizeof(typename W::storage);
    const std::size_t layers = T == 1 ? (std::size_t(2) << 30) / layer_bytes + 1 : 1;
    auto& p = pool<W>(layers);
    kdial::moe_workspace ws(p[0]->layer->shape(T, 8)); // one stream's scratch, shared by the layers
    // A few different token batches so routing varies between calls.
    std::vector<std::vector<float>> xs(8, std::vector<float>(T * d_model));
    for (std::size_t b = 0; b < xs.size(); ++b)
        for (std::size_t i = 0; i < xs[b].size(); ++i)
            xs[b][i] = unit(b * 7919 + i * 31 + 17);
    std::vector<float> out(T * d_model);
    // One untimed call first: its page faults on the fresh workspace and
    // output (~80 MB at T = 512, k = 8; ~40 % of a 1-iteration run in this
    // VM) are not the layer's cost in an engine that reuses them.
    arena.execute([&] {
        kdial::moe::forward(*p[0]->layer, ws, kdial::cmatrix_view<float>(xs[0].data(), T, d_model), k,
            kdial::matrix_view<float>(out.data(), T, d_model));
    });
    double secs = 0, bytes = 0;
    std::size_t it = 0;
    for (auto _ : state) {
        const auto& L = *p[it % p.size()]->layer;
        const auto& x = xs[it % xs.size()];
        ++it;
        const auto t0 = std::chrono::steady_clock::now();
        arena.execute([&] {
            kdial::moe::forward(L, ws, kdial::cmatrix_view<float>(x.data(), T, d_model), k,
                kdial::matrix_view<float>(out.data(), T, d_model));
        });
        secs += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        bytes += double(kdial::moe::weight_bytes(L, ws));
        benchmark::DoNotOptimize(out.data());
    }
    const double flops = 2.0 * double(T) * k * 3.0 * d_ffn * d_model * double(state.iterations());
    set_rates(state, lim, T, secs, bytes, flops);
    state.counters["limit_bw"] = lim.read_gbs;
    state.counters["limit_gflops"] = lim.fma_gflops;
    if (T > 1) { // the last call's routing: busiest expert's rows, idle experts
        const auto counts = ws.plan().counts();
        state.counters["rows_max"] = double(*std::max_element(counts.begin(), counts.end()));
        state.counters["experts_idle"] = double(std::count(counts.begin(), counts.end(), 0));
    }
    state.SetLabel(std::string(kdial::dtype_name(W::id)));
}

// A dense layer (dense_linear: attention projections, lm_head) Y [T, O] =
// X [T, 2048] . W [O, 2048]ᵀ, exact activations. Args: {T, O, threads}.
// T = 1 streams W (lm_head size, 50304 rows: larger than the last-level
// cache) and reports frac_bw; T = 512 reports frac_peak (flops 2 T O d).
template <kdial::weight_type W> void bm_dense(benchmark::State& state)
{
    using S = typename W::storage;
    const auto T = std::size_t(state.range(0)), O = std::size_t(state.range(1));
    tbb::task_arena arena(int(state.range(2)));
    kdial::bench::limits lim;
    arena.execute([&] { lim = kdial::bench::machine_limits(); });
    std::vector<S> w;
    layer_storage<W>::fill(w, O * kdial::storage_cols<W>(d_model), 99, 0.03f);
    const kdial::any_weight_view wv(kdial::weight_view<W>(w.data(), O, d_model));
    std::vector<float> x(T * d_model), y(T * O);
    for (std::size_t i = 0; i < x.size(); ++i)
        x[i] = unit(i * 13 + 1);
    const auto run = [&] {
        arena.execute([&] {
            kdial::dense_linear(
                wv, kdial::cmatrix_view<float>(x.data(), T, d_model), kdial::matrix_view<float>(y.data(), T, O));
        });
    };
    const double secs = time_calls(state, run, y.data());
    const double n = double(state.iterations());
    set_rates(state, lim, T, secs, double(kdial::bytes_of(wv)) * n, 2.0 * double(T) * double(O) * d_model * n);
    state.SetLabel(std::string(kdial::dtype_name(W::id)));
}

void dense_args(benchmark::internal::Benchmark* b)
{
    for (int threads : { 1, 2 }) {
        b->Args({ 1, 50304, threads });
        b->Args({ 512, 2048, threads });
        b->Args({ 512, 50304, threads });
    }
    b->ArgNames({ "T", "O", "threads" });
}

void decode_args(benchmark::internal::Benchmark* b)
{
    for (int threads : { 1, 2 })
        for (int k : { 1, 2, 4, 8 })
            b->Args({ 1, k, threads });
    b->ArgNames({ "T", "k", "threads" });
}

void prefill_args(benchmark::internal::Benchmark* b)
{
    for (int threads : { 1, 2 })
        for (int T : { 64, 512, 2048 })
            for (int k : { 1, 2, 4, 8 })
                b->Args({ T, k, threads });
    b->ArgNames({ "T", "k", "threads" });
}

// Expert ids [T, k] of a skew pattern: 0 uniform (round robin), 1 Zipf
// (weights 1 / (r + 1) over a fixed permutation of the experts), 2 one
// hot expert with half the slots.
std::vector<std::int32_t> skew_ids(std::size_t T, int pattern, int k)
{
    std::vector<std::int32_t> ids(T * std::size_t(k));
    std::vector<double> cdf(n_experts);
    double sum = 0;
    for (std::size_t r = 0; r < n_experts; ++r)
        cdf[r] = sum += 1.0 / double(r + 1);
    for (std::size_t t = 0; t < T; ++t) {
        for (int j = 0; j < k; ++j) {
            std::int32_t e = 0;
            if (pattern == 0) {
                e = std::int32_t((t * std::size_t(k) + std::size_t(j)) % n_experts);
            } else if (pattern == 1) {
                for (std::uint64_t a = 0;; ++a) { // draw until distinct
                    const double u = double(mix(t * 1000 + std::size_t(j) * 37 + a * 7919) >> 11) / 9007199254740992.0;
                    const auto r = std::size_t(std::lower_bound(cdf.begin(), cdf.end(), u * sum) - cdf.begin());
                    e = std::int32_t((std::min(r, n_experts - 1) * 37) % n_experts);
                    if (std::find(ids.begin() + std::ptrdiff_t(t) * k, ids.begin() + std::ptrdiff_t(t) * k + j, e)
                        == ids.begin() + std::ptrdiff_t(t) * k + j)
                        break;
                }
            } else {
                const bool hot = k == 1 ? t % 2 == 0 : j == 0;
                e = hot ? 0 : std::int32_t(1 + (t * std::size_t(k) + std::size_t(j)) % (n_experts - 1));
            }
            ids[t * std::size_t(k) + std::size_t(j)] = e;
        }
    }
    return ids;
}

// Routing skew at T = 512 with the same total work (T * k expert rows):
// pattern 0 uniform (token t -> experts (t k + j) mod E: T k / E rows each),
// 1 Zipf (expert of rank r drawn with probability ~ 1 / (r + 1), k distinct
// per token), 2 hot (expert 0 holds half the slots: with k = 1 every other
// token, with k = 2 every token, the other slots uniform over the rest).
// The routing is given (moe::forward with a given_routing), so the times
// are those of dispatch, experts and combine. Args: {pattern, k, threads}.
template <kdial::weight_type W> void bm_skew(benchmark::State& state)
{
    constexpr std::size_t T = 512;
    const int pattern = int(state.range(0)), k = int(state.range(1));
    tbb::task_arena arena(int(state.range(2)));
    kdial::bench::limits lim;
    arena.execute([&] { lim = kdial::bench::machine_limits(); });
    auto& p = pool<W>(1);
    const auto& L = *p[0]->layer;
    kdial::moe_workspace ws(L.shape(T, 8));
    const std::vector<std::int32_t> ids = skew_ids(T, pattern, k);
    std::vector<float> wts(ids.size(), 1.0f / float(k));
    const kdial::given_routing routing { kdial::cmatrix_view<std::int32_t>(ids.data(), T, std::size_t(k)),
        kdial::cmatrix_view<float>(wts.data(), T, std::size_t(k)) };
    std::vector<float> x(T * d_model), out(T * d_model);
    for (std::size_t i = 0; i < x.size(); ++i)
        x[i] = unit(i * 31 + 5);
    const auto run = [&] {
        arena.execute([&] {
            kdial::moe::forward(L, ws, kdial::cmatrix_view<float>(x.data(), T, d_model), routing,
                kdial::matrix_view<float>(out.data(), T, d_model));
        });
    };
    const double secs = time_calls(state, run, out.data());
    const double n = double(state.iterations());
    const double flops = 2.0 * double(T) * k * 3.0 * d_ffn * d_model * n;
    std::int32_t most = 0;
    for (auto c : ws.plan().counts())
        most = std::max(most, c);
    state.counters["ms"] = secs / n * 1e3;
    state.counters["GFLOP/s"] = flops / secs / 1e9;
    state.counters["frac_peak"] = flops / secs / 1e9 / lim.fma_gflops;
    state.counters["max_rows"] = double(most);
    state.SetLabel(std::string(kdial::dtype_name(W::id))
        + (pattern == 0        ? " uniform"
                : pattern == 1 ? " zipf"
                               : " hot"));
}

void skew_args(benchmark::internal::Benchmark* b)
{
    for (int threads : { 1, 2 })
        for (int k : { 1, 2, 8 })
            for (int pattern : { 0, 1, 2 })
                b->Args({ pattern, k, threads });
    b->ArgNames({ "pattern", "k", "threads" });
}

} // namespace

BENCHMARK(bm_dense<kdial::bf16_t>)->Name("dense/bf16")->Apply(dense_args)->MinTime(0.3)->UseRealTime();
BENCHMARK(bm_dense<kdial::f32_t>)->Name("dense/f32")->Apply(dense_args)->MinTime(0.3)->UseRealTime();
BENCHMARK(bm_dense<kdial::q8_t>)->Name("dense/q8")->Apply(dense_args)->MinTime(0.3)->UseRealTime();
BENCHMARK(bm_skew<kdial::bf16_t>)->Name("skew/bf16")->Apply(skew_args)->MinTime(0.3)->UseRealTime();
BENCHMARK(bm_moe<kdial::bf16_t>)->Name("decode/bf16")->Apply(decode_args)->MinTime(0.3)->UseRealTime();
BENCHMARK(bm_moe<kdial::q8_t>)->Name("decode/q8")->Apply(decode_args)->MinTime(0.3)->UseRealTime();
BENCHMARK(bm_moe<kdial::f32_t>)->Name("decode/f32")->Apply(decode_args)->MinTime(0.3)->UseRealTime();
BENCHMARK(bm_moe<kdial::bf16_t>)->Name("prefill/bf16")->Apply(prefill_args)->MinTime(0.3)->UseRealTime();
BENCHMARK(bm_moe<kdial::f32_t>)->Name("prefill/f32")->Apply(prefill_args)->MinTime(0.3)->UseRealTime();
BENCHMARK(bm_moe<kdial::q8_t>)->Name("prefill/q8")->Apply(prefill_args)->MinTime(0.3)->UseRealTime();

BENCHMARK_MAIN();
