// The MoE layer, split the way an engine embeds it:
//   moe_weights    what a layer is: router [E, d], E experts, an optional
//                  shared expert and its gate, routing options. An immutable
//                  value (views; copying copies views, never weights): any
//                  number of threads and streams may use one at once.
//   moe_workspace  the scratch of one stream, sized once from a moe_shape;
//                  owns its memory or is laid on memory the caller gives
//                  (bytes_needed(shape), 64-byte aligned). Layers run one
//                  after another may share one; concurrent streams need one
//                  each. It holds the last call's routing and plan.
//   executor       how tiles run (parallel/executor.hpp): oneTBB by default
//                  (in the caller's task_arena), serial_executor, or the
//                  engine's own pool.
// One forward, moe::forward(w, ws, X, policy, out, mode, ex), takes the
// routing policy as a value (fixed_k<N> / dynamic_k, per_token_k,
// threshold_options, per_token_rules or a given_routing; routing/policy.hpp)
// and overwrites out or adds into it (combine_mode::accumulate, for the
// residual). Its four stages are public and each can be called alone on the
// workspace (DeepEP-style): moe::route -> moe::dispatch (the plan, the
// handle) -> moe::run_experts (the tile scheduler) -> moe::combine; run one
// by one they give the bits of moe::forward.
//
// Experts run in two parallel phases over a tile list built from the
// dispatch plan: (1) H = silu(X gateᵀ) * (X upᵀ) tiled over (expert, rows,
// F columns), (2) Y = H downᵀ tiled over (expert, rows, d columns). Tile
// sizes come from the problem (rows, weight bytes), never from the thread
// count or the executor, and every output element has one writer computed
// in a fixed order, so the output is bit-identical for any executor and
// thread count. Nothing allocates after the workspace is made; every input
// is checked (kdial::error naming it) before anything the caller owns is
// written.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <span>

#include "../combine/combine.hpp"
#include "../core/error.hpp"
#include "../core/extent.hpp"
#include "../core/views.hpp"
#include "../dispatch/plan.hpp"
#include "../experts/expert_set.hpp"
#include "../kernels/dense.hpp"
#include "../kernels/linear.hpp"
#include "../parallel/for_each.hpp"
#include "../routing/policy.hpp"
#include "../routing/router.hpp"

namespace kdial {

// The optional shared expert: a one-expert set of width Fs and its gate.
struct shared_expert {
    expert_set expert; // size 1: gate/up [Fs, d], down [d, Fs]
    any_weight_view gate {}; // [1, d] sigmoid gate weight, or a null view (factor 1)
};

// The sizes a workspace is made for.
struct moe_shape {
    std::size_t max_tokens = 0; // most tokens per call
    int max_k = 0; // k budget: a call may route T * k <= max_tokens * max_k assignments
    std::size_t experts = 0; // E
    std::size_t hidden = 0; // d
    std::size_t ffn = 0; // F, the widest routed expert of the layers sharing the workspace
    std::size_t shared_ffn = 0; // Fs, the widest shared expert (0: none)

    std::size_t max_slots() const noexcept { return max_tokens * std::size_t(max_k); }
};

// One MoE layer's weights (see the header comment).
class moe_weights {
public:
    // Validates every shape, naming the tensor. router [E, d] in any weight
    // format; routing.selection_bias (if any) must outlive the weights.
    moe_weights(any_weight_view router, expert_set experts, router_options routing = {},
        std::optional<shared_expert> shared = std::nullopt)
        : router_(router)
        , experts_(std::move(experts))
        , routing_(routing)
        , shared_(std::move(shared))
    {
        constexpr const char* where = "kdial::moe_weights";
        const std::size_t E = rows_of(router_), d = cols_of(router_);
        detail::check(!experts_.empty(), where, ": no experts");
        detail::check(E == experts_.size(), where, ": router weight has ", E, " rows but there are ", experts_.size(),
            " experts");
        detail::check(E >= 1 && E <= std::size_t(max_experts), where, ": expert count E = ", E, " outside [1, ",
            max_experts, "]");
        std::visit([&](const auto& w) { detail::check_weight_shape(w, E, d, where, "router weight"); }, router_);
        detail::check(
            experts_.hidden() == d, where, ": experts have hidden size ", experts_.hidden(), ", router weight has ", d);
        detail::check_router_options(routing_, E, where);
        if (shared_) {
            detail::check(shared_->expert.size() == 1, where, ": shared expert set has ", shared_->expert.size(),
                " experts, expected 1");
            detail::check(shared_->expert.hidden() == d, where, ": shared expert has hidden size ",
                shared_->expert.hidden(), ", expected d = ", d);
            if (has_shared_gate())
                std::visit([&](const auto& g) { detail::check_weight_shape(g, 1, d, where, "shared expert gate"); },
                    shared_->gate);
        }
    }
    // The same with an f32 router given as a matrix view.
    moe_weights(cmatrix_view<float> router, expert_set experts, router_options routing = {},
        std::optional<shared_expert> shared = std::nullopt)
        : moe_weights(any_weight_view(detail::as_weight(router)), std::move(experts), routing, std::move(shared))
    {
    }

