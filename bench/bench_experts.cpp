// One expert's SwiGLU FFN (stage 3), single thread: d = 2048, F = 1024,
// n rows in {1, 2, 4, 8, 16, 32, 64, 128, 512}, weights in f32 / bf16 / f16 / q8 (GGUF Q8_0) /
// q4_0 (GGUF Q4_0) / q4_k (GGUF Q4_K, in place); decode (n = 1) also on the
// AVX2 + FMA path (xsimd fma3<avx2>) where the CPU has it, so the AVX2-only
// machines' regime is timed on any x86 machine. int8 activations
// (kernels/qdot.hpp, activations quantised once per call, as moe::run_experts
// does) at every row count for q8 and q4_0 (decode for q4_k), on the native
// integer-dot path and on the AVX-VNNI and plain AVX2 ones.
// Formulas (stated once):
//   weight bytes = 3 * F * d * bytes_per_weight   (f32 4, bf16 f16 2, q8 34/32,
//                                                  q4_0 18/32, q4_k 144/256)
//   flops        = 2 * n * 3 * F * d
// Counters: GB/s of weight bytes, GFLOP/s, and both as fractions of the
// single-thread limits from bench/roofline.hpp measured in this run.
// Decode streams cold weights: each iteration uses the next expert of a pool
// larger than the last-level cache (about 1 GiB; see pool_bytes).
// KDIAL_BENCH_HUGEPAGE=1 puts the pool on 2 MiB pages (huge_pages).
#include <benchmark/benchmark.h>

#include <kdial/experts/swiglu.hpp>
#include <kdial/kernels/qdot.hpp>

#include "roofline.hpp"

#include <tbb/task_arena.h>

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <memory>
#include <new>
#include <vector>

namespace {

constexpr std::size_t d_model = 2048, d_ffn = 1024;
// About 1 GiB; KDIAL_BENCH_POOL_MB=m sets m MiB instead (small: the weights
// stay in cache, which times the kernels' compute alone).
std::size_t pool_bytes()
{
    const char* e = std::getenv("KDIAL_BENCH_POOL_MB");
    return (e && std::atol(e) > 0 ? std::size_t(std::atol(e)) : std::size_t { 1024 }) << 20;
}

std::uint32_t next(std::uint64_t& s)
{
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<std::uint32_t>(s >> 33);
}
float uniform(std::uint64_t& s)
{
    return float(next(s)) * (2.0f / 2147483648.0f) - 1.0f;
} // [-1, 1)

template <kdial::weight_type W> void fill(typename W::storage* p, std::size_t count, std::uint64_t& s)
{
    for (std::size_t i = 0; i < count; ++i) {
        if constexpr (std::is_same_v<W, kdial::f32_t>) {
            p[i] = 0.05f * uniform(s);
        } else if constexpr (std::is_same_v<W, kdial::bf16_t>) {
            p[i] = kdial::bf16::from_float(0.05f * uniform(s));
        } else if constexpr (std::is_same_v<W, kdial::f16_t>) {
            p[i] = kdial::f16::from_float(0.05f * uniform(s));
        } else if constexpr (std::is_same_v<W, kdial::q8_t>) {
            p[i].set_scale(kdial::f16::from_float(0.05f / 127.0f));
            for (auto& q : p[i].q)
                q = static_cast<std::int8_t>(int(next(s) % 255) - 127);
        } else {
            // Random quants; f16 scales of about 0.05 / 8 (q4_0: d; q4_k:
            // d and dmin, with random 6-bit sub-block scales).
            auto* b = reinterpret_cast<std::uint8_t*>(p + i);
            for (std::size_t j = 0; j < sizeof(p[i]); ++j)
                b[j] = static_cast<std::uint8_t>(next(s));
            const kdial::f16 d = kdial::f16::from_float(0.05f / 8.0f / (std::is_same_v<W, kdial::q4_k_t> ? 32 : 1));
            for (int j = 0; j < (std::is_same_v<W, kdial::q4_k_t> ? 4 : 2); j += 2) {
                b[j] = static_cast<std::uint8_t>(d.bits & 0xff);
                b[j + 1] = static_cast<std::uint8_t>(d.bits >> 8);
            }
        }
    }
}

// A pool of experts that together exceed the caches; one dtype at a time.
struct pool_base {
    virtual ~pool_base() = default;
};
// The pool's first weight sits this many bytes past a 64-byte boundary:
// KDIAL_BENCH_WEIGHT_OFFSET=b (rounded down to the storage's alignment; 0
// by default). Tensors in a safetensors file start at any multiple of 8
// bytes, and a vector load from a misaligned row spans two cache lines.
std::size_t weight_offset()
{
    const char* e = std::getenv("KDIAL_BENCH_WEIGHT_OFFSET");
    return e ? std::size_t(std::atol(e)) % 64 : 0;
}

// KDIAL_BENCH_HUGEPAGE=1: the pool is anonymous memory with
// madvise(MADV_HUGEPAGE) (2 MiB pages where transparent huge pages are on
// for madvise), as olmoe's weight_arena; by default 4 KiB pages, as weights
// in a std::vector or a mapped file get.
bool huge_pages()
{
    const char* e = std::getenv("KDIAL_BENCH_HUGEPAGE");
    return e && std::atoi(e) != 0;
}

// Anonymous pages for the pool (unmapped on destruction).
struct pool_memory {
    std::byte* p = nullptr;
    std::size_t size = 0;
    pool_memory() = default;
    void map(std::size_t n)
    {
        size = n;
        void* m = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED)
            throw std::bad_alloc();
        if (huge_pages())
            ::madvise(m, n, MADV_HUGEPAGE); // before the first write: advice only
        p = static_cast<std::byte*>(m);
    }
    pool_memory(const pool_memory&) = delete;
    pool_memory& operator=(const pool_memory&) = delete;
    ~pool_memory()
    {
        if (p)
            ::munmap(p, size);
    }
};

