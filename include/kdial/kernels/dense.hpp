// A dense linear layer whose weight format is known only at run time (the
// projections of attention, lm_head, a dense MLP): any_weight_view holds a
// weight_view of f32, bf16, f16, q8, q4_0 or q4_k, and dense_linear() runs Y = X Wᵀ (+ b) in
// parallel over tiles of output columns sized by the weight bytes (never by
// the thread count), so results are bit-identical for any thread count.
// Several layers that read the same input can run in one launch; with
// act_mode::int8 that input is quantised once for all of them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <variant>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "../parallel/for_each.hpp"
#include "linear.hpp"
#include "weights.hpp"

namespace kdial {

using any_weight_view = std::variant<weight_view<f32_t>, weight_view<bf16_t>, weight_view<f16_t>, weight_view<q8_t>,
    weight_view<q4_0_t>, weight_view<q4_k_t>>;

inline std::size_t rows_of(const any_weight_view& w) noexcept
{
    return std::visit([](const auto& v) { return v.rows; }, w);
}
inline std::size_t cols_of(const any_weight_view& w) noexcept
{
    return std::visit([](const auto& v) { return v.cols; }, w);
}
inline std::size_t bytes_of(const any_weight_view& w) noexcept
{
    return std::visit([](const auto& v) { return v.bytes(); }, w);
}
inline dtype type_of(const any_weight_view& w) noexcept
{
    return std::visit([](const auto& v) { return std::decay_t<decltype(v)>::format::id; }, w);
}

// One output of a dense layer: Y [n, O] = X . W [O, K]ᵀ (+ bias [O]).
struct dense_output {
    const any_weight_view* w;
    matrix_view<float> y;
    const float* bias = nullptr;
};

namespace detail {
// Columns per tile: about 512 KiB of weights, a multiple of 64.
inline std::size_t dense_cols(const any_weight_view& w)
{
    const std::size_t O = rows_of(w);
    const std::size_t row_bytes = std::max<std::size_t>(1, bytes_of(w) / std::max<std::size_t>(1, O));
    return std::max<std::size_t>(64, (std::size_t { 512 } << 10) / row_bytes / 64 * 64);
}

// Quantises the rows of x into out (out.rows == x.rows), 16 rows per tile on
// ex: rows are independent, so the bytes equal one serial call's.
inline void quantize_act_rows(executor_ref ex, cmatrix_view<float> x, const act_q8_view& out)
{
    constexpr std::size_t rows = 16;
    const auto body = [&](std::size_t t) {
        const std::size_t a = t * rows, b = std::min(x.rows, a + rows);
        act_q8_view o = out;
        o.q += a * out.blocks * act_block;
        o.d += a * out.blocks;
        o.s += a * out.blocks;
        o.rows = b - a;
        quantize_act_q8(x.sub_rows(a, b - a), o);
    };
    if (x.rows > 0)
        ex.parallel_for((x.rows + rows - 1) / rows, body);
}

// 64-byte aligned scratch for the quantised X of a dense_linear call, one
// buffer per calling thread: it grows to the largest X the thread has passed
// and then never allocates again. A call nested in another on the same
// thread (a TBB thread that steals a task while it waits) finds the buffer
// busy and takes memory of its own for that call.
class dense_act_scratch {
public:
    explicit dense_act_scratch(std::size_t bytes)
    {
        buffer& b = tls();
        if (!b.busy) {
            if (b.size < bytes + 64) {
                b.p.reset(new std::byte[bytes + 64]);
                b.size = bytes + 64;
            }
            b.busy = true;
            held_ = &b;
            base_ = b.p.get();
        } else {
            own_.reset(new std::byte[bytes + 64]);
            base_ = own_.get();
        }
    }
    ~dense_act_scratch()
    {
        if (held_)
            held_->busy = false;
    }
    dense_act_scratch(const dense_act_scratch&) = delete;
    dense_act_scratch& operator=(const dense_act_scratch&) = delete;
    std::byte* data() const noexcept { return align_up(base_, 64); }

private:
    struct buffer {
        std::unique_ptr<std::byte[]> p;
        std::size_t size = 0;
        bool busy = false;
    };
    static buffer& tls() noexcept
    {
        thread_local buffer b;
        return b;
    }
    buffer* held_ = nullptr;
    std::unique_ptr<std::byte[]> own_;
    std::byte* base_ = nullptr;
};

inline bool has_qdot(dtype t) noexcept
{
    return t == dtype::q8 || t == dtype::q4_0 || t == dtype::q4_k;
}
} // namespace detail

// Bytes of workspace dense_linear uses for an X of [rows, cols] in mode act
// (0: none): the int8 copy of X (any alignment; 64 bytes of slack included).
// A caller that owns it allocates nothing per call.
inline std::size_t dense_workspace_bytes(std::size_t rows, std::size_t cols, act_mode act) noexcept
{
    return act == act_mode::int8 && (rows > gemv_max_rows || cols > act_q8_stack_elems) ? act_q8_bytes(rows, cols) + 64
                                                                                        : 0;
}

// Several dense layers reading the same X (e.g. q, k and v) in one parallel
// launch, so small decode steps pay for one synchronisation instead of one
// per layer. Tiles: 256-row chunks of X times ~512 KiB column tiles of each
// weight, in a fixed list, so the result is the same for any thread count.
// act: act_mode::int8 runs q8/q4_0/q4_k weights with int8 activations at
// any row count (kernels/qdot.hpp). X with more than gemv_max_rows rows is
// quantised once (in parallel) and shared by every output and tile: into
// `workspace` when the caller passes one (dense_workspace_bytes), else into
// a per-thread buffer that only grows (detail::dense_act_scratch). Decode
// rows (K <= act_q8_stack_elems) are quantised on the stack per tile
// (linear()). A row's bits do not depend on the row count either way.
inline void dense_linear(cmatrix_view<float> X, std::span<const dense_output> outs, act_mode act = act_mode::exact,
    std::span<std::byte> workspace = {})
{
    std::size_t tiles = 0;
    const std::size_t row_chunk = 256, row_tiles = (X.rows + row_chunk - 1) / row_chunk;
    for (const auto& o : outs) {
        const std::size_t O = rows_of(*o.w), K = cols_of(*o.w);
        detail::check(X.cols == K && o.y.rows == X.rows && o.y.cols == O, "kdial::dense_linear: X [", X.rows, ", ",
            X.cols, "] . W [", O, ", ", K, "]ᵀ does not fit Y [", o.y.rows, ", ", o.y.cols, "]");
        detail::check(type_of(*o.w) != dtype::q4_k || K % qk_k == 0, "kdial::dense_linear: a q4_k weight has ", K,
            " inputs per row, not a multiple of ", qk_k);
        tiles += row_tiles * ((O + detail::dense_cols(*o.w) - 1) / detail::dense_cols(*o.w));
    }
    if (X.rows == 0 || tiles == 0)
        return;
    const std::size_t need = dense_workspace_bytes(X.rows, X.cols, act); // > 0: X quantised once
    bool quantise = false;
    if (need > 0)
        for (const auto& o : outs)
            quantise = quantise || detail::has_qdot(type_of(*o.w));
    std::optional<detail::dense_act_scratch> scratch;
    act_q8_view xq {};
    if (quantise) {
        std::byte* buf = nullptr;
        if (workspace.empty()) {
            scratch.emplace(act_q8_bytes(X.rows, X.cols));
            buf = scratch->data();
        } else {
            detail::check(workspace.size() >= need, "kdial::dense_linear: workspace of ", workspace.size(),
                " bytes, X [", X.rows, ", ", X.cols, "] with int8 activations needs ", need,
                " (dense_workspace_bytes)");
            buf = detail::align_up(workspace.data(), 64);
        }
        xq = bind_act_q8(buf, X.rows, X.cols);
        detail::quantize_act_rows(default_executor {}, X, xq);
    }
    parallel::for_each_index(tiles, [&](std::size_t i) {
        // Find the output and the tile within it (outs is short).
        for (const auto& o : outs) {
            const std::size_t O = rows_of(*o.w), cols = detail::dense_cols(*o.w);
            const std::size_t col_tiles = (O + cols - 1) / cols, n = row_tiles * col_tiles;
            if (i >= n) {
                i -= n;
                continue;
            }
            const std::size_t rt = i / col_tiles, ct = i % col_tiles;
            const std::size_t r0 = rt * row_chunk, r1 = std::min(X.rows, r0 + row_chunk);
            const std::size_t c0 = ct * cols, c1 = std::min(O, c0 + cols);
            const auto y = o.y.sub_rows(r0, r1 - r0);
            std::visit(
                [&](const auto& wv) {
                    using W = typename std::decay_t<decltype(wv)>::format;
                    if constexpr (qdot_weight<W>)
                        if (quantise)
                            return linear_q8act(wv, act_q8_cview(xq).sub_rows(r0, r1 - r0), c0, c1, y);
                    linear(wv, X.sub_rows(r0, r1 - r0), c0, c1, y, act);
                },
                *o.w);
            if (o.bias)
                for (std::size_t r = 0; r < y.rows; ++r)
                    for (std::size_t c = c0; c < c1; ++c)
                        y(r, c) += o.bias[c];
            return;
        }
    });
}

// Y [n, O] = X [n, K] . W [O, K]ᵀ (+ bias [O] if not null).
inline void dense_linear(const any_weight_view& w, cmatrix_view<float> X, matrix_view<float> Y,
    const float* bias = nullptr, act_mode act = act_mode::exact, std::span<std::byte> workspace = {})
{
    const dense_output o { &w, Y, bias };
    dense_linear(X, std::span<const dense_output>(&o, 1), act, workspace);
}

} // namespace kdial
