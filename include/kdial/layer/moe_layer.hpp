// The MoE layer: route -> dispatch -> experts -> combine, composed over a
// workspace sized once for (max tokens, max k). forward() takes k per call,
// fixed (fixed_k<N>) or dynamic (an int or dynamic_k), with no allocation and
// no reload. Weights are views (router [E, d] in f32; experts in f32, bf16 or
// q8; an optional always-on shared expert with a sigmoid gate).
//
// Experts run in two parallel phases over a tile list built from the
// dispatch plan: (1) H = silu(X gateᵀ) * (X upᵀ) tiled over (expert, rows,
// F columns), (2) Y = H downᵀ tiled over (expert, rows, d columns). Tile
// sizes come from the problem (rows, weight bytes), never from the thread
// count, and every output element has one writer computed in a fixed order,
// so the output is bit-identical for any thread count.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "../combine/combine.hpp"
#include "../core/error.hpp"
#include "../core/extent.hpp"
#include "../core/views.hpp"
#include "../dispatch/plan.hpp"
#include "../experts/expert_set.hpp"
#include "../kernels/linear.hpp"
#include "../parallel/for_each.hpp"
#include "../routing/router.hpp"
#include "../routing/threshold.hpp"
#include "../routing/variable_k.hpp"

namespace kdial {

// The optional shared expert: a one-expert set of width Fs and its gate.
struct shared_expert {
    expert_set expert; // size 1: gate/up [Fs, d], down [d, Fs]
    cmatrix_view<float> gate {}; // [1, d] sigmoid gate weight, or empty (factor 1)
};

// The scratch memory of MoE layers, sized once. Several layers that run one
// after another (the layers of a model) can share one workspace; it holds
// the routing of the last forward call that used it.
class moe_workspace {
public:
    // max_tokens: most tokens per call; max_slots: most (token, expert)
    // assignments per call (T * k); E experts of hidden size d, routed
    // expert width F, shared expert width Fs (0: none).
    moe_workspace(
        std::size_t max_tokens, std::size_t max_slots, std::size_t E, std::size_t d, std::size_t F, std::size_t Fs = 0)
        : max_tokens_(max_tokens)
        , max_slots_(max_slots)
        , E_(E)
        , d_(d)
        , F_(F)
        , Fs_(Fs)
    {
        constexpr const char* where = "kdial::moe_workspace";
        detail::check(max_tokens >= 1, where, ": max_tokens must be >= 1");
        detail::check(max_slots >= 1, where, ": max_slots must be >= 1");
        detail::check(E >= 1 && E <= std::size_t(max_experts), where, ": expert count E = ", E, " outside [1, ",
            max_experts, "]");
        logits.resize(max_tokens * E);
        ids.resize(max_slots);
        weights.resize(max_slots);
        plan = dispatch_plan(max_tokens, int(E), int(std::min(E, max_slots)));
        xs.resize(max_slots * d);
        h.resize(max_slots * F);
        ys.resize(max_slots * d);
        hs.resize(max_tokens * Fs);
        s.resize(Fs ? max_tokens * d : 0);
        gate_logits.resize(max_tokens);
        rules.resize(max_tokens);
        kept.resize(max_tokens);
        // Tile lists: at most (experts + row chunks) x column chunks.
        const std::size_t row_chunks = E + 2 + max_slots / 512 + (Fs ? max_tokens / 512 + 2 : 0);
        tiles_up.reserve(row_chunks * (std::max(F, Fs) / 16 + 1));
        tiles_down.reserve(row_chunks * (d / 16 + 1));
    }

    std::size_t max_tokens() const noexcept { return max_tokens_; }
    std::size_t max_slots() const noexcept { return max_slots_; }
    std::size_t experts() const noexcept { return E_; }
    std::size_t hidden() const noexcept { return d_; }
    std::size_t ffn() const noexcept { return F_; }
    std::size_t shared_ffn() const noexcept { return Fs_; }

private:
    friend class moe_layer;
    struct tile {
        std::int32_t expert; // [0, E) routed, E = shared expert
        std::uint32_t r0, r1; // rows within the expert's block
        std::uint32_t c0, c1; // output columns
    };
    std::size_t max_tokens_, max_slots_, E_, d_, F_, Fs_;
    std::size_t last_T = 0, last_k = 0;
    std::vector<float> logits, weights, xs, h, ys, hs, s, gate_logits;
    std::vector<std::int32_t> ids;
    std::vector<token_k> rules; // [max_tokens] per-token rules of forward_token_k callers
    std::vector<int> kept; // [max_tokens] experts each token kept in the last call
    dispatch_plan plan;
    std::vector<tile> tiles_up, tiles_down;
};

class moe_layer {
public:
    // Validates every shape (naming the tensor) and makes its own workspace
    // for up to max_tokens tokens and k <= max_k. `router` is [E, d] f32; the
    // router options' selection_bias (if any) must outlive the layer.
    moe_layer(cmatrix_view<float> router, expert_set experts, std::size_t max_tokens, int max_k,
        router_options routing = {}, std::optional<shared_expert> shared = std::nullopt)
        : moe_layer(router, std::move(experts), nullptr, routing, std::move(shared), max_tokens, max_k)
    {
    }

