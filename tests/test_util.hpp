// Shared helpers for the kdial tests: seeded random data, running a callable
// in an arena with a given thread count, byte comparison, logits compared
// with a reference's.
#pragma once

#include <tbb/task_arena.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace kdial::test {

inline std::vector<float> random_floats(std::size_t n, std::uint64_t seed, float lo = -1.0f, float hi = 1.0f)
{
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v)
        x = u(rng);
    return v;
}

inline std::vector<float> random_normal(std::size_t n, std::uint64_t seed, float sigma = 1.0f)
{
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> g(0.0f, sigma);
    std::vector<float> v(n);
    for (auto& x : v)
        x = g(rng);
    return v;
}

// Runs f inside a task_arena limited to `threads` threads.
template <class F> void with_threads(int threads, F&& f)
{
    tbb::task_arena arena(threads);
    arena.execute(f);
}

template <class T> bool same_bytes(const std::vector<T>& a, const std::vector<T>& b)
{
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

// Logits [T, V] next to a reference's [T, V]: the largest |difference|, the
// largest |reference logit| and the positions whose argmax (first maximum)
// agrees.
struct logits_gap {
    double worst = 0, scale = 0;
    std::size_t agree = 0;
};
inline logits_gap compare_logits(const std::vector<float>& ref, const std::vector<float>& got, std::size_t T)
{
    logits_gap g;
    const std::size_t V = ref.size() / T;
    for (std::size_t t = 0; t < T; ++t) {
        std::size_t ar = 0, ag = 0;
        for (std::size_t v = 0; v < V; ++v) {
            const float r = ref[t * V + v], x = got[t * V + v];
            g.worst = std::max(g.worst, double(std::fabs(r - x)));
            g.scale = std::max(g.scale, double(std::fabs(r)));
            ar = r > ref[t * V + ar] ? v : ar;
            ag = x > got[t * V + ag] ? v : ag;
        }
        g.agree += ar == ag;
    }
    return g;
}

} // namespace kdial::test
