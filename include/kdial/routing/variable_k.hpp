// Routing with a k per token (stage 1, route): per-request k inside one
// batch, and the general per-token rule that threshold routing
// (threshold.hpp) is built on. Every token is ranked once with the largest
// k any token may need; the token keeps a prefix of its ranking and the rest
// of its row becomes kdial::no_expert with weight 0 (dispatch gives those no
// slot, so they cost nothing). The ranking is a total order (score
// descending, then lower id), so the kept prefix is exactly what route()
// chooses at that k, and the kept weights are renormalised over the kept
// experts only through the same code as route() (detail::finish_weights):
// a token gets the ids and bit-identical weights it gets routed alone.
// Deterministic (each token alone, fixed order), parallel over tiles of
// tokens, no allocation.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

#include "../core/error.hpp"
#include "../core/extent.hpp"
#include "../core/views.hpp"
#include "../dispatch/plan.hpp"
#include "../parallel/for_each.hpp"
#include "router.hpp"

namespace kdial {

// One token's rule: keep the smallest n in [k_min, k_max] whose top-n
// routing mass reaches p. k_min == k_max is a plain per-token k (p unused).
//   mass(n) = sum of the n best scores / sum of all E scores (1 for softmax),
//             accumulated in double in rank order;
//   p <= 0 keeps k_min; p >= 1 keeps k_max (the whole distribution, whatever
//   the rounding of the sums).
struct token_k {
    int k_min = 1;
    int k_max = 1;
    float p = 1.0f;
};

namespace detail {

// How many of a token's ranked experts its rule keeps.
inline int kept_count(const float* scores, int E, const std::int32_t* ranked, const token_k& r) noexcept
{
    if (r.k_min >= r.k_max || !(r.p > 0.0f))
        return r.k_min;
    if (r.p >= 1.0f)
        return r.k_max;
    double total = 0.0;
    for (int e = 0; e < E; ++e)
        total += double(scores[e]);
    const double target = double(r.p) * total;
    double cum = 0.0;
    for (int n = 1; n <= r.k_max; ++n) {
        cum += double(scores[ranked[n - 1]]);
        if (n >= r.k_min && cum >= target)
            return n;
    }
    return r.k_max;
}

// Routes tokens [t0, t1): rank the best `kc` experts, keep rule_of(t)'s
// prefix, drop the rest of the ids/weights row (which has >= kc columns).
template <class RuleOf>
void route_rows_kept(cmatrix_view<float> logits, int kc, const router_options& opt, RuleOf rule_of,
    matrix_view<std::int32_t> ids, matrix_view<float> weights, std::span<int> kept, std::size_t t0,
    std::size_t t1) noexcept
{
    const int E = static_cast<int>(logits.cols);
    const int cols = static_cast<int>(ids.cols);
    float scores[max_experts];
    float keys[max_experts];
    float sel[max_experts];
    for (std::size_t t = t0; t < t1; ++t) {
        std::int32_t* id = ids.row(t);
        float* w = weights.row(t);
        score_and_select(logits.row(t), E, dynamic_k { kc }, opt, scores, keys, id, sel);
        const int n = kept_count(scores, E, id, rule_of(t));
        for (int j = 0; j < n; ++j)
            w[j] = scores[id[j]];
        finish_weights(w, n, opt);
        for (int j = n; j < cols; ++j) {
            id[j] = no_expert;
            w[j] = 0.0f;
        }
        if (!kept.empty())
            kept[t] = n;
    }
}

// The one check of a token's rule (a per-token k, a threshold rule).
inline void check_rule(const token_k& r, std::size_t E, std::size_t t, const char* where)
{
    check(r.k_min >= 1 && r.k_min <= r.k_max && std::size_t(r.k_max) <= E, where, ": token ", t, " asks for k in [",
        r.k_min, ", ", r.k_max, "], which must satisfy 1 <= k_min <= k_max <= E = ", E);
    check(r.k_min == r.k_max || (r.p >= 0.0f && r.p <= 1.0f), where, ": token ", t, ": threshold p = ", r.p,
        " outside [0, 1]");
}

// Validates every token's rule; returns the largest k_max (the routing's
// column count).
template <class RuleOf> int check_rules(std::size_t T, std::size_t E, RuleOf rule_of, const char* where)
{
    int kc = 1;
    for (std::size_t t = 0; t < T; ++t) {
        const token_k r = rule_of(t);
        check_rule(r, E, t, where);
        kc = r.k_max > kc ? r.k_max : kc;
    }
    return kc;
}

// Validation shared by the front ends; returns the largest k_max.
template <class RuleOf>
int check_token_rules(cmatrix_view<float> logits, std::size_t T, RuleOf rule_of, const router_options& opt,
    cmatrix_view<std::int32_t> ids_shape, cmatrix_view<float> w_shape, std::span<int> kept, const char* where)
{
    const std::size_t E = logits.cols;
    check(E >= 1 && E <= std::size_t(max_experts), where, ": expert count E = ", E, " outside [1, ", max_experts, "]");
    check_shape(logits, T, E, where, "logits");
    const int kc = check_rules(T, E, rule_of, where);
    check(ids_shape.cols >= std::size_t(kc), where, ": ids has ", ids_shape.cols, " columns, the largest k is ", kc);
    check_shape(ids_shape, T, ids_shape.cols, where, "ids");
    check_shape(w_shape, T, ids_shape.cols, where, "weights");
    check(kept.empty() || kept.size() == T, where, ": kept has ", kept.size(), " entries, expected T = ", T);
    check_router_options(opt, E, where);
    check_logits_finite(logits, where);
    return kc;
}

// Routes every token by its rule, inputs already validated; kc is the
// largest k_max.
template <class RuleOf>
void route_kept_unchecked(cmatrix_view<float> logits, int kc, RuleOf rule_of, const router_options& opt,
    matrix_view<std::int32_t> ids, matrix_view<float> weights, std::span<int> kept, executor_ref ex)
{
    const std::size_t tile = parallel::tile_items(logits.cols * 16);
    parallel::for_each_tile(ex, logits.rows, tile,
        [&](std::size_t t0, std::size_t t1) { route_rows_kept(logits, kc, opt, rule_of, ids, weights, kept, t0, t1); });
}

template <class RuleOf>
void route_kept(cmatrix_view<float> logits, RuleOf rule_of, const router_options& opt, matrix_view<std::int32_t> ids,
    matrix_view<float> weights, std::span<int> kept, const char* where, executor_ref ex)
{
    const int kc = check_token_rules(
        logits, logits.rows, rule_of, opt, cmatrix_view<std::int32_t>(ids), cmatrix_view<float>(weights), kept, where);
    route_kept_unchecked(logits, kc, rule_of, opt, ids, weights, kept, ex);
}

} // namespace detail

// Routes T tokens, token t with its own k[t].
//   logits  [T, E]   router logits (finite)
//   k       [T]      experts per token, each in [1, E]
//   ids     [T, kc]  out: kc >= max k; row t: its k[t] best experts (as
//                    route() at k[t]), then no_expert
//   weights [T, kc]  out: their weights (renormalised over the k[t] kept if
//                    opt.renormalize), then 0
// Throws kdial::error (writing nothing) on a k outside [1, E], shapes, a bad
// bias or a non-finite logit.
inline void route_variable_k(cmatrix_view<float> logits, std::span<const int> k, const router_options& opt,
    matrix_view<std::int32_t> ids, matrix_view<float> weights, executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::route_variable_k";
    detail::check(k.size() == logits.rows, where, ": ", k.size(), " k values for T = ", logits.rows, " tokens");
    detail::route_kept(
        logits,
        [&](std::size_t t) {
            return token_k { k[t], k[t], 1.0f };
        },
        opt, ids, weights, {}, where, ex);
}

// Routes T tokens, token t by its own rule (a k, or a threshold in a range).
//   rules   [T]      per-token rules (see token_k)
//   ids     [T, kc]  out: kc >= the largest k_max; kept prefix, then no_expert
//   weights [T, kc]  out
//   kept    [T]      out (optional): how many experts each token kept
inline void route_token_k(cmatrix_view<float> logits, std::span<const token_k> rules, const router_options& opt,
    matrix_view<std::int32_t> ids, matrix_view<float> weights, std::span<int> kept = {},
    executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::route_token_k";
    detail::check(rules.size() == logits.rows, where, ": ", rules.size(), " rules for T = ", logits.rows, " tokens");
    detail::route_kept(
        logits, [&](std::size_t t) { return rules[t]; }, opt, ids, weights, kept, where, ex);
}

} // namespace kdial