    // The same, on a workspace shared with other layers (it must be at least
    // as large as this layer's d, F, E and shared width).
    moe_layer(cmatrix_view<float> router, expert_set experts, std::shared_ptr<moe_workspace> ws,
        router_options routing = {}, std::optional<shared_expert> shared = std::nullopt)
        : moe_layer(router, std::move(experts), std::move(ws), routing, std::move(shared), 0, 0)
    {
    }

    std::size_t hidden() const noexcept { return router_.cols; }
    std::size_t num_experts() const noexcept { return router_.rows; }
    std::size_t max_tokens() const noexcept { return ws_->max_tokens(); }
    // Largest k a call with T tokens may use.
    int max_k(std::size_t T = 1) const noexcept
    {
        return int(std::min(num_experts(), ws_->max_slots() / std::max<std::size_t>(1, T)));
    }
    const std::shared_ptr<moe_workspace>& workspace() const noexcept { return ws_; }
    const expert_set& experts() const noexcept { return experts_; }
    bool has_shared_expert() const noexcept { return shared_.has_value(); }
    const router_options& routing() const noexcept { return routing_; }

    // out = MoE(X) with k experts per token.
    //   X   [T, d]  T <= max_tokens
    //   out [T, d]  fully overwritten; untouched if an error is thrown
    // Throws kdial::error on shapes, k outside [1, min(E, max_k)] or a
    // non-finite router logit (see router.hpp).
    template <k_extent K> void forward(cmatrix_view<float> X, K k, matrix_view<float> out)
    {
        constexpr const char* where = "kdial::moe_layer::forward";
        check_io(X, out, where);
        check_k(k, int(num_experts()), where);
        detail::check(std::size_t(k.value()) * X.rows <= ws_->max_slots(), where, ": T * k = ", X.rows, " * ",
            k.value(), " exceeds the workspace's ", ws_->max_slots(), " slots");
        const std::size_t T = X.rows, E = num_experts(), kk = std::size_t(k.value());
        const matrix_view<float> logits(ws_->logits.data(), T, E);
        compute_router_logits(X, logits);
        route(cmatrix_view<float>(logits), k, routing_, matrix_view<std::int32_t>(ws_->ids.data(), T, kk),
            matrix_view<float>(ws_->weights.data(), T, kk));
        std::fill(ws_->kept.begin(), ws_->kept.begin() + std::ptrdiff_t(T), int(kk));
        run_routed(X, kk, out);
    }

    // forward() with a runtime k: fixed specialisations for 1, 2, 4, 8.
    void forward(cmatrix_view<float> X, int k, matrix_view<float> out)
    {
        with_k(k, [&](auto kk) { forward(X, kk, out); });
    }

    // forward() with a routing computed by the caller (per-request k,
    // threshold routing): ids [T, kc] in [0, E) or no_expert, weights [T, kc].
    // kc <= max_k.
    void forward_routed(
        cmatrix_view<float> X, cmatrix_view<std::int32_t> ids, cmatrix_view<float> weights, matrix_view<float> out)
    {
        constexpr const char* where = "kdial::moe_layer::forward_routed";
        check_io(X, out, where);
        const std::size_t T = X.rows, kc = ids.cols;
        detail::check(kc >= 1 && kc * T <= ws_->max_slots(), where, ": routing has ", kc, " columns; T * k = ", T * kc,
            " must be in [1, ", ws_->max_slots(), "] (the workspace's slots)");
        detail::check_shape(ids, T, kc, where, "ids");
        detail::check_shape(weights, T, kc, where, "weights");
        for (std::size_t t = 0; t < T; ++t)
            for (std::size_t j = 0; j < kc; ++j) {
                const std::int32_t e = ids(t, j);
                detail::check(e == no_expert || (e >= 0 && std::size_t(e) < num_experts()), where, ": ids[", t, ", ", j,
                    "] = ", e, " is not an expert in [0, ", num_experts(), ") nor no_expert (-1)");
            }
        for (std::size_t t = 0; t < T; ++t) {
            int n = 0;
            for (std::size_t j = 0; j < kc; ++j) {
                ws_->ids[t * kc + j] = ids(t, j);
                ws_->weights[t * kc + j] = weights(t, j);
                n += ids(t, j) != no_expert;
            }
            ws_->kept[t] = n;
        }
        run_routed(X, kc, out);
    }

