// This machine's limits, measured in the same run as the benchmarks that
// are reported against them: read bandwidth (a vectorised streaming sum),
// copy bandwidth (memcpy) and fp32 FMA peak, each using every thread of the
// current oneTBB arena. Results are cached per thread count.
#pragma once

#include <kdial/simd/compat.hpp>

#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

namespace kdial::bench {

struct limits {
    double read_gbs = 0; // GB/s (1e9 bytes) streamed by a reading kernel
    double copy_gbs = 0; // GB/s of memcpy, counting bytes read + written
    double fma_gflops = 0; // GFLOP/s (2 flops per FMA) in fp32
};

namespace detail {

inline double seconds_since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Best of `reps` runs of f(), in seconds.
template <class F> double best_time(int reps, F&& f)
{
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
        auto t0 = std::chrono::steady_clock::now();
        f();
        best = std::min(best, seconds_since(t0));
    }
    return best;
}

inline float stream_sum(const float* p, std::size_t n)
{
    using B = xsimd::batch<float>;
    constexpr std::size_t W = B::size;
    B a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    std::size_t i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
        a0 += B::load_aligned(p + i);
        a1 += B::load_aligned(p + i + W);
        a2 += B::load_aligned(p + i + 2 * W);
        a3 += B::load_aligned(p + i + 3 * W);
    }
    return kdial::simd::hsum((a0 + a1) + (a2 + a3));
}

inline limits measure()
{
    limits lim;
    const int threads = tbb::this_task_arena::max_concurrency();
    const std::size_t bytes = std::size_t { 768 } << 20; // beyond the last-level cache
    const std::size_t n = bytes / sizeof(float);
    const std::size_t chunks = 256;
    const std::size_t per = n / chunks;
    struct freer {
        void operator()(float* p) const { std::free(p); }
    };
    std::unique_ptr<float, freer> a(static_cast<float*>(std::aligned_alloc(64, bytes)));
    std::unique_ptr<float, freer> b(static_cast<float*>(std::aligned_alloc(64, bytes)));
    tbb::parallel_for(std::size_t { 0 }, chunks, [&](std::size_t c) {
        std::fill(a.get() + c * per, a.get() + (c + 1) * per, 1.0f);
        std::fill(b.get() + c * per, b.get() + (c + 1) * per, 0.0f);
    });
    std::vector<float> sink(chunks);
    double t = best_time(5, [&] {
        tbb::parallel_for(
            std::size_t { 0 }, chunks, [&](std::size_t c) { sink[c] = stream_sum(a.get() + c * per, per); });
    });
    lim.read_gbs = double(chunks * per * sizeof(float)) / t / 1e9;
    t = best_time(5, [&] {
        tbb::parallel_for(std::size_t { 0 }, chunks,
            [&](std::size_t c) { std::memcpy(b.get() + c * per, a.get() + c * per, per * sizeof(float)); });
    });
    lim.copy_gbs = 2.0 * double(chunks * per * sizeof(float)) / t / 1e9;

    // FMA peak: 12 independent accumulator chains per thread, in registers.
    const std::size_t iters = 20'000'000;
    std::vector<float> out(static_cast<std::size_t>(threads) * 64);
    t = best_time(3, [&] {
        tbb::parallel_for(0, threads, [&](int th) {
            using B = xsimd::batch<float>;
            B acc[12];
            for (int j = 0; j < 12; ++j)
                acc[j] = B(float(j + th));
            const B m(0.999999f), c(1e-7f);
            for (std::size_t i = 0; i < iters; ++i) {
                for (int j = 0; j < 12; ++j)
                    acc[j] = xsimd::fma(acc[j], m, c);
                asm volatile("" ::: "memory");
            }
            B s = acc[0];
            for (int j = 1; j < 12; ++j)
                s += acc[j];
            out[std::size_t(th) * 64] = kdial::simd::hsum(s);
        });
    });
    lim.fma_gflops = double(threads) * iters * 12 * xsimd::batch<float>::size * 2 / t / 1e9;
    return lim;
}

} // namespace detail

// The limits for the current arena's thread count (measured once).
inline const limits& machine_limits()
{
    static std::map<int, limits> cache;
    const int threads = tbb::this_task_arena::max_concurrency();
    auto it = cache.find(threads);
    if (it == cache.end())
        it = cache.emplace(threads, detail::measure()).first;
    return it->second;
}

} // namespace kdial::bench
