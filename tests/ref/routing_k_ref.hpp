// Plain references for per-token k and threshold routing: a token keeps n
// experts and gets exactly what the reference router gives it at k = n
// (ref::route on its row), the rest of its row is no_expert / 0. The kept
// count of a threshold rule comes from a std::stable_sort of the scores and
// a double cumulative sum.
#pragma once

#include <kdial/routing/variable_k.hpp>

#include "routing_ref.hpp"

#include <algorithm>
#include <numeric>
#include <vector>

namespace kdial::ref {

// Kept count of one token under rule r.
inline int kept_count(const float* logits_row, int E, const token_k& r, const router_options& opt)
{
    if (r.k_min == r.k_max || r.p <= 0.0f)
        return r.k_min;
    if (r.p >= 1.0f)
        return r.k_max;
    const auto [s, order] = rank(logits_row, E, opt);
    double total = 0, cum = 0;
    for (float v : s)
        total += v;
    for (int n = 1; n <= r.k_max; ++n) {
        cum += s[order[n - 1]];
        if (n >= r.k_min && cum >= double(r.p) * total)
            return n;
    }
    return r.k_max;
}

// ids / weights [T, kc] and the kept counts [T] for per-token rules.
inline routing route_token_k(const std::vector<float>& logits, std::size_t T, int E, const std::vector<token_k>& rules,
    int kc, const router_options& opt, std::vector<int>* kept = nullptr)
{
    routing r;
    r.ids.assign(T * std::size_t(kc), no_expert);
    r.weights.assign(T * std::size_t(kc), 0.0f);
    if (kept)
        kept->assign(T, 0);
    for (std::size_t t = 0; t < T; ++t) {
        const int n = kept_count(logits.data() + t * E, E, rules[t], opt);
        const std::vector<float> row(
            logits.begin() + std::ptrdiff_t(t * E), logits.begin() + std::ptrdiff_t((t + 1) * E));
        const auto one = route(row, 1, E, n, opt);
        for (int j = 0; j < n; ++j) {
            r.ids[t * kc + j] = one.ids[j];
            r.weights[t * kc + j] = one.weights[j];
        }
        if (kept)
            (*kept)[t] = n;
    }
    return r;
}

} // namespace kdial::ref