    // out = MoE(X) with k_per_token[t] experts for token t (per-request k in
    // one batch): routes with the largest k and drops each token's slots
    // past its own k (dropped slots cost nothing). Token t gets the routing
    // forward(X_t, k_per_token[t]) gives it (same ids, bit-identical
    // weights); its output differs from that call only by how the expert
    // kernels round for a different number of rows per expert.
    //   X           [T, d]
    //   k_per_token [T]     each in [1, E]; T * max k <= the workspace's slots
    //   out         [T, d]
    void forward_variable_k(cmatrix_view<float> X, std::span<const int> k_per_token, matrix_view<float> out)
    {
        constexpr const char* where = "kdial::moe_layer::forward_variable_k";
        check_io(X, out, where);
        detail::check(
            k_per_token.size() == X.rows, where, ": ", k_per_token.size(), " k values for T = ", X.rows, " tokens");
        int kc = 1;
        for (std::size_t t = 0; t < X.rows; ++t) {
            detail::check(k_per_token[t] >= 1 && std::size_t(k_per_token[t]) <= num_experts(), where,
                ": k = ", k_per_token[t], " for token ", t, " outside [1, E = ", num_experts(), "]");
            kc = std::max(kc, k_per_token[t]);
        }
        for (std::size_t t = 0; t < X.rows; ++t)
            ws_->rules[t] = token_k { k_per_token[t], k_per_token[t], 1.0f };
        route_and_run(X, kc, out, where);
    }

    // out = MoE(X) with threshold routing: per token, the fewest best experts
    // whose routing mass reaches th.p, clamped to [th.k_min, th.k_max]
    // (see routing/threshold.hpp). last_kept() says how many each token used.
    void forward_threshold(cmatrix_view<float> X, const threshold_options& th, matrix_view<float> out)
    {
        constexpr const char* where = "kdial::moe_layer::forward_threshold";
        check_io(X, out, where);
        detail::check(th.p >= 0.0f && th.p <= 1.0f, where, ": threshold p = ", th.p, " outside [0, 1]");
        detail::check(th.k_min >= 1 && th.k_min <= th.k_max && std::size_t(th.k_max) <= num_experts(), where,
            ": k range [", th.k_min, ", ", th.k_max, "] must satisfy 1 <= k_min <= k_max <= E = ", num_experts());
        for (std::size_t t = 0; t < X.rows; ++t)
            ws_->rules[t] = token_k { th.k_min, th.k_max, th.p };
        route_and_run(X, th.k_max, out, where);
    }

    // out = MoE(X) with a rule per token (a k, or a threshold in a k range):
    // the general form of the two above, for batches that mix them.
    //   rules [T]  see routing/variable_k.hpp
    void forward_token_k(cmatrix_view<float> X, std::span<const token_k> rules, matrix_view<float> out)
    {
        constexpr const char* where = "kdial::moe_layer::forward_token_k";
        check_io(X, out, where);
        detail::check(rules.size() == X.rows, where, ": ", rules.size(), " rules for T = ", X.rows, " tokens");
        int kc = 1;
        for (std::size_t t = 0; t < X.rows; ++t) {
            const token_k& r = rules[t];
            detail::check(r.k_min >= 1 && r.k_min <= r.k_max && std::size_t(r.k_max) <= num_experts(), where,
                ": token ", t, " asks for k in [", r.k_min, ", ", r.k_max,
                "], which must satisfy 1 <= k_min <= k_max <= E = ", num_experts());
            kc = std::max(kc, r.k_max);
            ws_->rules[t] = r;
        }
        route_and_run(X, kc, out, where);
    }

