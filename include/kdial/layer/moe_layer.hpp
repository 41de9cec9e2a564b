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

namespace kdial {

// The optional shared expert: a one-expert set of width Fs and its gate.
struct shared_expert {
    expert_set expert;                 // size 1: gate/up [Fs, d], down [d, Fs]
    cmatrix_view<float> gate{};        // [1, d] sigmoid gate weight, or empty (factor 1)
};

class moe_layer {
public:
    // Validates every shape (naming the tensor) and sizes the workspace for
    // up to max_tokens tokens and k <= max_k. `router` is [E, d] f32; the
    // router options' selection_bias (if any) must outlive the layer.
    moe_layer(cmatrix_view<float> router, expert_set experts, std::size_t max_tokens, int max_k,
              router_options routing = {}, std::optional<shared_expert> shared = std::nullopt)
        : router_(router), experts_(std::move(experts)), routing_(routing), shared_(std::move(shared))
    {
        constexpr const char* where = "kdial::moe_layer";
        const std::size_t E = router.rows, d = router.cols;
        detail::check(!experts_.empty(), where, ": no experts");
        detail::check(E == experts_.size(), where, ": router weight has ", E, " rows but there are ",
                      experts_.size(), " experts");
        detail::check(E >= 1 && E <= std::size_t(max_experts), where, ": expert count E = ", E,
                      " outside [1, ", max_experts, "]");
        detail::check_shape(router, E, d, where, "router weight");
        detail::check(experts_.hidden() == d, where, ": experts have hidden size ", experts_.hidden(),
                      ", router weight has ", d);
        detail::check(max_k >= 1 && std::size_t(max_k) <= E, where, ": max_k = ", max_k, " outside [1, E = ", E,
                      "]");
        detail::check(max_tokens >= 1, where, ": max_tokens must be >= 1");
        detail::check_router_options(routing_, E, where);
        if (shared_) {
            detail::check(shared_->expert.size() == 1, where, ": shared expert set has ", shared_->expert.size(),
                          " experts, expected 1");
            detail::check(shared_->expert.hidden() == d, where, ": shared expert has hidden size ",
                          shared_->expert.hidden(), ", expected d = ", d);
            if (shared_->gate.data)
                detail::check_shape(shared_->gate, 1, d, where, "shared expert gate");
        }
        const std::size_t F = experts_.ffn(), slots = max_tokens * std::size_t(max_k);
        const std::size_t Fs = shared_ ? shared_->expert.ffn() : 0;
        max_tokens_ = max_tokens;
        max_k_ = max_k;
        logits_.resize(max_tokens * E);
        ids_.resize(slots);
        weights_.resize(slots);
        plan_ = dispatch_plan(max_tokens, int(E), max_k);
        xs_.resize(slots * d);
        h_.resize(slots * F);
        ys_.resize(slots * d);
        if (shared_) {
            hs_.resize(max_tokens * Fs);
            s_.resize(max_tokens * d);
            gate_logits_.resize(max_tokens);
        }
        // Tile lists: at most (experts + row chunks) x column chunks.
        const std::size_t row_chunks = E + 1 + slots / gemm_rows + 1 + (shared_ ? max_tokens / gemm_rows + 2 : 0);
        tiles_up_.reserve(row_chunks * (std::max(F, Fs) / min_cols + 1));
        tiles_down_.reserve(row_chunks * (d / min_cols + 1));
    }

    std::size_t hidden() const noexcept { return router_.cols; }
    std::size_t num_experts() const noexcept { return router_.rows; }
    std::size_t max_tokens() const noexcept { return max_tokens_; }
    int max_k() const noexcept { return max_k_; }
    const expert_set& experts() const noexcept { return experts_; }
    bool has_shared_expert() const noexcept { return shared_.has_value(); }
    const router_options& routing() const noexcept { return routing_; }

