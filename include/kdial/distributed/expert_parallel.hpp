// Expert parallelism over MPI: the MoE layer (layer/moe.hpp) across the
// ranks of a communicator. Every rank holds the router, the shared expert
// and its own routed experts (an expert_placement), and its own tokens
// (any T, 0 included). One collective forward per layer:
//   route     the rank's tokens; router rows computed with the kernel path
//             and row count they get in one process (see below);
//   dispatch  the plan over the rank's tokens in wire order (experts sorted
//             by owner), so each destination's rows are one block; one
//             MPI_Allgather of the per-expert counts, one MPI_Alltoallv of
//             the rows. Dropped assignments (no_expert) are never sent; the
//             routing weights and the (token, j) slots stay home: the plan
//             is the handle that combines the returning rows;
//   experts   each rank runs its experts on the rows it received with the
//             layer's tile scheduler (moe::run_experts); expert e's block is
//             in (source rank, token) order: the block one process builds;
//   combine   one MPI_Alltoallv of the outputs back into the source's slot
//             order, then kdial::combine in (token, j) order.
// Result: bit-identical to one process running moe::forward on the tokens
// of all ranks concatenated in rank order, for any rank count, placement
// and thread count. The experts' bits follow from the identical blocks; the
// router and shared expert rows come from kernels whose bits depend on the
// row count of the call (GEMV for <= gemv_max_rows rows, then the small-row
// path, then the GEMM; each of the last two row-count independent), so rows
// of a chunk one process would run are recomputed on a copy padded to the
// same path and row count. With act_mode::int8 (set_act_mode) the q8 /
// q4_0 / q4_k experts, routed and shared, quantise their activations row
// by row and run the integer dots of kernels/qdot.hpp, whose result per
// row depends only on that row: a row sent to another rank gives the bits
// it gives in one process at any row count, so no padding is needed.
// Errors: configurations are checked collectively at construction and
// inputs before any exchange; a failure on one rank throws kdial::error on
// every rank (no hang). Nothing allocates per call.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../layer/moe.hpp"
#include "placement.hpp"