    // Turns renormalisation of the kept weights on or off (a run-time
    // override of the model's norm_topk_prob, e.g. when k is lowered on a
    // model trained without it). Not thread-safe against a running forward.
    void set_renormalize(bool on) noexcept { routing_.renormalize = on; }

    // Experts each token used in the last forward call [T] (k for forward(),
    // the kept count for the per-token forms, non-dropped ids for
    // forward_routed).
    std::span<const int> last_kept() const noexcept { return { ws_->kept.data(), ws_->last_T }; }
    // (token, expert) assignments the last forward call ran: sum of last_kept().
    std::size_t last_assignments() const noexcept { return ws_->plan.num_slots(); }

    // The routing of the last forward call: logits [T, E], ids and weights [T, k].
    cmatrix_view<float> last_logits() const noexcept { return { ws_->logits.data(), ws_->last_T, num_experts() }; }
    cmatrix_view<std::int32_t> last_ids() const noexcept { return { ws_->ids.data(), ws_->last_T, ws_->last_k }; }
    cmatrix_view<float> last_weights() const noexcept { return { ws_->weights.data(), ws_->last_T, ws_->last_k }; }
    const dispatch_plan& last_plan() const noexcept { return ws_->plan; }

    // Weight bytes the last forward call streamed: router, every expert that
    // received at least one token, and the shared expert (and its gate).
    std::size_t last_weight_bytes() const noexcept
    {
        std::size_t used = 0;
        for (auto c : ws_->plan.counts())
            used += c > 0;
        std::size_t b = router_.rows * router_.cols * sizeof(float) + used * experts_.expert_bytes();
        if (shared_ && ws_->last_T > 0)
            b += shared_->expert.expert_bytes() + (shared_->gate.data ? shared_->gate.cols * sizeof(float) : 0);
        return b;
    }

private:
    moe_layer(cmatrix_view<float> router, expert_set experts, std::shared_ptr<moe_workspace> ws, router_options routing,
        std::optional<shared_expert> shared, std::size_t max_tokens, int max_k)
        : router_(router)
        , experts_(std::move(experts))
        , routing_(routing)
        , shared_(std::move(shared))
    {
        constexpr const char* where = "kdial::moe_layer";
        const std::size_t E = router.rows, d = router.cols;
        detail::check(!experts_.empty(), where, ": no experts");
        detail::check(E == experts_.size(), where, ": router weight has ", E, " rows but there are ", experts_.size(),
            " experts");
        detail::check(E >= 1 && E <= std::size_t(max_experts), where, ": expert count E = ", E, " outside [1, ",
            max_experts, "]");
        detail::check_shape(router, E, d, where, "router weight");
        detail::check(
            experts_.hidden() == d, where, ": experts have hidden size ", experts_.hidden(), ", router weight has ", d);
        detail::check_router_options(routing_, E, where);
        if (shared_) {
            detail::check(shared_->expert.size() == 1, where, ": shared expert set has ", shared_->expert.size(),
                " experts, expected 1");
            detail::check(shared_->expert.hidden() == d, where, ": shared expert has hidden size ",
                shared_->expert.hidden(), ", expected d = ", d);
            if (shared_->gate.data)
                detail::check_shape(shared_->gate, 1, d, where, "shared expert gate");
        }
        const std::size_t F = experts_.ffn(), Fs = shared_ ? shared_->expert.ffn() : 0;
        if (!ws) {
            detail::check(
                max_k >= 1 && std::size_t(max_k) <= E, where, ": max_k = ", max_k, " outside [1, E = ", E, "]");
            detail::check(max_tokens >= 1, where, ": max_tokens must be >= 1");
            ws = std::make_shared<moe_workspace>(max_tokens, max_tokens * std::size_t(max_k), E, d, F, Fs);
        }
        detail::check(ws->experts() >= E && ws->hidden() == d && ws->ffn() >= F && ws->shared_ffn() >= Fs, where,
            ": workspace (E ", ws->experts(), ", d ", ws->hidden(), ", F ", ws->ffn(), ", Fs ", ws->shared_ffn(),
            ") is too small for this layer (E ", E, ", d ", d, ", F ", F, ", Fs ", Fs, ")");
        detail::check(
            ws->experts() == E, where, ": workspace is for E = ", ws->experts(), " experts, this layer has ", E);
        ws_ = std::move(ws);
    }

