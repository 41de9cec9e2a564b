// Running a loaded model: chunked prefill, greedy generation and the bench
// measurements, shared by the olmoe command-line subcommands.
#pragma once

#include "model.hpp"
#include "weights.hpp"

#include <algorithm>
#include <chrono>
#include <span>
#include <vector>

namespace olmoe {

// Tokens a forward call may take for the k values in `ks` (the MoE
// workspace holds max_chunk * k_budget slots).
inline std::size_t chunk_for(const model& m, std::span<const int> ks)
{
    const int kmax = *std::max_element(ks.begin(), ks.end());
    std::size_t c = m.max_chunk();
    while (c > 1 && m.max_k(c) < std::min(kmax, m.config().experts))
        c /= 2;
    return std::max<std::size_t>(1, c);
}

// Feeds tokens after the cache's contents in chunks. If all_logits, logits
// is [T, V] (every position), else [1, V] (the last position).
inline void prefill(model& m, std::span<const std::int32_t> tokens, kv_cache& cache, std::span<const int> ks,
    kdial::matrix_view<float> logits, bool all_logits)
{
    const std::size_t chunk = chunk_for(m, ks);
    for (std::size_t t0 = 0; t0 < tokens.size(); t0 += chunk) {
        const std::size_t n = std::min(chunk, tokens.size() - t0);
        // Without all_logits every chunk overwrites the one row; the last
        // chunk's is the one that stays.
        m.forward(tokens.subspan(t0, n), cache, ks, all_logits ? logits.sub_rows(t0, n) : logits, all_logits);
    }
}

inline std::int32_t argmax(std::span<const float> v)
{
    return std::int32_t(std::max_element(v.begin(), v.end()) - v.begin());
}

inline double seconds_since(std::chrono::steady_clock::time_point t0)
{
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

} // namespace olmoe