namespace kdial::distributed {

namespace detail {
using kdial::detail::check;

inline void mpi_check(int rc, const char* what)
{
    if (rc != MPI_SUCCESS) {
        char msg[MPI_MAX_ERROR_STRING];
        int n = 0;
        MPI_Error_string(rc, msg, &n);
        throw kdial::error(kdial::detail::cat("kdial::distributed: ", what, " failed: ", std::string(msg, n)));
    }
}

// Every rank learns whether every rank is fine; each throws on failure,
// naming the first failing rank and its message. Collective.
inline void agree(MPI_Comm comm, const std::string& local_error, const char* where)
{
    constexpr std::size_t len = 240;
    int size = 0;
    MPI_Comm_size(comm, &size);
    std::array<char, len> mine {};
    std::strncpy(mine.data(), local_error.c_str(), len - 1);
    std::vector<char> all(std::size_t(size) * len);
    mpi_check(MPI_Allgather(mine.data(), int(len), MPI_CHAR, all.data(), int(len), MPI_CHAR, comm), "MPI_Allgather");
    for (int r = 0; r < size; ++r)
        if (all[std::size_t(r) * len] != 0)
            throw kdial::error(kdial::detail::cat(
                where, ": rank ", r, " of ", size, ": ", std::string(all.data() + std::size_t(r) * len)));
}

// The chunk [c0, c0 + nc) that holds row g when one process cuts a T-row
// call into kdial::detail::near_equal_chunks(T, rows) (moe.hpp's tiles:
// experts and the shared expert; tests/mpi checks a shared expert past
// gemm_rows).
inline std::pair<std::size_t, std::size_t> chunk_of(std::size_t g, std::size_t T, std::size_t rows) noexcept
{
    const kdial::detail::near_equal_chunks rc(T, rows);
    const std::size_t j = rc.of(g);
    return { rc.begin(j), rc.rows(j) };
}

// The pieces of rows [g0, g0 + m) cut at the chunk boundaries of a T-row
// call that one process runs in chunks of about `rows` rows (chunk_of).
// piece: local rows [i, i + n), at offset a in a chunk of nc rows.
struct piece {
    std::size_t i, n, a, nc;
};
template <class F> void for_each_piece(std::size_t g0, std::size_t m, std::size_t T, std::size_t rows, F&& f)
{
    for (std::size_t i = 0; i < m;) {
        const std::size_t g = g0 + i;
        const auto [c0, nc] = chunk_of(g, T, rows);
        const std::size_t a = g - c0, n = std::min(nc - a, m - i);
        f(piece { i, n, a, nc });
        i += n;
    }
}

// Rows of a piece that cannot run alone with the bits of one process: a
// row keeps them when it runs in a call of the same row class on weights of
// type t (kdial::row_class, kernels/linear.hpp; for the GEMV, the same count
// and position).
inline bool needs_padding(const piece& p, dtype t) noexcept
{
    return row_class(p.n, t) != row_class(p.nc, t);
}
// Rows of the padded batch, and where the piece's rows sit in it: a GEMV
// chunk is rebuilt whole (zeros in the other rows); a small-row or GEMM one
// is padded to the fewest rows of its class.
inline std::size_t padded_rows(const piece& p, dtype t) noexcept
{
    return p.nc <= gemv_max_rows ? p.nc : p.nc <= small_max_rows_of(t) ? gemv_max_rows + 1 : small_max_rows_of(t) + 1;
}
inline std::size_t padded_at(const piece& p) noexcept
{
    return p.nc <= gemv_max_rows ? p.a : 0;
}
inline constexpr std::size_t max_padded_rows = small_max_rows + 1;

// Y rows = f(X rows) for this rank's rows [g0, g0 + X.rows) of a T-row call
// that one process runs in chunks of about `rows` rows, each row with that call's
// bits. f(xb, yb) is a row-wise kernel call (linear, an FFN) on weights of
// type t.
template <class F>
void rows_as_one_process(cmatrix_view<float> X, std::size_t g0, std::size_t T, std::size_t rows, matrix_view<float> Y,
    dtype t, float* pad_x, float* pad_y, F&& f)
{
    const std::size_t d = X.cols, o = Y.cols;
    for_each_piece(g0, X.rows, T, rows, [&](const piece& p) {
        if (!needs_padding(p, t)) {
            f(X.sub_rows(p.i, p.n), Y.sub_rows(p.i, p.n));
            return;
        }
        const std::size_t nb = padded_rows(p, t), at = padded_at(p);
        std::fill(pad_x, pad_x + nb * d, 0.0f);
        for (std::size_t r = 0; r < p.n; ++r)
            std::memcpy(pad_x + (at + r) * d, X.row(p.i + r), d * sizeof(float));
        f(cmatrix_view<float>(pad_x, nb, d), matrix_view<float>(pad_y, nb, o));
        for (std::size_t r = 0; r < p.n; ++r)
            std::memcpy(Y.row(p.i + r), pad_y + (at + r) * o, o * sizeof(float));
    });
}

inline double now()
{
    return MPI_Wtime();
}

struct ep_stages;

} // namespace detail

// One MoE layer's weights on one rank: the router [E, d] (every rank), this
// rank's routed experts (placement.experts_of(rank), in that order), the
// routing options and the optional shared expert (every rank). Views, as in
// moe_weights. Construction is collective: E, d, F, Fs, the formats, the
// routing options and the placement must agree on every rank, else every
// rank throws kdial::error naming the first field that differs.
class ep_weights {
public:
    ep_weights(MPI_Comm comm, expert_placement placement, any_weight_view router, expert_set local_experts,
        router_options routing = {}, std::optional<shared_expert> shared = std::nullopt)
        : comm_(comm)
        , placement_(std::move(placement))
        , router_(router)
        , routing_(routing)
        , shared_(std::move(shared))
    {
        constexpr const char* where = "kdial::distributed::ep_weights";
        MPI_Comm_rank(comm, &rank_);
        MPI_Comm_size(comm, &size_);
        std::string err;
        try {
            const std::size_t E = rows_of(router_), d = cols_of(router_);
            kdial::detail::check(placement_.ranks() == size_, where, ": placement is for ", placement_.ranks(),
                " ranks, the communicator has ", size_);
            kdial::detail::check(placement_.num_experts() == E, where, ": placement has ", placement_.num_experts(),
                " experts, the router weight ", E, " rows");
            kdial::detail::check(E >= 1 && E <= std::size_t(max_experts), where, ": expert count E = ", E,
                " outside [1, ", max_experts, "]");
            const std::size_t n_local = placement_.count(rank_);
            kdial::detail::check(local_experts.size() == n_local, where, ": rank ", rank_, " holds ",
                local_experts.size(), " experts, the placement gives it ", n_local);
            if (n_local > 0) {
                kdial::detail::check(local_experts.hidden() == d, where, ": experts have hidden size ",
                    local_experts.hidden(), ", router weight has ", d);
                F_ = local_experts.ffn();
                type_ = local_experts.type();
                // The local experts as a layer of their own (a zero router:
                // it is never run, rows arrive with a given routing).
                dummy_router_ = std::make_shared<std::vector<float>>(n_local * d, 0.0f);
                local_.emplace(cmatrix_view<float>(dummy_router_->data(), n_local, d), std::move(local_experts));
            }
            // Validates the router, shared expert and options as one process would.
            std::visit(
                [&](const auto& w) { kdial::detail::check_weight_shape(w, E, d, where, "router weight"); }, router_);
            kdial::detail::check_router_options(routing_, E, where);
            if (shared_) {
                kdial::detail::check(shared_->expert.size() == 1, where, ": shared expert set has ",
                    shared_->expert.size(), " experts, expected 1");
                kdial::detail::check(shared_->expert.hidden() == d, where, ": shared expert has hidden size ",
                    shared_->expert.hidden(), ", expected d = ", d);
                if (has_shared_gate())
                    std::visit(
                        [&](const auto& g) { kdial::detail::check_weight_shape(g, 1, d, where, "shared expert gate"); },
                        shared_->gate);
            }
        } catch (const kdial::error& e) {
            err = e.what();
        }
        detail::agree(comm_, err, where);
        check_agreement();
    }