    std::size_t hidden() const noexcept { return cols_of(router_); } // d
    std::size_t num_experts() const noexcept { return rows_of(router_); } // E
    std::size_t ffn() const noexcept { return experts_.ffn(); } // F
    std::size_t shared_ffn() const noexcept { return shared_ ? shared_->expert.ffn() : 0; } // Fs
    const any_weight_view& router() const noexcept { return router_; }
    const expert_set& experts() const noexcept { return experts_; }
    const router_options& routing() const noexcept { return routing_; }
    const std::optional<shared_expert>& shared() const noexcept { return shared_; }
    bool has_shared_expert() const noexcept { return shared_.has_value(); }
    bool has_shared_gate() const noexcept
    {
        return shared_ && std::visit([](const auto& g) { return g.data != nullptr; }, shared_->gate);
    }

    // A copy with other routing options (e.g. renormalisation turned on
    // when k is lowered on a model trained without it).
    moe_weights with_routing(const router_options& routing) const
    {
        return moe_weights(router_, experts_, routing, shared_);
    }

    // The workspace shape for up to max_tokens tokens at k <= max_k.
    moe_shape shape(std::size_t max_tokens, int max_k) const noexcept
    {
        return { max_tokens, max_k, num_experts(), hidden(), ffn(), shared_ffn() };
    }

private:
    any_weight_view router_;
    expert_set experts_;
    router_options routing_;
    std::optional<shared_expert> shared_;
};

namespace detail {
struct moe_stages;

// n rows cut into count = ceil(n / max_rows) near-equal chunks, the first
// n % count of them one row longer: the tile scheduler's row chunks
// (moe_stages::add_tiles), which distributed/ reproduces to keep one
// process's bits.
struct near_equal_chunks {
    std::size_t count, base, extra;
    near_equal_chunks(std::size_t n, std::size_t max_rows) noexcept
        : count((n + max_rows - 1) / max_rows)
        , base(count ? n / count : 0)
        , extra(count ? n % count : 0)
    {
    }
    // First row and row count of chunk j < count.
    std::size_t begin(std::size_t j) const noexcept { return j * base + std::min(j, extra); }
    std::size_t rows(std::size_t j) const noexcept { return base + (j < extra ? 1 : 0); }
    // The chunk that holds row g < n.
    std::size_t of(std::size_t g) const noexcept
    {
        const std::size_t long_rows = extra * (base + 1);
        return g < long_rows ? g / (base + 1) : extra + (g - long_rows) / base;
    }
};

// The rows one expert phase reads: x [n, K] as floats and, for
// act_mode::int8 on weights with integer dots (has_qdot), the same rows
// quantised once by the caller (quantize_act_rows), or an unbound q (its
// q null): the exact path on x. moe::run_experts and the distributed
// shared expert run every expert through the two calls below, so one
// process and many get the same kernels on the same rows.
struct expert_rows {
    cmatrix_view<float> x;
    act_q8_cview q {};

    expert_rows sub_rows(std::size_t r, std::size_t n) const noexcept
    {
        return { x.sub_rows(r, n), q.q ? q.sub_rows(r, n) : act_q8_cview {} };
    }
};

// Phase 1 of expert e of `set` on rows `in`, columns [c0, c1):
// h[:, c0:c1] = silu(x gateᵀ) * (x upᵀ) (h [n, F]); the integer dots when
// in.q is bound, exact otherwise. Other columns of h are not touched.
inline void expert_gate_up(const expert_set& set, std::size_t e, const expert_rows& in, std::size_t c0, std::size_t c1,
    matrix_view<float> h) noexcept
{
    set.visit([&](const auto& list) {
        const auto& ew = list[e];
        using W = typename std::decay_t<decltype(ew.gate)>::format;
        if constexpr (qdot_weight<W>)
            if (in.q.q)
                return swiglu_gate_up_q8act(ew.gate, ew.up, in.q, c0, c1, h);
        swiglu_gate_up(ew.gate, ew.up, in.x, c0, c1, h);
    });
}

// Phase 2 of expert e of `set` on its phase-1 output `in` (H [n, F]),
// columns [c0, c1): y[:, c0:c1] = H downᵀ (y [n, d]), as expert_gate_up.
inline void expert_down(const expert_set& set, std::size_t e, const expert_rows& in, std::size_t c0, std::size_t c1,
    matrix_view<float> y) noexcept
{
    set.visit([&](const auto& list) {
        const auto& dw = list[e].down;
        using W = typename std::decay_t<decltype(dw)>::format;
        if constexpr (qdot_weight<W>)
            if (in.q.q)
                return linear_q8act(dw, in.q, c0, c1, y);
        linear(dw, in.x, c0, c1, y);
    });
}
} // namespace detail

// The scratch of one stream (see the header comment).
class moe_workspace {
public:
    static constexpr std::size_t alignment = 64;