template <kdial::weight_type W> struct expert_pool : pool_base {
    using S = typename W::storage;
    pool_memory bytes;
    std::vector<kdial::expert_weights<W>> experts;

    expert_pool()
    {
        const std::size_t per_row_gu = kdial::storage_cols<W>(d_model), per_row_d = kdial::storage_cols<W>(d_ffn);
        const std::size_t per_expert = 2 * d_ffn * per_row_gu + d_model * per_row_d;
        const std::size_t count = std::max<std::size_t>(2, pool_bytes() / (per_expert * sizeof(S)) + 1);
        bytes.map(count * per_expert * sizeof(S) + 128);
        const std::size_t off = weight_offset() / alignof(S) * alignof(S);
        S* store = reinterpret_cast<S*>(bytes.p + off);
        std::uint64_t s = 42;
        fill<W>(store, count * per_expert, s);
        for (std::size_t e = 0; e < count; ++e) {
            const S* base = store + e * per_expert;
            kdial::expert_weights<W> ew { { base, d_ffn, d_model }, { base + d_ffn * per_row_gu, d_ffn, d_model },
                { base + 2 * d_ffn * per_row_gu, d_model, d_ffn } };
            kdial::check_expert_weights(ew, d_model, d_ffn, "bench");
            experts.push_back(ew);
        }
    }
};

std::unique_ptr<pool_base> current_pool;

template <kdial::weight_type W> expert_pool<W>& pool()
{
    if (auto* p = dynamic_cast<expert_pool<W>*>(current_pool.get()))
        return *p;
    current_pool.reset(); // free the previous dtype's gigabyte first
    auto p = std::make_unique<expert_pool<W>>();
    auto& ref = *p;
    current_pool = std::move(p);
    return ref;
}

const kdial::bench::limits& single_thread_limits()
{
    static const kdial::bench::limits lim = [] {
        tbb::task_arena arena(1);
        kdial::bench::limits l;
        arena.execute([&] { l = kdial::bench::machine_limits(); });
        return l;
    }();
    return lim;
}