    MPI_Comm comm() const noexcept { return comm_; }
    int rank() const noexcept { return rank_; }
    int ranks() const noexcept { return size_; }
    const expert_placement& placement() const noexcept { return placement_; }
    std::size_t hidden() const noexcept { return cols_of(router_); } // d
    std::size_t num_experts() const noexcept { return rows_of(router_); } // E
    std::size_t ffn() const noexcept { return F_; } // F (0 on a rank without experts)
    std::size_t shared_ffn() const noexcept { return shared_ ? shared_->expert.ffn() : 0; } // Fs
    std::size_t local_count() const noexcept { return placement_.count(rank_); }
    const any_weight_view& router() const noexcept { return router_; }
    const router_options& routing() const noexcept { return routing_; }
    const std::optional<shared_expert>& shared() const noexcept { return shared_; }
    bool has_shared_gate() const noexcept
    {
        return shared_ && std::visit([](const auto& g) { return g.data != nullptr; }, shared_->gate);
    }
    // The local experts as a moe_weights (router unused); empty on a rank
    // that holds none.
    const std::optional<moe_weights>& local() const noexcept { return local_; }

private:
    // Fields every rank must agree on, gathered and compared (collective).
    void check_agreement() const
    {
        static constexpr const char* names[]
            = { "expert count E", "hidden size d", "expert FFN size F", "expert weight format", "router weight format",
                  "shared expert FFN size Fs", "shared expert format", "shared expert gate", "routing scoring",
                  "routing renormalize", "routing scale (bits)", "routing selection bias", "placement" };
        constexpr std::size_t n = std::size(names);
        std::uint64_t bias = 0;
        for (float b : routing_.selection_bias) {
            std::uint32_t u;
            std::memcpy(&u, &b, 4);
            bias = bias * 1099511628211ull + u + 1;
        }
        std::uint32_t scale;
        std::memcpy(&scale, &routing_.scale, 4);
        const std::uint64_t no = ~std::uint64_t { 0 }; // a rank without experts has no F / format
        const std::array<std::uint64_t, n> mine { num_experts(), hidden(), F_ ? F_ : no,
            local_ ? std::uint64_t(type_) : no, std::uint64_t(type_of(router_)), shared_ffn(),
            shared_ ? std::uint64_t(shared_->expert.type()) : no, has_shared_gate(), std::uint64_t(routing_.score),
            routing_.renormalize, scale, bias, placement_.hash() };
        std::vector<std::uint64_t> all(n * std::size_t(size_));
        detail::mpi_check(
            MPI_Allgather(mine.data(), int(n), MPI_UINT64_T, all.data(), int(n), MPI_UINT64_T, comm_), "MPI_Allgather");
        for (std::size_t f = 0; f < n; ++f) {
            std::uint64_t ref = no;
            int ref_rank = -1;
            for (int r = 0; r < size_; ++r) {
                const std::uint64_t v = all[std::size_t(r) * n + f];
                if (v == no)
                    continue; // ranks without experts skip F and the format
                if (ref_rank < 0) {
                    ref = v;
                    ref_rank = r;
                } else if (v != ref)
                    throw kdial::error(kdial::detail::cat("kdial::distributed::ep_weights: ranks disagree on the ",
                        names[f], ": ", ref, " on rank ", ref_rank, ", ", v, " on rank ", r));
            }
        }
    }