    // Bytes a workspace of this shape needs (each array 64-byte aligned).
    static std::size_t bytes_needed(const moe_shape& s)
    {
        check_shape(s);
        return layout(s).total;
    }

    // A workspace that owns its memory (one allocation, here).
    explicit moe_workspace(const moe_shape& s)
        : shape_(s)
    {
        check_shape(s);
        const std::size_t n = layout(s).total;
        own_.reset(static_cast<std::byte*>(::operator new (n, std::align_val_t { alignment })));
        bind(own_.get());
    }

    // A workspace laid on caller memory: at least bytes_needed(s) bytes,
    // 64-byte aligned, outliving the workspace. Allocates nothing.
    moe_workspace(const moe_shape& s, std::span<std::byte> memory)
        : shape_(s)
    {
        constexpr const char* where = "kdial::moe_workspace";
        check_shape(s);
        const std::size_t n = layout(s).total;
        detail::check(memory.size() >= n, where, ": memory has ", memory.size(), " bytes, the shape needs ", n);
        detail::check(reinterpret_cast<std::uintptr_t>(memory.data()) % alignment == 0, where,
            ": memory is not aligned to ", alignment, " bytes");
        bind(memory.data());
    }

    moe_workspace(const moe_workspace&) = delete;
    moe_workspace& operator=(const moe_workspace&) = delete;
    moe_workspace(moe_workspace&&) noexcept = default;
    moe_workspace& operator=(moe_workspace&&) noexcept = default;

    // Which stage the workspace's state has reached (each stage needs the
    // one before it, on the same T).
    enum class stage { empty, routed, dispatched, computed };
    stage state() const noexcept { return stage_; }

    const moe_shape& shape() const noexcept { return shape_; }
    // How the experts treat the activations of q8 / q4_0 / q4_k weights
    // (kernels/qdot.hpp), at any row count: exact (the default) or int8. With
    // int8 each call quantises the gathered expert rows (and the shared
    // expert's X) once, and each expert's H once, into the workspace, shared
    // by every column tile. Applies to every later call on this workspace.
    void set_act_mode(act_mode a) noexcept { act_ = a; }
    act_mode act() const noexcept { return act_; }
    // Largest k a call with T tokens may use.
    int max_k(std::size_t T = 1) const noexcept
    {
        return int(std::min(shape_.experts, shape_.max_slots() / std::max<std::size_t>(1, T)));
    }

    // The state of the last call, valid after the stage that makes it.
    // After moe::route: the tokens T, the routing's columns kc, and
    std::size_t tokens() const noexcept { return T_; }
    std::size_t columns() const noexcept { return kc_; }
    //   router logits [T, E] (empty for a given_routing),
    cmatrix_view<float> logits() const noexcept { return { logits_, has_logits_ ? T_ : 0, shape_.experts }; }
    //   expert ids [T, kc] (no_expert past a token's kept count),
    cmatrix_view<std::int32_t> ids() const noexcept { return { ids_, T_, kc_ }; }
    //   their weights [T, kc],
    cmatrix_view<float> routing_weights() const noexcept { return { weights_, T_, kc_ }; }
    //   experts each token kept [T].
    std::span<const int> kept() const noexcept { return { kept_, T_ }; }
    // After moe::dispatch: the plan, and each slot's input row [slots, d].
    const dispatch_plan& plan() const noexcept { return plan_; }
    std::size_t assignments() const noexcept { return stage_ >= stage::dispatched ? plan_.num_slots() : 0; }
    cmatrix_view<float> expert_inputs() const noexcept { return { xs_, slots(), shape_.hidden }; }
    // Each slot's expert output [slots, d]: written by moe::run_experts (or
    // by an engine's own experts, then moe::mark_experts_done), read by
    // moe::combine.
    matrix_view<float> expert_outputs() noexcept { return { ys_, slots(), shape_.hidden }; }
    cmatrix_view<float> expert_outputs() const noexcept { return { ys_, slots(), shape_.hidden }; }

    // Most rows of a tile's row chunk: an expert's n rows (and the shared
    // expert's T) run in detail::near_equal_chunks(n, gemm_rows).
    static constexpr std::size_t gemm_rows = 512;

private:
    friend struct detail::moe_stages;

    struct tile {
        std::int32_t expert; // [0, E) routed, E = shared expert
        std::uint32_t r0, r1; // rows within the expert's block
        std::uint32_t c0, c1; // output columns
    };

    // Smallest column chunk of a tile.
    static constexpr std::size_t min_cols = 16;