    // out = MoE(X) with k experts per token.
    //   X   [T, d]  T <= max_tokens
    //   out [T, d]  fully overwritten; untouched if an error is thrown
    // Throws kdial::error on shapes, k outside [1, min(E, max_k)] or a
    // non-finite router logit (see router.hpp).
    template <k_extent K>
    void forward(cmatrix_view<float> X, K k, matrix_view<float> out)
    {
        constexpr const char* where = "kdial::moe_layer::forward";
        check_io(X, out, where);
        check_k(k, int(num_experts()), where);
        detail::check(k.value() <= max_k_, where, ": k = ", k.value(), " exceeds the layer's max_k = ", max_k_);
        const std::size_t T = X.rows, E = num_experts(), kk = std::size_t(k.value());
        const matrix_view<float> logits(logits_.data(), T, E);
        compute_router_logits(X, logits);
        route(cmatrix_view<float>(logits), k, routing_, matrix_view<std::int32_t>(ids_.data(), T, kk),
              matrix_view<float>(weights_.data(), T, kk));
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
    void forward_routed(cmatrix_view<float> X, cmatrix_view<std::int32_t> ids, cmatrix_view<float> weights,
                        matrix_view<float> out)
    {
        constexpr const char* where = "kdial::moe_layer::forward_routed";
        check_io(X, out, where);
        const std::size_t T = X.rows, kc = ids.cols;
        detail::check(kc >= 1 && kc <= std::size_t(max_k_), where, ": routing has ", kc,
                      " columns, outside [1, max_k = ", max_k_, "]");
        detail::check_shape(ids, T, kc, where, "ids");
        detail::check_shape(weights, T, kc, where, "weights");
        for (std::size_t t = 0; t < T; ++t)
            for (std::size_t j = 0; j < kc; ++j) {
                const std::int32_t e = ids(t, j);
                detail::check(e == no_expert || (e >= 0 && std::size_t(e) < num_experts()), where, ": ids[", t, ", ",
                              j, "] = ", e, " is not an expert in [0, ", num_experts(), ") nor no_expert (-1)");
            }
        for (std::size_t t = 0; t < T; ++t)
            for (std::size_t j = 0; j < kc; ++j) {
                ids_[t * kc + j] = ids(t, j);
                weights_[t * kc + j] = weights(t, j);
            }
        run_routed(X, kc, out);
    }

    // The routing of the last forward call: logits [T, E], ids and weights [T, k].
    cmatrix_view<float> last_logits() const noexcept { return {logits_.data(), last_T_, num_experts()}; }
    cmatrix_view<std::int32_t> last_ids() const noexcept { return {ids_.data(), last_T_, last_k_}; }
    cmatrix_view<float> last_weights() const noexcept { return {weights_.data(), last_T_, last_k_}; }
    const dispatch_plan& last_plan() const noexcept { return plan_; }

    // Weight bytes the last forward call streamed: router, every expert that
    // received at least one token, and the shared expert (and its gate).
    std::size_t last_weight_bytes() const noexcept
    {
        std::size_t used = 0;
        for (auto c : plan_.counts())
            used += c > 0;
        std::size_t b = router_.rows * router_.cols * sizeof(float) + used * experts_.expert_bytes();
        if (shared_ && last_T_ > 0)
            b += shared_->expert.expert_bytes() + (shared_->gate.data ? shared_->gate.cols * sizeof(float) : 0);
        return b;
    }

private:
    // Row chunk of the GEMM path and the smallest column chunk of a tile.
    static constexpr std::size_t gemm_rows = 512;
    static constexpr std::size_t min_cols = 16;
    // Target work per tile: 256 KiB of weights (GEMV) or 4 MFLOP (GEMM).
    static constexpr std::size_t tile_bytes = std::size_t{256} << 10;
    static constexpr std::size_t tile_flops = std::size_t{4} << 20;

    struct tile {
        std::int32_t expert; // [0, E) routed, E = shared expert
        std::uint32_t r0, r1; // rows within the expert's block
        std::uint32_t c0, c1; // output columns
    };

    void check_io(cmatrix_view<float> X, matrix_view<float> out, const char* where) const
    {
        const std::size_t d = hidden();
        detail::check(X.rows <= max_tokens_, where, ": T = ", X.rows, " exceeds the workspace's max_tokens = ",
                      max_tokens_);
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
                tiles.push_back({e, std::uint32_t(r0), std::uint32_t(r1), std::uint32_t(c0),
                                 std::uint32_t(std::min(cols, c0 + cc))});
        }
    }

    void build_tiles(std::size_t T)
    {
        tiles_up_.clear();
        tiles_down_.clear();
        const std::size_t d = hidden(), F = experts_.ffn();
        const std::size_t wb = dtype_bytes_per_weight(experts_.type());
        const auto counts = plan_.counts();
        for (std::size_t e = 0; e < counts.size(); ++e) {
            const std::size_t n = std::size_t(counts[e]);
            add_tiles(tiles_up_, std::int32_t(e), n, F, 2 * d * wb, 4 * d);
            add_tiles(tiles_down_, std::int32_t(e), n, d, F * wb, 2 * F);
        }
        if (shared_ && T > 0) {
            const std::size_t Fs = shared_->expert.ffn();
            const std::size_t sb = dtype_bytes_per_weight(shared_->expert.type());
            add_tiles(tiles_up_, std::int32_t(counts.size()), T, Fs, 2 * d * sb, 4 * d);
            add_tiles(tiles_down_, std::int32_t(counts.size()), T, d, Fs * sb, 2 * Fs);
        }
    }

