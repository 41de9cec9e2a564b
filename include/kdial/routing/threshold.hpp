// Threshold routing (stage 1, route), the token-level baseline MoE-PHDS
// compares global k against: per token, the smallest set of best-ranked
// experts whose routing probability mass reaches p, clamped to
// [k_min, k_max]. p -> 0 keeps k_min experts, p = 1 keeps k_max. A token's
// kept experts and weights are those route() gives it at the kept count
// (see variable_k.hpp); the rest of its row is no_expert. Deterministic,
// parallel over tiles of tokens, no allocation.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "variable_k.hpp"

namespace kdial {

struct threshold_options {
    float p = 0.5f; // probability mass to reach, in [0, 1]
    int k_min = 1; // fewest experts per token
    int k_max = 8; // most experts per token (<= E)
};

namespace detail {
// The one check of threshold options against E experts.
inline void check_threshold(const threshold_options& th, std::size_t E, const char* where)
{
    check(th.p >= 0.0f && th.p <= 1.0f, where, ": threshold p = ", th.p, " outside [0, 1]");
    check(th.k_min >= 1 && th.k_min <= th.k_max && std::size_t(th.k_max) <= E, where, ": k range [", th.k_min, ", ",
        th.k_max, "] must satisfy 1 <= k_min <= k_max <= E = ", E);
}
} // namespace detail

// Routes T tokens by threshold.
//   logits  [T, E]      router logits (finite)
//   ids     [T, kc]     out: kc >= k_max; kept experts by rank, then no_expert
//   weights [T, kc]     out: their weights (renormalised over the kept
//                       experts if opt.renormalize), then 0
//   kept    [T]         out (optional): experts kept per token
// Throws kdial::error (writing nothing) on p outside [0, 1] (or NaN),
// k_min/k_max outside 1 <= k_min <= k_max <= E, shapes, a bad bias or a
// non-finite logit.
inline void route_threshold(cmatrix_view<float> logits, const threshold_options& th, const router_options& opt,
    matrix_view<std::int32_t> ids, matrix_view<float> weights, std::span<int> kept = {},
    executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::route_threshold";
    detail::check_threshold(th, logits.cols, where);
    const token_k rule { th.k_min, th.k_max, th.p };
    detail::route_kept(
        logits, [&](std::size_t) { return rule; }, opt, ids, weights, kept, where, ex);
}

} // namespace kdial