    // Row chunk of the GEMM path and the smallest column chunk of a tile.
    static constexpr std::size_t gemm_rows = 512;
    static constexpr std::size_t min_cols = 16;
    // Target work per tile: 256 KiB of weights (GEMV) or 4 MFLOP (GEMM).
    static constexpr std::size_t tile_bytes = std::size_t { 256 } << 10;
    static constexpr std::size_t tile_flops = std::size_t { 4 } << 20;

    using tile = moe_workspace::tile;

    void check_io(cmatrix_view<float> X, matrix_view<float> out, const char* where) const
    {
        const std::size_t d = hidden();
        detail::check(X.rows <= ws_->max_tokens(), where, ": T = ", X.rows,
            " exceeds the workspace's max_tokens = ", ws_->max_tokens());
        detail::check_shape(X, X.rows, d, where, "X");
        detail::check_shape(out, X.rows, d, where, "out");
    }

    void compute_router_logits(cmatrix_view<float> X, matrix_view<float> logits)
    {
        const weight_view<f32_t> w(router_.data, router_.rows, router_.cols, router_.stride);
        const std::size_t rows = 64;
        parallel::for_each_tile(X.rows, rows, [&](std::size_t t0, std::size_t t1) {
            linear<f32_t>(w, X.sub_rows(t0, t1 - t0), 0, w.rows, logits.sub_rows(t0, t1 - t0));
        });
    }

    // Routes X by ws_->rules[0..T) with kc ranked columns, then runs the
    // experts. Rules are already validated.
    void route_and_run(cmatrix_view<float> X, int kc, matrix_view<float> out, const char* where)
    {
        const std::size_t T = X.rows, E = num_experts(), k = std::size_t(kc);
        detail::check(k * T <= ws_->max_slots(), where, ": T * max k = ", T, " * ", kc, " exceeds the workspace's ",
            ws_->max_slots(), " slots");
        const matrix_view<float> logits(ws_->logits.data(), T, E);
        compute_router_logits(X, logits);
        route_token_k(cmatrix_view<float>(logits), std::span<const token_k>(ws_->rules.data(), T), routing_,
            matrix_view<std::int32_t>(ws_->ids.data(), T, k), matrix_view<float>(ws_->weights.data(), T, k),
            std::span<int>(ws_->kept.data(), T));
        run_routed(X, k, out);
    }

    // Columns per tile for an output of `cols` columns whose column costs
    // `col_bytes` weight bytes and, with n rows, n * col_flops FLOPs.
    static std::size_t col_chunk(std::size_t cols, std::size_t n, std::size_t col_bytes, std::size_t col_flops)
    {
        std::size_t c;
        if (n <= gemv_max_rows) {
            c = std::max(min_cols, tile_bytes / std::max<std::size_t>(1, col_bytes) / min_cols * min_cols);
        } else {
            // Multiples of 64 keep the GEMM's packed panels full.
            const std::size_t f = std::max<std::size_t>(1, n * col_flops);
            c = std::max<std::size_t>(64, (tile_flops / f + 63) / 64 * 64);
        }
        return std::min(c, cols);
    }

    static void add_tiles(std::vector<tile>& tiles, std::int32_t e, std::size_t n, std::size_t cols,
        std::size_t col_bytes, std::size_t col_flops)
    {
        for (std::size_t r0 = 0; r0 < n; r0 += gemm_rows) {
            const std::size_t r1 = std::min(n, r0 + gemm_rows);
            const std::size_t cc = col_chunk(cols, r1 - r0, col_bytes, col_flops);
            for (std::size_t c0 = 0; c0 < cols; c0 += cc)
                tiles.push_back({ e, std::uint32_t(r0), std::uint32_t(r1), std::uint32_t(c0),
                    std::uint32_t(std::min(cols, c0 + cc)) });
        }
    }

    void build_tiles(std::size_t T)
    {
        ws_->tiles_up.clear();
        ws_->tiles_down.clear();
        const std::size_t d = hidden(), F = experts_.ffn();
        const std::size_t wb = dtype_bytes_per_weight(experts_.type());
        const auto counts = ws_->plan.counts();
        for (std::size_t e = 0; e < counts.size(); ++e) {
            const std::size_t n = std::size_t(counts[e]);
            add_tiles(ws_->tiles_up, std::int32_t(e), n, F, 2 * d * wb, 4 * d);
            add_tiles(ws_->tiles_down, std::int32_t(e), n, d, F * wb, 2 * F);
        }
        if (shared_ && T > 0) {
            const std::size_t Fs = shared_->expert.ffn();
            const std::size_t sb = dtype_bytes_per_weight(shared_->expert.type());
            add_tiles(ws_->tiles_up, std::int32_t(counts.size()), T, Fs, 2 * d * sb, 4 * d);
            add_tiles(ws_->tiles_down, std::int32_t(counts.size()), T, d, Fs * sb, 2 * Fs);
        }
    }