    MPI_Comm comm_;
    int rank_ = 0, size_ = 1;
    expert_placement placement_;
    any_weight_view router_;
    router_options routing_;
    std::optional<shared_expert> shared_;
    std::size_t F_ = 0;
    dtype type_ = dtype::f32;
    std::shared_ptr<std::vector<float>> dummy_router_;
    std::optional<moe_weights> local_;
};

// Traffic and time of a workspace's forward calls (since the last reset).
struct ep_stats {
    std::size_t calls = 0;
    std::size_t rows_sent = 0; // token rows sent to other ranks (dispatch; the combine returns as many)
    std::size_t bytes_sent = 0; // both exchanges, to other ranks
    double exchange_seconds = 0; // in the counts allgather and both all-to-alls
    double expert_seconds = 0; // running the local experts on received rows
};

// The scratch of one stream on one rank, for layers of one shape (as
// moe_workspace). Made from any layer's weights with up to max_tokens
// tokens per call on this rank, k <= max_k and T * k <= max_slots (default
// max_tokens * max_k); collective (every rank must give the same sizes). A
// rank may receive up to ranks * min(max_slots, max_tokens * local experts)
// rows, and is sized for it.
class ep_workspace {
public:
    ep_workspace(const ep_weights& w, std::size_t max_tokens, int max_k, std::size_t max_slots = 0)
        : comm_(w.comm())
        , rank_(w.rank())
        , size_(w.ranks())
        , T_max_(max_tokens)
        , k_max_(max_k)
    {
        constexpr const char* where = "kdial::distributed::ep_workspace";
        std::string err;
        try {
            kdial::detail::check(max_tokens >= 1, where, ": max_tokens must be >= 1");
            kdial::detail::check(max_k >= 1 && std::size_t(max_k) <= w.num_experts(), where, ": max_k = ", max_k,
                " outside [1, E = ", w.num_experts(), "]");
        } catch (const kdial::error& e) {
            err = e.what();
        }
        detail::agree(comm_, err, where);
        const std::size_t slots = max_slots ? max_slots : max_tokens * std::size_t(std::max(max_k, 1));
        const std::array<std::uint64_t, 3> mine { max_tokens, std::uint64_t(max_k), slots };
        std::vector<std::uint64_t> all(3 * std::size_t(size_));
        detail::mpi_check(
            MPI_Allgather(mine.data(), 3, MPI_UINT64_T, all.data(), 3, MPI_UINT64_T, comm_), "MPI_Allgather");
        for (int r = 0; r < size_; ++r) {
            const std::uint64_t* o = all.data() + 3 * std::size_t(r);
            kdial::detail::check(o[0] == mine[0] && o[1] == mine[1] && o[2] == mine[2], where,
                ": ranks disagree on the workspace: max_tokens ", max_tokens, ", max_k ", max_k, ", max_slots ", slots,
                " on rank ", rank_, "; ", o[0], ", ", o[1], ", ", o[2], " on rank ", r);
        }
        const std::size_t E = w.num_experts(), d = w.hidden(), T = max_tokens;
        const std::size_t Fs = w.shared_ffn();
        slots_ = slots;
        d_ = d;
        E_ = E;
        logits_.resize(T * E);
        ids_.resize(slots);
        wire_ids_.resize(slots);
        weights_.resize(slots);
        kept_.resize(T);
        plan_ = dispatch_plan(T, int(E), max_k, slots);
        xs_.resize(slots * d);
        ys_.resize(slots * d);
        if (Fs) {
            hs_.resize(T * Fs);
            s_.resize(T * d);
            gate_.resize(T);
        }
        const std::size_t pad = detail::max_padded_rows;
        pad_x_.resize(pad * d);
        pad_y_.resize(pad * std::max<std::size_t>(d, 1));
        pad_h_.resize(pad * std::max<std::size_t>(Fs, 1));
        if (Fs) {
            // act_mode::int8: the shared expert's X and H quantised
            // (64-byte aligned, as bind_act_q8 needs).
            const std::size_t xb = act_q8_bytes(T, d), hb = act_q8_bytes(T, Fs);
            q8_mem_.resize(xb + hb + 64);
            std::byte* p = kdial::detail::align_up(q8_mem_.data(), 64);
            xsq_ = bind_act_q8(p, T, d);
            hsq_ = bind_act_q8(p + xb, T, Fs);
        }
        all_counts_.resize(std::size_t(size_) * (E + 1));
        status_.resize(2 * std::size_t(size_));
        scount_.resize(std::size_t(size_));
        sdispl_.resize(std::size_t(size_));
        rcount_.resize(std::size_t(size_));
        rdispl_.resize(std::size_t(size_));
        const std::size_t n_local = w.local_count();
        if (n_local > 0) {
            R_max_ = std::size_t(size_) * std::min(slots, T * n_local);
            xr_.resize(R_max_ * d);
            back_.resize(R_max_ * d);
            rids_.resize(R_max_);
            rweights_.assign(R_max_, 1.0f);
            local_ws_.emplace(w.local()->shape(R_max_, 1));
        }
        detail::mpi_check(MPI_Type_contiguous(int(d), MPI_FLOAT, &row_type_), "MPI_Type_contiguous");
        detail::mpi_check(MPI_Type_commit(&row_type_), "MPI_Type_commit");
    }
    ~ep_workspace()
    {
        if (row_type_ != MPI_DATATYPE_NULL) {
            int finalized = 0;
            MPI_Finalized(&finalized);
            if (!finalized)
                MPI_Type_free(&row_type_);
        }
    }
    ep_workspace(const ep_workspace&) = delete;
    ep_workspace& operator=(const ep_workspace&) = delete;

