// Shared helpers for the kdial tests: seeded random data, running a callable
// in an arena with a given thread count, byte comparison.
#pragma once

#include <tbb/task_arena.h>

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

} // namespace kdial::test