    static void check_shape(const moe_shape& s)
    {
        constexpr const char* where = "kdial::moe_workspace";
        detail::check(s.max_tokens >= 1, where, ": max_tokens must be >= 1");
        detail::check(s.max_k >= 1, where, ": max_k = ", s.max_k, " must be >= 1");
        detail::check(s.experts >= 1 && s.experts <= std::size_t(max_experts), where, ": expert count E = ", s.experts,
            " outside [1, ", max_experts, "]");
        detail::check(s.hidden >= 1 && s.ffn >= 1, where, ": hidden size d = ", s.hidden, " and FFN size F = ", s.ffn,
            " must be >= 1");
    }

    // Upper bounds of the tile lists: every expert with rows has at most
    // 1 + n / gemm_rows row chunks, each cut into columns of >= min_cols.
    static std::size_t max_tiles(std::size_t row_chunks, std::size_t cols) noexcept
    {
        return row_chunks * ((cols + min_cols - 1) / min_cols);
    }

    struct layout_t {
        std::size_t logits, ids, weights, kept, plan, xs, h, ys, hs, s, gate, up, down, xq, hq, xsq, hsq, total;
        std::size_t n_up, n_down;
    };
    static layout_t layout(const moe_shape& s) noexcept
    {
        const std::size_t T = s.max_tokens, E = s.experts, slots = s.max_slots(), d = s.hidden, F = s.ffn,
                          Fs = s.shared_ffn;
        layout_t l {};
        std::size_t off = 0;
        auto take = [&](std::size_t bytes) {
            const std::size_t at = off;
            off += (bytes + alignment - 1) / alignment * alignment;
            return at;
        };
        l.logits = take(T * E * sizeof(float));
        l.ids = take(slots * sizeof(std::int32_t));
        l.weights = take(slots * sizeof(float));
        l.kept = take(T * sizeof(int));
        l.plan = take(dispatch_plan::storage_size(T, int(E), int(slots), slots) * sizeof(std::int32_t));
        l.xs = take(slots * d * sizeof(float));
        l.h = take(slots * F * sizeof(float));
        l.ys = take(slots * d * sizeof(float));
        l.hs = take(T * Fs * sizeof(float));
        l.s = take(Fs ? T * d * sizeof(float) : 0);
        l.gate = take(T * sizeof(float));
        const std::size_t routed_chunks = E + slots / gemm_rows, shared_chunks = Fs ? T / gemm_rows + 1 : 0;
        l.n_up = max_tiles(routed_chunks, F) + max_tiles(shared_chunks, Fs);
        l.n_down = max_tiles(routed_chunks + shared_chunks, d);
        l.up = take(l.n_up * sizeof(tile));
        l.down = take(l.n_down * sizeof(tile));
        // act_mode::int8: X, H (routed rows) and X, H (shared expert) quantised.
        l.xq = take(act_q8_bytes(slots, d));
        l.hq = take(act_q8_bytes(slots, F));
        l.xsq = take(Fs ? act_q8_bytes(T, d) : 0);
        l.hsq = take(Fs ? act_q8_bytes(T, Fs) : 0);
        l.total = off;
        return l;
    }

    void bind(std::byte* p)
    {
        const layout_t l = layout(shape_);
        logits_ = reinterpret_cast<float*>(p + l.logits);
        ids_ = reinterpret_cast<std::int32_t*>(p + l.ids);
        weights_ = reinterpret_cast<float*>(p + l.weights);
        kept_ = reinterpret_cast<int*>(p + l.kept);
        xs_ = reinterpret_cast<float*>(p + l.xs);
        h_ = reinterpret_cast<float*>(p + l.h);
        ys_ = reinterpret_cast<float*>(p + l.ys);
        hs_ = reinterpret_cast<float*>(p + l.hs);
        s_ = reinterpret_cast<float*>(p + l.s);
        gate_ = reinterpret_cast<float*>(p + l.gate);
        up_ = reinterpret_cast<tile*>(p + l.up);
        down_ = reinterpret_cast<tile*>(p + l.down);
        xq_ = p + l.xq;
        hq_ = p + l.hq;
        xsq_ = p + l.xsq;
        hsq_ = p + l.hsq;
        cap_up_ = l.n_up;
        cap_down_ = l.n_down;
        const std::size_t slots = shape_.max_slots();
        plan_ = dispatch_plan(shape_.max_tokens, int(shape_.experts), int(slots), slots,
            std::span<std::int32_t>(reinterpret_cast<std::int32_t*>(p + l.plan),
                dispatch_plan::storage_size(shape_.max_tokens, int(shape_.experts), int(slots), slots)));
    }

    std::size_t slots() const noexcept { return stage_ >= stage::dispatched ? plan_.num_slots() : 0; }

