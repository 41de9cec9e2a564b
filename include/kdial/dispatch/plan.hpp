// Dispatch (stage 2): groups the T*k (token, expert) assignments of a
// Routing by expert with a stable counting sort, so each expert sees a
// contiguous block of rows, in token order. The plan is a reusable handle:
// sized once for (max tokens, E, max k), rebuilt per call with no
// allocation. An id of kdial::no_expert (-1) marks a dropped assignment
// (per-request k, threshold routing): it gets no slot and costs nothing.
// Deterministic: the plan depends only on the ids.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <span>
#include <vector>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "../parallel/for_each.hpp"

namespace kdial {

// Marks an assignment that goes to no expert.
inline constexpr std::int32_t no_expert = -1;

class dispatch_plan {
public:
    dispatch_plan() = default;

    // Sizes the plan for up to max_tokens tokens, E experts and max_k
    // assignments per token, and (optionally) at most max_slots assignments
    // per call (default max_tokens * max_k). The only allocation the plan
    // ever makes.
    dispatch_plan(std::size_t max_tokens, int num_experts, int max_k, std::size_t max_slots = 0)
    {
        init(max_tokens, num_experts, max_k, max_slots);
        own_.assign(storage_size(max_tokens, num_experts, max_k, max_slots_), 0);
        bind(own_.data());
    }

    // The same plan laid on caller memory (a workspace): `storage` must hold
    // storage_size(...) int32 values and outlive the plan. Allocates nothing.
    dispatch_plan(
        std::size_t max_tokens, int num_experts, int max_k, std::size_t max_slots, std::span<std::int32_t> storage)
    {
        init(max_tokens, num_experts, max_k, max_slots);
        detail::check(storage.size() >= storage_size(max_tokens, num_experts, max_k, max_slots_),
            "kdial::dispatch_plan: storage has ", storage.size(), " values, needs ",
            storage_size(max_tokens, num_experts, max_k, max_slots_));
        bind(storage.data());
        std::fill(offsets_, offsets_ + num_experts + 1, 0);
    }

    // int32 values a plan of these sizes needs (counts, offsets, slot_token,
    // slot_of).
    static std::size_t storage_size(std::size_t max_tokens, int num_experts, int max_k, std::size_t max_slots = 0)
    {
        const std::size_t slots = max_slots ? max_slots : max_tokens * static_cast<std::size_t>(max_k);
        return 2 * static_cast<std::size_t>(num_experts) + 1 + 2 * slots;
    }

    // Copies own their storage when the source did, else view the same
    // caller memory.
    dispatch_plan(const dispatch_plan& o) { *this = o; }
    dispatch_plan& operator=(const dispatch_plan& o)
    {
        if (this == &o)
            return *this;
        num_experts_ = o.num_experts_;
        max_tokens_ = o.max_tokens_;
        max_k_ = o.max_k_;
        max_slots_ = o.max_slots_;
        tokens_ = o.tokens_;
        k_ = o.k_;
        own_ = o.own_;
        if (!own_.empty())
            bind(own_.data());
        else
            bind_like(o);
        return *this;
    }
    dispatch_plan(dispatch_plan&& o) noexcept { *this = std::move(o); }
    dispatch_plan& operator=(dispatch_plan&& o) noexcept
    {
        if (this == &o)
            return *this;
        num_experts_ = o.num_experts_;
        max_tokens_ = o.max_tokens_;
        max_k_ = o.max_k_;
        max_slots_ = o.max_slots_;
        tokens_ = o.tokens_;
        k_ = o.k_;
        own_ = std::move(o.own_); // the buffer moves, pointers into it stay valid
        bind_like(o);
        return *this;
    }

    // Rebuilds the plan from ids [T, k] (values in [0, E) or no_expert).
    // Throws kdial::error (leaving the plan as it was) if T or k exceed the
    // sizes the plan was made for or an id is out of range.
    void build(cmatrix_view<std::int32_t> ids)
    {
        constexpr const char* where = "kdial::dispatch_plan::build";
        const std::size_t T = ids.rows, k = ids.cols;
        detail::check(num_experts_ >= 1, where, ": plan was default-constructed (no sizes)");
        detail::check(T <= max_tokens_, where, ": T = ", T, " exceeds the plan's max_tokens = ", max_tokens_);
        detail::check(
            k >= 1 && k <= static_cast<std::size_t>(max_k_), where, ": k = ", k, " outside [1, max_k = ", max_k_, "]");
        detail::check(T * k <= max_slots_, where, ": T * k = ", T * k, " exceeds the plan's ", max_slots_, " slots");
        detail::check(ids.stride >= k && (ids.data != nullptr || T == 0), where, ": bad ids view");
        for (std::size_t t = 0; t < T; ++t)
            for (std::size_t j = 0; j < k; ++j) {
                const std::int32_t e = ids(t, j);
                detail::check(e == no_expert || (e >= 0 && e < num_experts_), where, ": ids[", t, ", ", j, "] = ", e,
                    " is not an expert in [0, ", num_experts_, ") nor no_expert (-1)");
            }
        tokens_ = T;
        k_ = k;
        const std::size_t E = static_cast<std::size_t>(num_experts_);
        std::fill(counts_, counts_ + E, 0);
        for (std::size_t t = 0; t < T; ++t)
            for (std::size_t j = 0; j < k; ++j)
                if (const std::int32_t e = ids(t, j); e != no_expert)
                    ++counts_[static_cast<std::size_t>(e)];
        offsets_[0] = 0;
        for (std::size_t e = 0; e < E; ++e)
            offsets_[e + 1] = offsets_[e] + counts_[e];
        // cursor: reuse counts_ as the running fill position, then restore.
        for (std::size_t e = 0; e < E; ++e)
            counts_[e] = offsets_[e];
        for (std::size_t t = 0; t < T; ++t)
            for (std::size_t j = 0; j < k; ++j) {
                const std::int32_t e = ids(t, j);
                if (e == no_expert) {
                    slot_of_[t * k + j] = -1;
                    continue;
                }
                const std::int32_t s = counts_[static_cast<std::size_t>(e)]++;
                slot_token_[static_cast<std::size_t>(s)] = static_cast<std::int32_t>(t);
                slot_of_[t * k + j] = s;
            }
        for (std::size_t e = 0; e < E; ++e)
            counts_[e] = offsets_[e + 1] - offsets_[e];
    }