    std::size_t max_tokens() const noexcept { return T_max_; }
    int max_k() const noexcept { return k_max_; }
    // How the experts (routed and shared) treat the activations of q8 /
    // q4_0 / q4_k weights, as moe_workspace::set_act_mode: exact (the
    // default) or int8; the router and the shared expert's gate stay exact,
    // as in moe::forward. Applies to every later call; give every rank the
    // same mode (not checked: a rank's mode sets the bits of the experts it
    // runs and of its tokens' shared expert).
    void set_act_mode(act_mode a) noexcept
    {
        act_ = a;
        if (local_ws_)
            local_ws_->set_act_mode(a);
    }
    act_mode act() const noexcept { return act_; }
    // The last call's routing of this rank's tokens: ids [T, kc], weights.
    cmatrix_view<std::int32_t> ids() const noexcept { return { ids_.data(), T_, kc_ }; }
    cmatrix_view<float> routing_weights() const noexcept { return { weights_.data(), T_, kc_ }; }
    const ep_stats& stats() const noexcept { return stats_; }
    void reset_stats() noexcept { stats_ = {}; }

private:
    friend struct detail::ep_stages;

    MPI_Comm comm_;
    int rank_, size_;
    std::size_t T_max_;
    int k_max_;
    std::size_t d_ = 0, E_ = 0, R_max_ = 0, slots_ = 0;
    std::vector<float> logits_, weights_, xs_, ys_, hs_, s_, gate_, pad_x_, pad_y_, pad_h_, xr_, back_, rweights_;
    std::vector<std::int32_t> ids_, wire_ids_, rids_;
    std::vector<int> kept_;
    std::vector<std::int64_t> status_;
    std::vector<int> all_counts_, scount_, sdispl_, rcount_, rdispl_;
    std::vector<std::byte> q8_mem_;
    act_q8_view xsq_ {}, hsq_ {}; // [max_tokens, d], [max_tokens, Fs]
    act_mode act_ = act_mode::exact;
    dispatch_plan plan_;
    std::optional<moe_workspace> local_ws_;
    MPI_Datatype row_type_ = MPI_DATATYPE_NULL;
    std::size_t T_ = 0, kc_ = 0;
    ep_stats stats_;
};

namespace detail {

// The body of forward(), with access to the workspace.
struct ep_stages {
    template <routing_policy P>
    static void forward(const ep_weights& w, ep_workspace& ws, cmatrix_view<float> X, const P& policy,
        matrix_view<float> out, combine_mode mode, executor_ref ex)
    {
        constexpr const char* where = "kdial::distributed::forward";
        using kdial::detail::check;
        const std::size_t T = X.rows, d = w.hidden(), E = w.num_experts();
        const int N = ws.size_, me = ws.rank_;
        const expert_placement& pl = w.placement();
        int kc = 0;
        std::string err;
        try {
            kdial::detail::check(ws.d_ == d && ws.E_ == E && ws.hs_.size() >= T * w.shared_ffn()
                    && (w.local_count() == 0 || (ws.local_ws_ && ws.local_ws_->shape().ffn >= w.ffn())),
                where, ": the workspace was made for another layer shape");
            kdial::detail::check(
                T <= ws.T_max_, where, ": T = ", T, " exceeds the workspace's max_tokens = ", ws.T_max_);
            kdial::detail::check_shape(X, T, d, where, "X");
            kdial::detail::check_shape(out, T, d, where, "out");
            kc = kdial::detail::check_policy(policy, T, E, where);
            kdial::detail::check(kc <= ws.k_max_, where, ": k = ", kc, " exceeds the workspace's max_k = ", ws.k_max_);
            kdial::detail::check(T * std::size_t(kc) <= ws.slots_, where, ": T * k = ", T, " * ", kc,
                " exceeds the workspace's ", ws.slots_, " slots");
        } catch (const kdial::error& e) {
            err = e.what();
        }
        double t0 = detail::now();
        // 1. Every rank's T (or a failure), so each knows its rows' place in the
        // concatenated batch.
        const std::int64_t mine[2] = { std::int64_t(T), err.empty() ? 0 : 1 };
        detail::mpi_check(
            MPI_Allgather(mine, 2, MPI_INT64_T, ws.status_.data(), 2, MPI_INT64_T, ws.comm_), "MPI_Allgather");
        for (int r = 0; r < N; ++r)
            if (ws.status_[2 * std::size_t(r) + 1] != 0)
                throw kdial::error(err.empty() ? kdial::detail::cat(where, ": rank ", r, " rejected its input") : err);
        std::size_t g0 = 0, T_all = 0;
        for (int r = 0; r < N; ++r) {
            if (r < me)
                g0 += std::size_t(ws.status_[2 * std::size_t(r)]);
            T_all += std::size_t(ws.status_[2 * std::size_t(r)]);
        }
        ws.stats_.exchange_seconds += detail::now() - t0;

        // 2. Route this rank's tokens.
        const std::size_t k = std::size_t(kc);
        const matrix_view<float> logits(ws.logits_.data(), T, E);
        if constexpr (!std::same_as<P, given_routing>) {
            // A token's router logits do not depend on the rows around it
            // (routing/router.hpp), so this rank's rows get one process's bits.
            kdial::detail::router_logits_unchecked(X, w.router(), logits, ex);
            try {
                kdial::detail::check_logits_finite(cmatrix_view<float>(logits), where);
            } catch (const kdial::error& e) {
                err = e.what();
            }
        }
        if (err.empty())
            kdial::detail::route_policy(cmatrix_view<float>(logits), policy, kc, w.routing(),
                matrix_view<std::int32_t>(ws.ids_.data(), T, k), matrix_view<float>(ws.weights_.data(), T, k),
                std::span<int>(ws.kept_.data(), T), ex);
        ws.T_ = T;
        ws.kc_ = k;

        // 3. The plan in wire order; each destination's rows are one block.
        if (err.empty()) {
            for (std::size_t i = 0; i < T * k; ++i)
                ws.wire_ids_[i] = ws.ids_[i] == no_expert ? no_expert : pl.wire(std::size_t(ws.ids_[i]));
            ws.plan_.build(cmatrix_view<std::int32_t>(ws.wire_ids_.data(), T, k));
            gather(ws.plan_, X, matrix_view<float>(ws.xs_.data(), ws.plan_.num_slots(), d), ex);
        }
        // Per-expert counts of every rank (wire order), plus a failure flag.
        t0 = detail::now();
        std::vector<int>& all = ws.all_counts_;
        {
            int* my = all.data() + std::size_t(me) * (E + 1);
            if (err.empty()) {
                const auto c = ws.plan_.counts();
                std::copy(c.begin(), c.end(), my);
            } else
                std::fill(my, my + E, 0);
            my[E] = err.empty() ? 0 : 1;
            detail::mpi_check(
                MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, all.data(), int(E + 1), MPI_INT, ws.comm_),
                "MPI_Allgather");
        }
        for (int r = 0; r < N; ++r)
            if (all[std::size_t(r) * (E + 1) + E] != 0)
                throw kdial::error(
                    err.empty() ? kdial::detail::cat(where, ": rank ", r, " failed to route its tokens") : err);
        auto count_of = [&](int src, int dst) {
            int n = 0;
            const int* c = all.data() + std::size_t(src) * (E + 1);
            for (std::int32_t p = pl.wire_begin(dst); p < pl.wire_begin(dst + 1); ++p)
                n += c[p];
            return n;
        };
        int R = 0, S = 0;
        for (int q = 0; q < N; ++q) {
            ws.scount_[std::size_t(q)] = count_of(me, q);
            ws.sdispl_[std::size_t(q)] = ws.plan_.offsets()[std::size_t(pl.wire_begin(q))];
            ws.rcount_[std::size_t(q)] = count_of(q, me);
            ws.rdispl_[std::size_t(q)] = R;
            R += ws.rcount_[std::size_t(q)];
            if (q != me)
                S += ws.scount_[std::size_t(q)];
        }
        KDIAL_ASSERT(std::size_t(R) <= ws.R_max_);
        // 4. Rows out.
        detail::mpi_check(MPI_Alltoallv(ws.xs_.data(), ws.scount_.data(), ws.sdispl_.data(), ws.row_type_,
                              ws.xr_.data(), ws.rcount_.data(), ws.rdispl_.data(), ws.row_type_, ws.comm_),
            "MPI_Alltoallv (dispatch)");
        ws.stats_.exchange_seconds += detail::now() - t0;