    // Approximate bytes per weight, for tile sizing only.
    static std::size_t dtype_bytes_per_weight(dtype t) noexcept { return t == dtype::f32 ? 4 : t == dtype::bf16 ? 2 : 1; }

    void run_routed(cmatrix_view<float> X, std::size_t kc, matrix_view<float> out)
    {
        const std::size_t T = X.rows, d = hidden(), E = num_experts();
        plan_.build(cmatrix_view<std::int32_t>(ids_.data(), T, kc));
        last_T_ = T;
        last_k_ = kc;
        const std::size_t slots = plan_.num_slots();
        const std::size_t F = experts_.ffn();
        const matrix_view<float> xs(xs_.data(), slots, d), h(h_.data(), slots, F), ys(ys_.data(), slots, d);
        gather(plan_, X, xs);
        if (shared_ && shared_->gate.data) {
            const weight_view<f32_t> g(shared_->gate.data, 1, d, shared_->gate.stride);
            parallel::for_each_tile(T, 64, [&](std::size_t t0, std::size_t t1) {
                linear<f32_t>(g, X.sub_rows(t0, t1 - t0), 0, 1,
                              matrix_view<float>(gate_logits_.data() + t0, t1 - t0, 1));
            });
        }
        build_tiles(T);
        const auto offsets = plan_.offsets();
        const std::size_t Fs = shared_ ? shared_->expert.ffn() : 0;
        const matrix_view<float> hs(hs_.data(), shared_ ? T : 0, Fs), s(s_.data(), shared_ ? T : 0, d);
        // Phase 1: gate and up.
        parallel::for_each_index(tiles_up_.size(), [&](std::size_t i) {
            const tile& tl = tiles_up_[i];
            const std::size_t n = tl.r1 - tl.r0;
            if (std::size_t(tl.expert) < E) {
                const std::size_t r = std::size_t(offsets[std::size_t(tl.expert)]) + tl.r0;
                experts_.visit([&](const auto& list) {
                    const auto& ew = list[std::size_t(tl.expert)];
                    swiglu_gate_up(ew.gate, ew.up, cmatrix_view<float>(xs.sub_rows(r, n)), tl.c0, tl.c1, h.sub_rows(r, n));
                });
            } else {
                shared_->expert.visit([&](const auto& list) {
                    swiglu_gate_up(list[0].gate, list[0].up, X.sub_rows(tl.r0, n), tl.c0, tl.c1, hs.sub_rows(tl.r0, n));
                });
            }
        });
        // Phase 2: down.
        parallel::for_each_index(tiles_down_.size(), [&](std::size_t i) {
            const tile& tl = tiles_down_[i];
            const std::size_t n = tl.r1 - tl.r0;
            if (std::size_t(tl.expert) < E) {
                const std::size_t r = std::size_t(offsets[std::size_t(tl.expert)]) + tl.r0;
                experts_.visit([&](const auto& list) {
                    linear(list[std::size_t(tl.expert)].down, cmatrix_view<float>(h.sub_rows(r, n)), tl.c0, tl.c1,
                           ys.sub_rows(r, n));
                });
            } else {
                shared_->expert.visit([&](const auto& list) {
                    linear(list[0].down, cmatrix_view<float>(hs.sub_rows(tl.r0, n)), tl.c0, tl.c1, s.sub_rows(tl.r0, n));
                });
            }
        });
        shared_expert_term st;
        if (shared_) {
            st.output = cmatrix_view<float>(s);
            if (shared_->gate.data)
                st.gate_logits = std::span<const float>(gate_logits_.data(), T);
        }
        combine(plan_, cmatrix_view<float>(weights_.data(), T, kc), cmatrix_view<float>(ys), out, st);
    }

    cmatrix_view<float> router_;
    expert_set experts_;
    router_options routing_;
    std::optional<shared_expert> shared_;
    std::size_t max_tokens_ = 0;
    int max_k_ = 0;
    std::size_t last_T_ = 0, last_k_ = 0;
    // Workspace, sized once.
    std::vector<float> logits_, weights_, xs_, h_, ys_, hs_, s_, gate_logits_;
    std::vector<std::int32_t> ids_;
    dispatch_plan plan_;
    std::vector<tile> tiles_up_, tiles_down_;
};

} // namespace kdial