// Act: -1 exact (f32 activations, the path linear() picks for n), -2 / -3
// exact on the small-row path / the packed GEMM whatever n (the two sides
// of small_max_rows_of, kernels/linear.hpp), else the kdial::qdot_isa of
// the int8 path (activations quantised per block of 32, integer dots;
// kernels/qdot.hpp), as swiglu_expert with act_mode::int8 runs it.
constexpr int exact_rows = -2, exact_gemm = -3;
template <kdial::weight_type W, class Arch = xsimd::default_arch, int Act = -1> void bm_expert(benchmark::State& state)
{
    const std::size_t n = static_cast<std::size_t>(state.range(0));
    const kdial::bench::limits& lim = single_thread_limits();
    auto& p = pool<W>();
    // X, H and Y 64-byte aligned, as moe_workspace lays them out (from a
    // misaligned X every vector load spans two cache lines: up to 2x slower
    // on the small-row path).
    std::vector<std::byte> xmem(n * (2 * d_model + d_ffn) * sizeof(float) + 64);
    float* x = reinterpret_cast<float*>(kdial::detail::align_up(xmem.data(), 64));
    float *h = x + n * d_model, *y = h + n * d_ffn;
    std::uint64_t s = 7;
    for (std::size_t i = 0; i < n * d_model; ++i)
        x[i] = uniform(s);
    const kdial::cmatrix_view<float> xv(x, n, d_model);
    const kdial::matrix_view<float> hv(h, n, d_ffn), yv(y, n, d_model);
    std::size_t e = 0;
    // int8 path: the quantised rows of x and h (caller workspace).
    std::vector<std::byte> qmem(kdial::act_q8_bytes(n, d_model) + kdial::act_q8_bytes(n, d_ffn) + 128);
    std::byte* qa = kdial::detail::align_up(qmem.data(), 64);
    const kdial::act_q8_view qx = kdial::bind_act_q8(qa, n, d_model);
    const kdial::act_q8_view qh = kdial::bind_act_q8(qa + kdial::act_q8_bytes(n, d_model), n, d_ffn);
    const auto t0 = std::chrono::steady_clock::now();
    for (auto _ : state) {
        if constexpr (Act == -1) {
            kdial::swiglu_expert<W, Arch>(p.experts[e], xv, hv, yv);
        } else if constexpr (Act == exact_rows) {
            const auto& ew = p.experts[e];
            kdial::detail::gate_up_rows<Arch, W>(ew.gate, ew.up, xv, 0, d_ffn, hv);
            kdial::detail::linear_rows<Arch, W>(ew.down, kdial::cmatrix_view<float>(hv), 0, d_model, yv);
        } else if constexpr (Act == exact_gemm) {
            const auto& ew = p.experts[e];
            kdial::detail::gate_up_gemm<Arch, W>(ew.gate, ew.up, xv, 0, d_ffn, hv);
            kdial::detail::linear_gemm<Arch, W>(ew.down, kdial::cmatrix_view<float>(hv), 0, d_model, yv);
        } else {
            constexpr auto I = static_cast<kdial::qdot_isa>(Act);
            const auto& ew = p.experts[e];
            kdial::quantize_act_q8(xv, qx);
            kdial::swiglu_gate_up_q8act<W, Arch, I>(ew.gate, ew.up, qx, 0, d_ffn, hv);
            kdial::quantize_act_q8(kdial::cmatrix_view<float>(hv), qh);
            kdial::linear_q8act<W, Arch, I>(ew.down, qh, 0, d_model, yv);
        }
        benchmark::DoNotOptimize(y);
        benchmark::ClobberMemory();
        e = e + 1 == p.experts.size() ? 0 : e + 1;
    }
    const double bytes = double(p.experts[0].gate.bytes() + p.experts[0].up.bytes() + p.experts[0].down.bytes());
    const double flops = 2.0 * double(n) * 3.0 * double(d_ffn) * double(d_model);
    // Wall time of the timed loop (one thread, so it equals the CPU time).
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double iters = double(state.iterations());
    const double gbs = bytes * iters / secs / 1e9, gflops = flops * iters / secs / 1e9;
    state.counters["GBps"] = gbs;
    state.counters["GFLOPps"] = gflops;
    const double bw_frac = gbs / lim.read_gbs, fma_frac = gflops / lim.fma_gflops;
    state.counters["bw_frac"] = bw_frac; // of the in-run read bandwidth
    state.counters["fma_frac"] = fma_frac; // of the in-run FMA peak
    // Of the roofline: the weights read once at the read bandwidth, the FLOPs
    // at the peak, whichever takes longer, over the time taken.
    state.counters["roof_frac"] = std::max(bw_frac, fma_frac);
    static constexpr const char* isa_names[]
        = { "generic", "avx2", "avx_vnni", "avx512bw", "avx512_vnni", "neon", "neon_dot" };
    state.SetLabel(std::string(kdial::dtype_name(W::id)) + " " + Arch::name()
        + (Act == exact_rows        ? std::string(" exact small-row")
                : Act == exact_gemm ? std::string(" exact gemm")
                : Act < 0           ? std::string(" exact")
                                    : std::string(" int8-act ") + isa_names[Act < 0 ? 0 : Act])
        + " read " + std::to_string(lim.read_gbs).substr(0, 5) + " GB/s, fma "
        + std::to_string(lim.fma_gflops).substr(0, 6) + " GFLOP/s (1 thread)"
        + (weight_offset() ? " weights +" + std::to_string(weight_offset()) + " B" : ""));
}

} // namespace

