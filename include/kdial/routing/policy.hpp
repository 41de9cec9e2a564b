// Routing policies (stage 1, route) as values, for the MoE layer's one
// forward: how many experts each token keeps.
//   fixed_k<N>, dynamic_k   one k for every token (core/extent.hpp)
//   per_token_k             a k per token (per-request k in one batch)
//   threshold_options       per token, the fewest experts reaching mass p,
//                           in [k_min, k_max] (threshold.hpp)
//   per_token_rules         a token_k rule per token (mixes the two above)
//   given_routing           ids and weights the caller computed
// detail::check_policy is the one place a policy is validated (k in [1, E],
// rules, shapes, ids); detail::route_policy routes validated logits by it.
// Both allocate nothing.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

#include "../core/error.hpp"
#include "../core/extent.hpp"
#include "../core/views.hpp"
#include "../dispatch/plan.hpp"
#include "router.hpp"
#include "threshold.hpp"
#include "variable_k.hpp"

namespace kdial {

// Token t keeps k[t] experts.  k [T], each in [1, E].
struct per_token_k {
    std::span<const int> k;
};

// Token t is routed by rules[t] (a k, or a threshold in a k range).  rules [T].
struct per_token_rules {
    std::span<const token_k> rules;
};

// A routing computed by the caller: ids [T, kc] in [0, E) or no_expert,
// weights [T, kc]. The router is not run.
struct given_routing {
    cmatrix_view<std::int32_t> ids;
    cmatrix_view<float> weights;
};

template <class P>
concept routing_policy = k_extent<P> || std::same_as<P, per_token_k> || std::same_as<P,
    per_token_rules> || std::same_as<P, threshold_options> || std::same_as<P, given_routing>;

namespace detail {

// Validates policy p for T tokens and E experts; returns the routing's
// column count kc (k, the largest k_max, or the given routing's columns).
template <routing_policy P> int check_policy(const P& p, std::size_t T, std::size_t E, const char* where)
{
    if constexpr (k_extent<P>) {
        check_k(p, int(E), where);
        return p.value();
    } else if constexpr (std::same_as<P, per_token_k>) {
        check(p.k.size() == T, where, ": ", p.k.size(), " k values for T = ", T, " tokens");
        return check_rules(
            T, E,
            [&](std::size_t t) {
                return token_k { p.k[t], p.k[t], 1.0f };
            },
            where);
    } else if constexpr (std::same_as<P, per_token_rules>) {
        check(p.rules.size() == T, where, ": ", p.rules.size(), " rules for T = ", T, " tokens");
        return check_rules(
            T, E, [&](std::size_t t) { return p.rules[t]; }, where);
    } else if constexpr (std::same_as<P, threshold_options>) {
        check_threshold(p, E, where);
        return p.k_max;
    } else {
        const std::size_t kc = p.ids.cols;
        check(kc >= 1, where, ": given routing has no columns");
        check_shape(p.ids, T, kc, where, "ids");
        check_shape(p.weights, T, kc, where, "weights");
        for (std::size_t t = 0; t < T; ++t)
            for (std::size_t j = 0; j < kc; ++j) {
                const std::int32_t e = p.ids(t, j);
                check(e == no_expert || (e >= 0 && std::size_t(e) < E), where, ": ids[", t, ", ", j, "] = ", e,
                    " is not an expert in [0, ", E, ") nor no_expert (-1)");
            }
        return int(kc);
    }
}

// Routes validated logits [T, E] by policy p (checked by check_policy, kc
// its result) into ids / weights [T, kc] and kept [T] (experts per token).
// For given_routing, logits are not read and the routing is copied.
template <routing_policy P>
void route_policy(cmatrix_view<float> logits, const P& p, int kc, const router_options& opt,
    matrix_view<std::int32_t> ids, matrix_view<float> weights, std::span<int> kept, executor_ref ex)
{
    const std::size_t T = ids.rows;
    if constexpr (k_extent<P>) {
        route_unchecked(logits, p, opt, ids, weights, ex);
        for (std::size_t t = 0; t < T; ++t)
            kept[t] = kc;
    } else if constexpr (std::same_as<P, per_token_k>) {
        route_kept_unchecked(
            logits, kc,
            [&](std::size_t t) {
                return token_k { p.k[t], p.k[t], 1.0f };
            },
            opt, ids, weights, kept, ex);
    } else if constexpr (std::same_as<P, per_token_rules>) {
        route_kept_unchecked(
            logits, kc, [&](std::size_t t) { return p.rules[t]; }, opt, ids, weights, kept, ex);
    } else if constexpr (std::same_as<P, threshold_options>) {
        const token_k rule { p.k_min, p.k_max, p.p };
        route_kept_unchecked(
            logits, kc, [&](std::size_t) { return rule; }, opt, ids, weights, kept, ex);
    } else {
        for (std::size_t t = 0; t < T; ++t) {
            int n = 0;
            for (std::size_t j = 0; j < std::size_t(kc); ++j) {
                ids(t, j) = p.ids(t, j);
                weights(t, j) = p.weights(t, j);
                n += p.ids(t, j) != no_expert;
            }
            kept[t] = n;
        }
    }
}

} // namespace detail
} // namespace kdial