    struct aligned_delete {
        void operator()(std::byte* p) const noexcept { ::operator delete (p, std::align_val_t { alignment }); }
    };

    moe_shape shape_;
    std::unique_ptr<std::byte[], aligned_delete> own_;
    float *logits_ = nullptr, *weights_ = nullptr, *xs_ = nullptr, *h_ = nullptr, *ys_ = nullptr, *hs_ = nullptr,
          *s_ = nullptr, *gate_ = nullptr;
    std::int32_t* ids_ = nullptr;
    int* kept_ = nullptr;
    tile *up_ = nullptr, *down_ = nullptr;
    std::byte *xq_ = nullptr, *hq_ = nullptr, *xsq_ = nullptr, *hsq_ = nullptr;
    std::size_t cap_up_ = 0, cap_down_ = 0, n_up_ = 0, n_down_ = 0;
    dispatch_plan plan_;
    std::size_t T_ = 0, kc_ = 0;
    bool has_logits_ = false;
    stage stage_ = stage::empty;
    act_mode act_ = act_mode::exact;
};

namespace detail {

// The stages' bodies, with access to the workspace.
struct moe_stages {
    using tile = moe_workspace::tile;
    // Target work per tile: 256 KiB of weights (GEMV) or 4 MFLOP (GEMM).
    static constexpr std::size_t tile_bytes = std::size_t { 256 } << 10;
    static constexpr std::size_t tile_flops = std::size_t { 4 } << 20;

    // The workspace fits the weights.
    static void check_fit(const moe_weights& w, const moe_workspace& ws, const char* where)
    {
        const moe_shape& s = ws.shape();
        check(s.experts == w.num_experts() && s.hidden == w.hidden() && s.ffn >= w.ffn()
                && s.shared_ffn >= w.shared_ffn(),
            where, ": workspace (E ", s.experts, ", d ", s.hidden, ", F ", s.ffn, ", Fs ", s.shared_ffn,
            ") does not fit this layer (E ", w.num_experts(), ", d ", w.hidden(), ", F ", w.ffn(), ", Fs ",
            w.shared_ffn(), ")");
    }

    static void check_x(const moe_weights& w, const moe_workspace& ws, cmatrix_view<float> X, const char* where)
    {
        check(X.rows <= ws.shape().max_tokens, where, ": T = ", X.rows,
            " exceeds the workspace's max_tokens = ", ws.shape().max_tokens);
        check_shape(X, X.rows, w.hidden(), where, "X");
    }

    // Validates a route call; returns the routing's columns.
    template <routing_policy P>
    static int check_route(
        const moe_weights& w, const moe_workspace& ws, cmatrix_view<float> X, const P& policy, const char* where)
    {
        check_fit(w, ws, where);
        check_x(w, ws, X, where);
        const int kc = check_policy(policy, X.rows, w.num_experts(), where);
        check(std::size_t(kc) * X.rows <= ws.shape().max_slots(), where, ": T * k = ", X.rows, " * ", kc,
            " exceeds the workspace's ", ws.shape().max_slots(), " slots");
        return kc;
    }

    template <routing_policy P>
    static void route(const moe_weights& w, moe_workspace& ws, cmatrix_view<float> X, const P& policy, int kc,
        executor_ref ex, const char* where)
    {
        const std::size_t T = X.rows, E = w.num_experts(), k = std::size_t(kc);
        const matrix_view<float> logits(ws.logits_, T, E);
        ws.stage_ = moe_workspace::stage::empty;
        if constexpr (!std::same_as<P, given_routing>) {
            router_logits_unchecked(X, w.router(), logits, ex);
            check_logits_finite(cmatrix_view<float>(logits), where);
        }
        route_policy(cmatrix_view<float>(logits), policy, kc, w.routing(), matrix_view<std::int32_t>(ws.ids_, T, k),
            matrix_view<float>(ws.weights_, T, k), std::span<int>(ws.kept_, T), ex);
        ws.T_ = T;
        ws.kc_ = k;
        ws.has_logits_ = !std::same_as<P, given_routing>;
        ws.stage_ = moe_workspace::stage::routed;
    }

    static void check_stage(
        const moe_workspace& ws, moe_workspace::stage need, std::size_t T, const char* where, const char* before)
    {
        check(ws.stage_ >= need, where, ": the workspace holds no ", before, " (call the stages in order)");
        check(T == ws.T_, where, ": ", T, " rows given, the workspace's routing has T = ", ws.T_);
    }

    // Columns per tile for an output of `cols` columns whose column costs
    // `col_bytes` weight bytes and, with n rows, n * col_flops FLOPs.
    static std::size_t col_chunk(std::size_t cols, std::size_t n, std::size_t col_bytes, std::size_t col_flops)
    {
        std::size_t c;
        if (n <= gemv_max_rows) {
            c = std::max(moe_workspace::min_cols,
                tile_bytes / std::max<std::size_t>(1, col_bytes) / moe_workspace::min_cols * moe_workspace::min_cols);
        } else {
            // Multiples of 64 keep the GEMM's packed panels full.
            const std::size_t f = std::max<std::size_t>(1, n * col_flops);
            c = std::max<std::size_t>(64, (tile_flops / f + 63) / 64 * 64);
        }
        return std::min(c, cols);
    }