// n rows (rows per expert) in {1, 2, 4, ..., 128, 512}: the GEMV, small-row
// and packed-GEMM regimes; milliseconds, at least 0.3 s per case.
static void expert_args(benchmark::internal::Benchmark* b)
{
    for (int n : { 1, 2, 4, 8, 16, 32, 64, 128, 512 })
        b->Arg(n);
    b->Unit(benchmark::kMillisecond)->MinTime(0.3);
}
BENCHMARK_TEMPLATE(bm_expert, kdial::f32_t)->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::bf16_t)->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::f16_t)->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q8_t)->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_0_t)->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_k_t)->Apply(expert_args);

// Both exact paths at the row counts around small_max_rows_of ("exact
// small-row" vs "exact gemm" in the label): the measurement that sets each
// type's bound.
static void bound_args(benchmark::internal::Benchmark* b)
{
    for (int n : { 8, 12, 16, 20, 24, 32 })
        b->Arg(n);
    b->Unit(benchmark::kMillisecond)->MinTime(0.3);
}
#define KDIAL_BENCH_BOUND(W, A)                                                                                        \
    BENCHMARK_TEMPLATE(bm_expert, W, A, exact_rows)->Apply(bound_args);                                                \
    BENCHMARK_TEMPLATE(bm_expert, W, A, exact_gemm)->Apply(bound_args);
KDIAL_BENCH_BOUND(kdial::f32_t, xsimd::default_arch)
KDIAL_BENCH_BOUND(kdial::bf16_t, xsimd::default_arch)
KDIAL_BENCH_BOUND(kdial::f16_t, xsimd::default_arch)
KDIAL_BENCH_BOUND(kdial::q8_t, xsimd::default_arch)
KDIAL_BENCH_BOUND(kdial::q4_0_t, xsimd::default_arch)
KDIAL_BENCH_BOUND(kdial::q4_k_t, xsimd::default_arch)

#if (defined(__x86_64__) || defined(__i386__)) && XSIMD_WITH_AVX2 && XSIMD_WITH_FMA3_AVX2
// The AVX2 + FMA path (built when the compiler targets AVX2; the native arch
// above may be AVX-512): every row count for f32, bf16 and q8, decode for
// the 4-bit formats.
static void avx2_args(benchmark::internal::Benchmark* b)
{
    b->Arg(1)->Unit(benchmark::kMillisecond)->MinTime(0.3);
}
using avx2_fma = xsimd::fma3<xsimd::avx2>;
BENCHMARK_TEMPLATE(bm_expert, kdial::f32_t, avx2_fma)->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::bf16_t, avx2_fma)->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q8_t, avx2_fma)->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_0_t, avx2_fma)->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_k_t, avx2_fma)->Apply(avx2_args);
KDIAL_BENCH_BOUND(kdial::f32_t, avx2_fma)
KDIAL_BENCH_BOUND(kdial::bf16_t, avx2_fma)
KDIAL_BENCH_BOUND(kdial::f16_t, avx2_fma)
KDIAL_BENCH_BOUND(kdial::q8_t, avx2_fma)

// int8 activations (kernels/qdot.hpp), every row count for q8 and q4_0:
// the AVX-512 VNNI, AVX-VNNI and plain AVX2 (vpmaddubsw, the Zen 3 regime)
// paths where built.
constexpr int isa_int(kdial::qdot_isa i)
{
    return static_cast<int>(i);
}
#if KDIAL_QDOT_AVX512_VNNI
BENCHMARK_TEMPLATE(bm_expert, kdial::q8_t, xsimd::default_arch, isa_int(kdial::qdot_isa::avx512_vnni))
    ->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_0_t, xsimd::default_arch, isa_int(kdial::qdot_isa::avx512_vnni))
    ->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_k_t, xsimd::default_arch, isa_int(kdial::qdot_isa::avx512_vnni))
    ->Apply(avx2_args);
#endif
#if KDIAL_QDOT_AVX_VNNI
BENCHMARK_TEMPLATE(bm_expert, kdial::q8_t, avx2_fma, isa_int(kdial::qdot_isa::avx_vnni))->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_0_t, avx2_fma, isa_int(kdial::qdot_isa::avx_vnni))->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_k_t, avx2_fma, isa_int(kdial::qdot_isa::avx_vnni))->Apply(avx2_args);
#endif
BENCHMARK_TEMPLATE(bm_expert, kdial::q8_t, avx2_fma, isa_int(kdial::qdot_isa::avx2))->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_0_t, avx2_fma, isa_int(kdial::qdot_isa::avx2))->Apply(expert_args);
BENCHMARK_TEMPLATE(bm_expert, kdial::q4_k_t, avx2_fma, isa_int(kdial::qdot_isa::avx2))->Apply(avx2_args);
#endif
