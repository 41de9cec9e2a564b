// The router (stage 1, route): router logits [T, E] -> Routing, i.e. for
// every token the k chosen expert ids [T, k] and their weights [T, k].
//   scores   = softmax over all E in fp32 (or sigmoid)
//   chosen   = top-k of (scores + selection_bias), descending, ties -> lower id
//   weights  = scores of the chosen experts (the bias never enters them),
//              renormalised to sum to 1 if asked, then times `scale`.
// Non-finite logits (NaN, +-inf) are rejected: route() throws kdial::error
// naming the token, the expert and the value, and writes nothing. (A NaN has
// no rank, and an inf makes softmax 0/0; neither has a meaningful routing.)
// Deterministic (each token is computed alone, in a fixed order), parallel
// over tiles of tokens, no allocation.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>

#include "../core/error.hpp"
#include "../core/extent.hpp"
#include "../core/views.hpp"
#include "../kernels/dense.hpp"
#include "../kernels/linear.hpp"
#include "../parallel/for_each.hpp"
#include "../simd/vec.hpp"
#include "scores.hpp"
#include "topk.hpp"

namespace kdial {

// Per-model routing options (config fields in brackets).
struct router_options {
    scoring score = scoring::softmax;
    bool renormalize = false; // [norm_topk_prob] weights /= sum of the k weights
    float scale = 1.0f; // [routed_scaling_factor] applied last
    std::span<const float> selection_bias {}; // [E] added to scores for selection only, or empty
};

namespace detail {

inline void check_router_options(const router_options& opt, std::size_t num_experts, const char* where)
{
    check(opt.selection_bias.empty() || opt.selection_bias.size() == num_experts, where, ": selection_bias has ",
        opt.selection_bias.size(), " entries, expected E = ", num_experts);
    if (!opt.selection_bias.empty()) {
        const std::size_t bad = find_non_finite(opt.selection_bias.data(), opt.selection_bias.size());
        check(bad == opt.selection_bias.size(), where, ": selection_bias[", bad, "] is non-finite (",
            bad < opt.selection_bias.size() ? opt.selection_bias[bad] : 0.0f, ")");
    }
    check(std::isfinite(opt.scale), where, ": scale is non-finite (", opt.scale, ")");
}

// Throws if any logit is non-finite, naming the first one in row-major order.
inline void check_logits_finite(cmatrix_view<float> logits, const char* where)
{
    for (std::size_t t = 0; t < logits.rows; ++t) {
        const std::size_t e = find_non_finite(logits.row(t), logits.cols);
        check(e == logits.cols, where, ": router logit of token ", t, ", expert ", e, " is non-finite (",
            e < logits.cols ? logits(t, e) : 0.0f, ")");
    }
}

// The last step for one token's n chosen weights w[0..n): renormalise to
// sum 1 if asked (summed in rank order), then times the scale. Shared by
// every routing front end, so a token routed at k = n here or with n kept
// columns elsewhere (variable_k.hpp) gets bit-identical weights.
inline void finish_weights(float* w, int n, const router_options& opt) noexcept
{
    if (opt.renormalize) {
        float s = 0.0f;
        for (int j = 0; j < n; ++j)
            s += w[j];
        // +1e-20 only matters if every chosen score underflowed to 0.
        const float inv = 1.0f / (s + 1e-20f);
        for (int j = 0; j < n; ++j)
            w[j] *= inv;
    }
    if (opt.scale != 1.0f)
        for (int j = 0; j < n; ++j)
            w[j] *= opt.scale;
}

// Scores one token's logits [E] into `scores` (softmax or sigmoid) and
// selects the k best by score + selection bias into id / sel. `keys` is
// scratch [E] used only with a bias.
template <k_extent K>
inline void score_and_select(const float* logits, int E, K k, const router_options& opt, float* scores, float* keys,
    std::int32_t* id, float* sel) noexcept
{
    for (int e = 0; e < E; ++e)
        scores[e] = logits[e];
    score_inplace(opt.score, scores, static_cast<std::size_t>(E));
    const float* key = scores;
    if (!opt.selection_bias.empty()) {
        for (int e = 0; e < E; ++e)
            keys[e] = scores[e] + opt.selection_bias[static_cast<std::size_t>(e)];
        key = keys;
    }
    select_topk(key, E, k, id, sel);
}

// Routes tokens [t0, t1) (inputs already validated).
template <k_extent K>
void route_rows(cmatrix_view<float> logits, K k, const router_options& opt, matrix_view<std::int32_t> ids,
    matrix_view<float> weights, std::size_t t0, std::size_t t1) noexcept
{
    const int E = static_cast<int>(logits.cols);
    const int kk = k.value();
    float scores[max_experts];
    float keys[max_experts];
    for (std::size_t t = t0; t < t1; ++t) {
        std::int32_t* id = ids.row(t);
        float* w = weights.row(t);
        float sel[K::max_value];
        score_and_select(logits.row(t), E, k, opt, scores, keys, id, sel);
        for (int j = 0; j < kk; ++j)
            w[j] = scores[id[j]];
        finish_weights(w, kk, opt);
    }
}

// route() on validated input.
template <k_extent K>
void route_unchecked(cmatrix_view<float> logits, K k, const router_options& opt, matrix_view<std::int32_t> ids,
    matrix_view<float> weights, executor_ref ex)
{
    // About 40 ns of work per expert per token (exp + select).
    const std::size_t tile = parallel::tile_items(logits.cols * 16);
    parallel::for_each_tile(ex, logits.rows, tile,
        [&](std::size_t t0, std::size_t t1) { route_rows(logits, k, opt, ids, weights, t0, t1); });
}

} // namespace detail

// Routes T tokens from their router logits.
//   logits  [T, E]  router logits (finite)
//   ids     [T, k]  out: chosen experts, descending score, ties -> lower id
//   weights [T, k]  out: their routing weights
// Throws kdial::error (writing nothing) on k outside [1, E], shape
// mismatches, a bad bias or a non-finite logit.
template <k_extent K>
void route(cmatrix_view<float> logits, K k, const router_options& opt, matrix_view<std::int32_t> ids,
    matrix_view<float> weights, executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::route";
    const std::size_t T = logits.rows, E = logits.cols;
    check_k(k, static_cast<int>(E), where);
    detail::check_shape(logits, T, E, where, "logits");
    detail::check_shape(ids, T, static_cast<std::size_t>(k.value()), where, "ids");
    detail::check_shape(weights, T, static_cast<std::size_t>(k.value()), where, "weights");
    detail::check_router_options(opt, E, where);
    detail::check_logits_finite(logits, where);
    detail::route_unchecked(logits, k, opt, ids, weights, ex);
}

namespace detail {
// Tokens per router-logit tile (any size gives the same bits, see below).
inline constexpr std::size_t router_tile_rows = 64;

// Tokens per pass of router_dots: 4 with 32 vector registers (4 tokens x 2
// weight rows x 2 chains = 16 accumulators), else 2 (AVX2, SSE: 16 registers).
template <class Arch> inline constexpr int router_group = simd::is_avx512_arch<Arch> || KDIAL_SIMD_NEON64 ? 4 : 2;

// logits[t, e] = X[t] . W[e] for the rows of X, each one dot product in the
// order of the one-row GEMV (linear_gemv with gemv_chains<1> chains),
// however many rows the call has and however they are grouped. So a token's
// router logits, and the experts it picks, are the same bits at decode (T =
// 1) and inside any prefill batch: linear() would pick its GEMV, small-row
// or GEMM path by the tile's row count, each summing in its own order. The
// cost: E x d is small and stays in cache, but the one-row order reuses each
// weight vector for only a few tokens. Measured (AMD Zen 5, 1 thread, T =
// 512, E = 64, d = 2048, f32): 2.8 ms against 1.0 ms through linear(),
// about 2 % of a bf16 MoE layer's prefill at k = 1 and 0.5 % at k = 8;
// olmoe prefill (4 layers, 2 threads) moved within the run-to-run noise.
template <class Arch, weight_type W>
void router_dots(const weight_view<W>& w, cmatrix_view<float> X, matrix_view<float> logits) noexcept
{
    constexpr int C = gemv_chains<1>, NR = router_group<Arch>;
    std::size_t t = 0;
    for (; t + NR <= X.rows; t += NR)
        linear_gemv<Arch, W, NR, C>(w, X.row(t), X.stride, 0, w.rows, logits.row(t), logits.stride);
    for (; t < X.rows; ++t)
        linear_gemv<Arch, W, 1, C>(w, X.row(t), X.stride, 0, w.rows, logits.row(t), logits.stride);
}

// logits [T, E] = X [T, d] . W [E, d]ᵀ, shapes already validated. The one
// place router logits are computed: route(X, W, ...), the MoE layer (router
// and shared-expert gate) and distributed/ all call it, so they pick the
// same experts bit for bit, at any T (router_dots).
inline void router_logits_unchecked(
    cmatrix_view<float> X, const any_weight_view& W, matrix_view<float> logits, executor_ref ex)
{
    std::visit(
        [&](const auto& w) {
            parallel::for_each_tile(ex, X.rows, router_tile_rows, [&](std::size_t t0, std::size_t t1) {
                router_dots<xsimd::default_arch>(w, X.sub_rows(t0, t1 - t0), logits.sub_rows(t0, t1 - t0));
            });
        },
        W);
}

inline weight_view<f32_t> as_weight(cmatrix_view<float> W) noexcept
{
    return { W.data, W.rows, W.cols, W.stride };
}
} // namespace detail

// Router logits from hidden states: logits[t, e] = X[t, :] . W[e, :].
//   X      [T, d]  hidden states (the post-attention-normed activations)
//   W      [E, d]  router weight (HF mlp.gate.weight), any weight format
//   logits [T, E]  out
inline void router_logits(
    cmatrix_view<float> X, const any_weight_view& W, matrix_view<float> logits, executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::router_logits";
    const std::size_t T = X.rows, d = X.cols, E = rows_of(W);
    detail::check_shape(X, T, d, where, "X");
    std::visit([&](const auto& w) { detail::check_weight_shape(w, E, d, where, "router weight"); }, W);
    detail::check_shape(logits, T, E, where, "logits");
    detail::router_logits_unchecked(X, W, logits, ex);
}
inline void router_logits(
    cmatrix_view<float> X, cmatrix_view<float> W, matrix_view<float> logits, executor_ref ex = default_executor {})
{
    router_logits(X, any_weight_view(detail::as_weight(W)), logits, ex);
}

// Both steps: hidden states and router weight -> Routing. `logits` [T, E] is
// caller-owned scratch (it holds the logits afterwards).
template <k_extent K>
void route(cmatrix_view<float> X, const any_weight_view& W, K k, const router_options& opt, matrix_view<float> logits,
    matrix_view<std::int32_t> ids, matrix_view<float> weights, executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::route";
    check_k(k, static_cast<int>(rows_of(W)), where);
    detail::check_shape(ids, X.rows, static_cast<std::size_t>(k.value()), where, "ids");
    detail::check_shape(weights, X.rows, static_cast<std::size_t>(k.value()), where, "weights");
    router_logits(X, W, logits, ex);
    route(cmatrix_view<float>(logits), k, opt, ids, weights, ex);
}
template <k_extent K>
void route(cmatrix_view<float> X, cmatrix_view<float> W, K k, const router_options& opt, matrix_view<float> logits,
    matrix_view<std::int32_t> ids, matrix_view<float> weights, executor_ref ex = default_executor {})
{
    route(X, any_weight_view(detail::as_weight(W)), k, opt, logits, ids, weights, ex);
}

} // namespace kdial