    // An expert's n rows are cut into ceil(n / gemm_rows) near-equal row
    // chunks (a hot expert, holding most of the tokens, is split by rows as
    // well as by columns, so it spreads over every thread); each chunk of an
    // expert with n > gemm_rows holds more than small_max_rows rows, so it
    // stays on the GEMM path and its rows get the bits of one unsplit call.
    static void add_tiles(tile* tiles, std::size_t& count, std::int32_t e, std::size_t n, std::size_t cols,
        std::size_t col_bytes, std::size_t col_flops)
    {
        static_assert(moe_workspace::gemm_rows / 2 > small_max_rows);
        if (n == 0)
            return;
        const near_equal_chunks rc(n, moe_workspace::gemm_rows);
        for (std::size_t j = 0; j < rc.count; ++j) {
            const std::size_t r0 = rc.begin(j), r1 = r0 + rc.rows(j);
            const std::size_t cc = col_chunk(cols, r1 - r0, col_bytes, col_flops);
            for (std::size_t c0 = 0; c0 < cols; c0 += cc)
                tiles[count++] = { e, std::uint32_t(r0), std::uint32_t(r1), std::uint32_t(c0),
                    std::uint32_t(std::min(cols, c0 + cc)) };
        }
    }

    // Largest tiles first (cost ~ rows x columns; ties in list order by
    // expert, rows, columns: a total order, so the list is the same on every
    // run). The executor starts the big tiles early and the small ones fill
    // the end; which thread runs a tile never changes its bits. In place, no
    // allocation.
    static void order_tiles(tile* tiles, std::size_t count) noexcept
    {
        std::sort(tiles, tiles + count, [](const tile& a, const tile& b) {
            const std::uint64_t ca = std::uint64_t(a.r1 - a.r0) * (a.c1 - a.c0);
            const std::uint64_t cb = std::uint64_t(b.r1 - b.r0) * (b.c1 - b.c0);
            if (ca != cb)
                return ca > cb;
            if (a.expert != b.expert)
                return a.expert < b.expert;
            return a.r0 != b.r0 ? a.r0 < b.r0 : a.c0 < b.c0;
        });
    }

    // Approximate bytes per weight, for tile sizing only (4-bit formats
    // count as 1: their tiles hold half the bytes of the others).
    static std::size_t bytes_per_weight(dtype t) noexcept
    {
        return t == dtype::f32 ? 4 : t == dtype::q8 || t == dtype::q4_0 || t == dtype::q4_k ? 1 : 2;
    }

    static void build_tiles(const moe_weights& w, moe_workspace& ws, std::size_t T)
    {
        ws.n_up_ = ws.n_down_ = 0;
        const std::size_t d = w.hidden(), F = w.ffn();
        const std::size_t wb = bytes_per_weight(w.experts().type());
        const auto counts = ws.plan_.counts();
        for (std::size_t e = 0; e < counts.size(); ++e) {
            const std::size_t n = std::size_t(counts[e]);
            add_tiles(ws.up_, ws.n_up_, std::int32_t(e), n, F, 2 * d * wb, 4 * d);
            add_tiles(ws.down_, ws.n_down_, std::int32_t(e), n, d, F * wb, 2 * F);
        }
        if (w.has_shared_expert() && T > 0) {
            const std::size_t Fs = w.shared_ffn();
            const std::size_t sb = bytes_per_weight(w.shared()->expert.type());
            add_tiles(ws.up_, ws.n_up_, std::int32_t(counts.size()), T, Fs, 2 * d * sb, 4 * d);
            add_tiles(ws.down_, ws.n_down_, std::int32_t(counts.size()), T, d, Fs * sb, 2 * Fs);
        }
        KDIAL_ASSERT(ws.n_up_ <= ws.cap_up_ && ws.n_down_ <= ws.cap_down_);
        order_tiles(ws.up_, ws.n_up_);
        order_tiles(ws.down_, ws.n_down_);
    }

    static void dispatch(const moe_weights& w, moe_workspace& ws, cmatrix_view<float> X, executor_ref ex)
    {
        const std::size_t T = X.rows;
        ws.plan_.build(cmatrix_view<std::int32_t>(ws.ids_, T, ws.kc_));
        ws.stage_ = moe_workspace::stage::dispatched;
        gather(ws.plan_, X, matrix_view<float>(ws.xs_, ws.plan_.num_slots(), w.hidden()), ex);
        build_tiles(w, ws, T);
    }