        // 5. The local experts on the received rows: each row is labelled with
        // its local expert; the stable sort by label gives each expert its rows
        // in (source rank, token) order.
        t0 = detail::now();
        if (R > 0) {
            const std::int32_t base = pl.wire_begin(me);
            const std::size_t n_local = w.local_count();
            std::size_t i = 0;
            for (int src = 0; src < N; ++src) {
                const int* c = all.data() + std::size_t(src) * (E + 1) + base;
                for (std::size_t le = 0; le < n_local; ++le)
                    for (int r = 0; r < c[le]; ++r)
                        ws.rids_[i++] = std::int32_t(le);
            }
            const std::size_t Rn = std::size_t(R);
            const moe_weights& lw = *w.local();
            moe_workspace& lws = *ws.local_ws_;
            const cmatrix_view<float> xr(ws.xr_.data(), Rn, d);
            moe::route(lw, lws, xr,
                given_routing { cmatrix_view<std::int32_t>(ws.rids_.data(), Rn, 1),
                    cmatrix_view<float>(ws.rweights_.data(), Rn, 1) },
                ex);
            moe::dispatch(lw, lws, xr, ex);
            moe::run_experts(lw, lws, xr, ex);
            const auto slot = lws.plan().slot_of();
            const cmatrix_view<float> ly = std::as_const(lws).expert_outputs();
            parallel::for_each_tile(ex, Rn, parallel::tile_items(d * sizeof(float)), [&](std::size_t a, std::size_t b) {
                for (std::size_t r = a; r < b; ++r)
                    std::memcpy(ws.back_.data() + r * d, ly.row(std::size_t(slot[r])), d * sizeof(float));
            });
        }
        ws.stats_.expert_seconds += detail::now() - t0;