    // Approximate bytes per weight, for tile sizing only.
    static std::size_t dtype_bytes_per_weight(dtype t) noexcept
    {
        return t == dtype::f32 ? 4 : t == dtype::bf16 ? 2 : 1;
    }

    void run_routed(cmatrix_view<float> X, std::size_t kc, matrix_view<float> out)
    {
        const std::size_t T = X.rows, d = hidden(), E = num_experts();
        ws_->plan.build(cmatrix_view<std::int32_t>(ws_->ids.data(), T, kc));
        ws_->last_T = T;
        ws_->last_k = kc;
        const std::size_t slots = ws_->plan.num_slots();
        const std::size_t F = experts_.ffn();
        const matrix_view<float> xs(ws_->xs.data(), slots, d), h(ws_->h.data(), slots, F), ys(ws_->ys.data(), slots, d);
        gather(ws_->plan, X, xs);
        if (shared_ && shared_->gate.data) {
            const weight_view<f32_t> g(shared_->gate.data, 1, d, shared_->gate.stride);
            parallel::for_each_tile(T, 64, [&](std::size_t t0, std::size_t t1) {
                linear<f32_t>(
                    g, X.sub_rows(t0, t1 - t0), 0, 1, matrix_view<float>(ws_->gate_logits.data() + t0, t1 - t0, 1));
            });
        }
        build_tiles(T);
        const auto offsets = ws_->plan.offsets();
        const std::size_t Fs = shared_ ? shared_->expert.ffn() : 0;
        const matrix_view<float> hs(ws_->hs.data(), shared_ ? T : 0, Fs), s(ws_->s.data(), shared_ ? T : 0, d);
        // Phase 1: gate and up.
        parallel::for_each_index(ws_->tiles_up.size(), [&](std::size_t i) {
            const tile& tl = ws_->tiles_up[i];
            const std::size_t n = tl.r1 - tl.r0;
            if (std::size_t(tl.expert) < E) {
                const std::size_t r = std::size_t(offsets[std::size_t(tl.expert)]) + tl.r0;
                experts_.visit([&](const auto& list) {
                    const auto& ew = list[std::size_t(tl.expert)];
                    swiglu_gate_up(
                        ew.gate, ew.up, cmatrix_view<float>(xs.sub_rows(r, n)), tl.c0, tl.c1, h.sub_rows(r, n));
                });
            } else {
                shared_->expert.visit([&](const auto& list) {
                    swiglu_gate_up(list[0].gate, list[0].up, X.sub_rows(tl.r0, n), tl.c0, tl.c1, hs.sub_rows(tl.r0, n));
                });
            }
        });
        // Phase 2: down.
        parallel::for_each_index(ws_->tiles_down.size(), [&](std::size_t i) {
            const tile& tl = ws_->tiles_down[i];
            const std::size_t n = tl.r1 - tl.r0;
            if (std::size_t(tl.expert) < E) {
                const std::size_t r = std::size_t(offsets[std::size_t(tl.expert)]) + tl.r0;
                experts_.visit([&](const auto& list) {
                    linear(list[std::size_t(tl.expert)].down, cmatrix_view<float>(h.sub_rows(r, n)), tl.c0, tl.c1,
                        ys.sub_rows(r, n));
                });
            } else {
                shared_->expert.visit([&](const auto& list) {
                    linear(
                        list[0].down, cmatrix_view<float>(hs.sub_rows(tl.r0, n)), tl.c0, tl.c1, s.sub_rows(tl.r0, n));
                });
            }
        });
        shared_expert_term st;
        if (shared_) {
            st.output = cmatrix_view<float>(s);
            if (shared_->gate.data)
                st.gate_logits = std::span<const float>(ws_->gate_logits.data(), T);
        }
        combine(ws_->plan, cmatrix_view<float>(ws_->weights.data(), T, kc), cmatrix_view<float>(ys), out, st);
    }

    cmatrix_view<float> router_;
    expert_set experts_;
    router_options routing_;
    std::optional<shared_expert> shared_;
    std::shared_ptr<moe_workspace> ws_;
};

} // namespace kdial