    int num_experts() const noexcept { return num_experts_; }
    std::size_t max_tokens() const noexcept { return max_tokens_; }
    int max_k() const noexcept { return max_k_; }
    std::size_t tokens() const noexcept { return tokens_; } // T of the last build
    std::size_t k() const noexcept { return k_; } // k of the last build
    std::size_t max_slots() const noexcept { return max_slots_; }
    std::size_t num_slots() const noexcept
    {
        return offsets_ ? static_cast<std::size_t>(offsets_[static_cast<std::size_t>(num_experts_)]) : 0;
    }

    // [E] assignments per expert.
    std::span<const std::int32_t> counts() const noexcept
    {
        return { counts_, static_cast<std::size_t>(num_experts_) };
    }
    // [E + 1] first slot of each expert; expert e owns slots [offsets[e], offsets[e+1]).
    std::span<const std::int32_t> offsets() const noexcept
    {
        return { offsets_, offsets_ ? static_cast<std::size_t>(num_experts_) + 1 : 0 };
    }
    // [num_slots] the token each slot came from (ascending within an expert).
    std::span<const std::int32_t> slot_token() const noexcept { return { slot_token_, num_slots() }; }
    // [T * k] the slot of assignment (t, j), or -1 if dropped.
    std::span<const std::int32_t> slot_of() const noexcept { return { slot_of_, tokens_ * k_ }; }
    std::int32_t slot_of(std::size_t t, std::size_t j) const noexcept { return slot_of_[t * k_ + j]; }

private:
    void init(std::size_t max_tokens, int num_experts, int max_k, std::size_t max_slots)
    {
        detail::check(num_experts >= 1, "kdial::dispatch_plan: expert count E = ", num_experts, " must be >= 1");
        detail::check(max_k >= 1, "kdial::dispatch_plan: max_k = ", max_k, " must be >= 1");
        num_experts_ = num_experts;
        max_tokens_ = max_tokens;
        max_k_ = max_k;
        max_slots_ = max_slots ? max_slots : max_tokens * static_cast<std::size_t>(max_k);
    }
    void bind(std::int32_t* p) noexcept
    {
        const std::size_t E = static_cast<std::size_t>(num_experts_);
        counts_ = p;
        offsets_ = p + E;
        slot_token_ = offsets_ + E + 1;
        slot_of_ = slot_token_ + max_slots_;
    }
    // Points at the same layout as o (o's buffer, which this may now own).
    void bind_like(const dispatch_plan& o) noexcept
    {
        counts_ = o.counts_;
        offsets_ = o.offsets_;
        slot_token_ = o.slot_token_;
        slot_of_ = o.slot_of_;
    }

    int num_experts_ = 0;
    std::size_t max_tokens_ = 0;
    int max_k_ = 0;
    std::size_t max_slots_ = 0;
    std::size_t tokens_ = 0;
    std::size_t k_ = 0;
    std::vector<std::int32_t> own_; // empty when laid on caller memory
    std::int32_t *counts_ = nullptr, *offsets_ = nullptr, *slot_token_ = nullptr, *slot_of_ = nullptr;
};

// Copies the rows of X [T, d] into expert order: Xs[s] = X[slot_token[s]].
//   X  [T, d]          the tokens' activations
//   Xs [>= slots, d]   out: rows in slot order (rows past num_slots untouched)
inline void gather(
    const dispatch_plan& plan, cmatrix_view<float> X, matrix_view<float> Xs, executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::gather";
    detail::check(
        X.rows == plan.tokens(), where, ": X has ", X.rows, " rows, the plan was built for T = ", plan.tokens());
    detail::check(Xs.rows >= plan.num_slots() && Xs.cols == X.cols, where, ": Xs has shape [", Xs.rows, ", ", Xs.cols,
        "], needs at least [", plan.num_slots(), ", ", X.cols, "]");
    const std::size_t d = X.cols;
    if (d == 0)
        return;
    const auto tok = plan.slot_token();
    parallel::for_each_tile(
        ex, plan.num_slots(), parallel::tile_items(d * sizeof(float)), [&](std::size_t s0, std::size_t s1) {
            for (std::size_t s = s0; s < s1; ++s)
                std::memcpy(Xs.row(s), X.row(static_cast<std::size_t>(tok[s])), d * sizeof(float));
        });
}

} // namespace kdial