        // 6. Outputs back, into this rank's slot order.
        t0 = detail::now();
        detail::mpi_check(MPI_Alltoallv(ws.back_.data(), ws.rcount_.data(), ws.rdispl_.data(), ws.row_type_,
                              ws.ys_.data(), ws.scount_.data(), ws.sdispl_.data(), ws.row_type_, ws.comm_),
            "MPI_Alltoallv (combine)");
        ws.stats_.exchange_seconds += detail::now() - t0;
        ws.stats_.calls += 1;
        ws.stats_.rows_sent += std::size_t(S);
        ws.stats_.bytes_sent += 2 * std::size_t(S) * d * sizeof(float);

        // 7. The shared expert on this rank's tokens, then combine.
        shared_expert_term st;
        if (w.shared() && T > 0) {
            const expert_set& se = w.shared()->expert;
            const std::size_t Fs = w.shared_ffn();
            const matrix_view<float> s(ws.s_.data(), T, d);
            // y = down(gate/up(x)) through h [n, Fs], each phase over column
            // tiles (the kernels of moe::run_experts; a row's bits do not
            // depend on the column split); hq bound: h is quantised between.
            const auto ffn = [&](const kdial::detail::expert_rows& x, matrix_view<float> h, const act_q8_view& hq,
                                 matrix_view<float> y) {
                constexpr std::size_t cols = 64;
                ex.parallel_for((Fs + cols - 1) / cols, [&](std::size_t c) {
                    kdial::detail::expert_gate_up(se, 0, x, c * cols, std::min(Fs, (c + 1) * cols), h);
                });
                if (hq.q)
                    kdial::detail::quantize_act_rows(ex, cmatrix_view<float>(h), hq);
                const kdial::detail::expert_rows hr { h, hq };
                ex.parallel_for((d + cols - 1) / cols, [&](std::size_t c) {
                    kdial::detail::expert_down(se, 0, hr, c * cols, std::min(d, (c + 1) * cols), y);
                });
            };
            if (ws.act_ == act_mode::int8 && kdial::detail::has_qdot(se.type())) {
                // int8: rows quantised one by one, then row-independent integer
                // dots (bits of moe::run_experts at any T, no padding).
                act_q8_view xq = ws.xsq_, hq = ws.hsq_;
                xq.rows = hq.rows = T;
                kdial::detail::quantize_act_rows(ex, X, xq);
                ffn({ X, xq }, matrix_view<float>(ws.hs_.data(), T, Fs), hq, s);
            } else
                detail::rows_as_one_process(X, g0, T_all, moe_workspace::gemm_rows, s, se.type(), ws.pad_x_.data(),
                    ws.pad_y_.data(), [&](cmatrix_view<float> xb, matrix_view<float> yb) {
                        const matrix_view<float> h(
                            xb.data == ws.pad_x_.data() ? ws.pad_h_.data() : ws.hs_.data(), xb.rows, Fs);
                        ffn({ xb }, h, {}, yb);
                    });
            st.output = cmatrix_view<float>(ws.s_.data(), T, d);
            if (w.has_shared_gate()) {
                kdial::detail::router_logits_unchecked(
                    X, w.shared()->gate, matrix_view<float>(ws.gate_.data(), T, 1), ex);
                st.gate_logits = std::span<const float>(ws.gate_.data(), T);
            }
        }
        kdial::combine(ws.plan_, cmatrix_view<float>(ws.weights_.data(), T, k),
            cmatrix_view<float>(ws.ys_.data(), ws.plan_.num_slots(), d), out, st, mode, ex);
    }
};

} // namespace detail

// One MoE layer over the ranks of w.comm(): out [T, d] = (or +=) MoE(X
// [T, d]) for this rank's T tokens (T may differ per rank, 0 included).
// Collective: every rank calls it, with the same kind of policy. The bits
// equal moe::forward in one process on the tokens of all ranks in rank
// order. Throws kdial::error on every rank if any rank's input is bad
// (out untouched).
template <routing_policy P>
void forward(const ep_weights& w, ep_workspace& ws, cmatrix_view<float> X, const P& policy, matrix_view<float> out,
    combine_mode mode = combine_mode::overwrite, executor_ref ex = default_executor {})
{
    detail::ep_stages::forward(w, ws, X, policy, out, mode, ex);
}

// forward() with a run-time k for every token.
inline void forward(const ep_weights& w, ep_workspace& ws, cmatrix_view<float> X, int k, matrix_view<float> out,
    combine_mode mode = combine_mode::overwrite, executor_ref ex = default_executor {})
{
    forward(w, ws, X, dynamic_k { k }, out, mode, ex);
}

} // namespace kdial::distributed