    static void run_experts(const moe_weights& w, moe_workspace& ws, cmatrix_view<float> X, executor_ref ex)
    {
        const std::size_t T = X.rows, d = w.hidden(), E = w.num_experts(), F = w.ffn(), Fs = w.shared_ffn();
        const std::size_t slots = ws.plan_.num_slots();
        const matrix_view<float> xs(ws.xs_, slots, d), h(ws.h_, slots, F), ys(ws.ys_, slots, d);
        const matrix_view<float> hs(ws.hs_, Fs ? T : 0, Fs), s(ws.s_, Fs ? T : 0, d);
        if (w.has_shared_gate())
            router_logits_unchecked(X, w.shared()->gate, matrix_view<float>(ws.gate_, T, 1), ex);
        const auto offsets = ws.plan_.offsets();
        const expert_set& experts = w.experts();
        const expert_set* shared = w.has_shared_expert() ? &w.shared()->expert : nullptr;
        // act_mode::int8 on 8- and 4-bit weights: every row quantised once
        // (X before phase 1, H between the phases), shared by all tiles; an
        // unbound view (the exact path) otherwise.
        const bool int8 = ws.act_ == act_mode::int8;
        const bool qr = int8 && has_qdot(experts.type()), qs = int8 && shared && has_qdot(shared->type());
        const auto quantised = [&](bool q, std::byte* mem, cmatrix_view<float> x) {
            act_q8_view v {};
            if (q) {
                v = bind_act_q8(mem, x.rows, x.cols);
                quantize_act_rows(ex, x, v);
            }
            return v;
        };
        // One phase over its tile list: f (expert_gate_up or expert_down) on
        // each tile, a routed expert's tile on its block of the slot rows (in
        // -> out), the shared expert's on the rows of X (in_s -> out_s).
        const auto phase = [&](const tile* tiles, std::size_t count, auto f, const expert_rows& in,
                               const expert_rows& in_s, matrix_view<float> out, matrix_view<float> out_s) {
            ex.parallel_for(count, [&](std::size_t i) {
                const tile& tl = tiles[i];
                const std::size_t e = std::size_t(tl.expert), n = tl.r1 - tl.r0;
                if (e < E) {
                    const std::size_t r = std::size_t(offsets[e]) + tl.r0;
                    f(experts, e, in.sub_rows(r, n), tl.c0, tl.c1, out.sub_rows(r, n));
                } else
                    f(*shared, 0, in_s.sub_rows(tl.r0, n), tl.c0, tl.c1, out_s.sub_rows(tl.r0, n));
            });
        };
        // Phase 1: gate and up.
        const expert_rows xr { xs, quantised(qr, ws.xq_, xs) }, xsr { X, quantised(qs, ws.xsq_, X) };
        phase(ws.up_, ws.n_up_, expert_gate_up, xr, xsr, h, hs);
        // Phase 2: down.
        const expert_rows hr { h, quantised(qr, ws.hq_, h) }, hsr { hs, quantised(qs, ws.hsq_, hs) };
        phase(ws.down_, ws.n_down_, expert_down, hr, hsr, ys, s);
        ws.stage_ = moe_workspace::stage::computed;
    }

    static void combine(
        const moe_weights& w, const moe_workspace& ws, matrix_view<float> out, combine_mode mode, executor_ref ex)
    {
        const std::size_t T = ws.T_, d = w.hidden();
        shared_expert_term st;
        if (w.has_shared_expert()) {
            st.output = cmatrix_view<float>(ws.s_, T, d);
            if (w.has_shared_gate())
                st.gate_logits = std::span<const float>(ws.gate_, T);
        }
        kdial::combine(ws.plan_, cmatrix_view<float>(ws.weights_, T, ws.kc_),
            cmatrix_view<float>(ws.ys_, ws.plan_.num_slots(), d), out, st, mode, ex);
    }

    static void mark_experts_done(moe_workspace& ws) { ws.stage_ = moe_workspace::stage::computed; }
};

} // namespace detail

namespace moe {

// Stage 1. Router logits (unless the policy is a given_routing) and the
// routing by `policy` into the workspace: ws.ids(), ws.routing_weights(),
// ws.kept(), ws.logits().
//   X [T, d]  T <= the workspace's max_tokens; T * kc <= its slots
template <routing_policy P>
void route(const moe_weights& w, moe_workspace& ws, cmatrix_view<float> X, const P& policy,
    executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::moe::route";
    const int kc = detail::moe_stages::check_route(w, ws, X, policy, where);
    detail::moe_stages::route(w, ws, X, policy, kc, ex, where);
}

// route() with a run-time k for every token (dynamic_k).
inline void route(
    const moe_weights& w, moe_workspace& ws, cmatrix_view<float> X, int k, executor_ref ex = default_executor {})
{
    route(w, ws, X, dynamic_k { k }, ex);
}

// Stage 2. Groups the routed assignments by expert (the plan, returned: the
// handle an engine sends experts' rows with), copies each slot's input row
// into ws.expert_inputs(), and lays out the expert tiles. X is route's X.
inline const dispatch_plan& dispatch(
    const moe_weights& w, moe_workspace& ws, cmatrix_view<float> X, executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::moe::dispatch";
    detail::moe_stages::check_fit(w, ws, where);
    detail::moe_stages::check_x(w, ws, X, where);
    detail::moe_stages::check_stage(ws, moe_workspace::stage::routed, X.rows, where, "routing");
    detail::moe_stages::dispatch(w, ws, X, ex);
    return ws.plan();
}

// Stage 3. Runs the experts (and the shared expert, on X) over the tile
// list: ws.expert_inputs() -> ws.expert_outputs(). X is route's X.
inline void run_experts(
    const moe_weights& w, moe_workspace& ws, cmatrix_view<float> X, executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::moe::run_experts";
    detail::moe_stages::check_fit(w, ws, where);
    detail::moe_stages::check_x(w, ws, X, where);
    detail::moe_stages::check_stage(ws, moe_workspace::stage::dispatched, X.rows, where, "plan");
    detail::moe_stages::run_experts(w, ws, X, ex);
}

// For an engine that ran the routed experts itself (it wrote
// ws.expert_outputs() from ws.expert_inputs(), expert e owning slots
// [plan.offsets()[e], plan.offsets()[e + 1])): lets combine run. Layers with
// a shared expert need moe::run_experts.
inline void mark_experts_done(const moe_weights& w, moe_workspace& ws)
{
    constexpr const char* where = "kdial::moe::mark_experts_done";
    detail::check(
        ws.state() >= moe_workspace::stage::dispatched, where, ": the workspace holds no plan (call moe::dispatch)");
    detail::check(!w.has_shared_expert(), where, ": the layer has a shared expert; use moe::run_experts");
    detail::moe_stages::mark_experts_done(ws);
}

// Stage 4. out [T, d] = (or +=, with combine_mode::accumulate) the routed
// experts' outputs weighted by the routing, summed in rank order, plus the
// shared expert's gated output.
inline void combine(const moe_weights& w, const moe_workspace& ws, matrix_view<float> out,
    combine_mode mode = combine_mode::overwrite, executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::moe::combine";
    detail::moe_stages::check_fit(w, ws, where);
    detail::check(ws.state() >= moe_workspace::stage::computed, where,
        ": the workspace holds no expert outputs (call the stages in order)");
    detail::check_shape(out, ws.tokens(), w.hidden(), where, "out");
    detail::moe_stages::combine(w, ws, out, mode, ex);
}

// The whole layer: out = MoE(X) (or out += MoE(X) with accumulate).
//   X   [T, d]  T <= the workspace's max_tokens
//   out [T, d]  untouched if an error is thrown
// Throws kdial::error on shapes, a workspace that does not fit the weights,
// a bad policy (k outside [1, E], a bad rule, ids), T * kc above the
// workspace's slots, or a non-finite router logit.
template <routing_policy P>
void forward(const moe_weights& w, moe_workspace& ws, cmatrix_view<float> X, const P& policy, matrix_view<float> out,
    combine_mode mode = combine_mode::overwrite, executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::moe::forward";
    const int kc = detail::moe_stages::check_route(w, ws, X, policy, where);
    detail::check_shape(out, X.rows, w.hidden(), where, "out");
    detail::moe_stages::route(w, ws, X, policy, kc, ex, where);
    detail::moe_stages::dispatch(w, ws, X, ex);
    detail::moe_stages::run_experts(w, ws, X, ex);
    detail::moe_stages::combine(w, ws, out, mode, ex);
}

// forward() with a run-time k for every token (dynamic_k).
inline void forward(const moe_weights& w, moe_workspace& ws, cmatrix_view<float> X, int k, matrix_view<float> out,
    combine_mode mode = combine_mode::overwrite, executor_ref ex = default_executor {})
{
    forward(w, ws, X, dynamic_k { k }, out, mode, ex);
}

// Weight bytes the workspace's last call streamed: the router, every expert
// that received at least one token, and the shared expert and its gate.
inline std::size_t weight_bytes(const moe_weights& w, const moe_workspace& ws) noexcept
{
    if (ws.tokens() == 0)
        return 0;
    std::size_t used = 0;
    if (ws.assignments() > 0)
        for (auto c : ws.plan().counts())
            used += c > 0;
    std::size_t b = bytes_of(w.router()) + used * w.experts().expert_bytes();
    if (w.has_shared_expert())
        b += w.shared()->expert.expert_bytes() + (w.has_shared_gate() ? bytes_of(w.shared()->gate) : 0);
    return b;
}

} // namespace moe
} // namespace kdial
