// The routed experts of one MoE layer (stage 3): E SwiGLU experts sharing
// one weight format, held as views (the weights may live in a memory-mapped
// checkpoint). Two ways to bind them, neither copying a weight:
//   - a list of per-expert views (expert_weights<W>: gate, up, down);
//   - stacked tensors as engines hold them: gate / up [E, F, d] and down
//     [E, d, F] (GGUF ffn_{gate,up,down}_exps), or fused gate+up [E, 2F, d]
//     (vLLM w13, GGUF ffn_gate_up_exps, HF transformers v5 gate_up_proj),
//     each with its own expert and row strides.
// The format is a runtime property of the set (a std::variant over the
// weight types of expert_weight_types) and a compile-time type inside the
// kernels: visit() is the one place where the two meet. Shapes are checked
// once, at construction.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "swiglu.hpp"

namespace kdial {

// The weight formats an expert set can hold. Adding a format is one entry
// here (and its kernels).
template <weight_type... Ws> struct weight_type_list {
};
using expert_weight_types = weight_type_list<f32_t, bf16_t, f16_t, q8_t, q4_0_t, q4_k_t>;

// One stacked expert tensor [E, rows, cols] of format W: expert e's matrix
// starts at data + e * expert_stride, its row r at + r * row_stride (both in
// storage elements; q8: blocks). Default strides: dense.
template <weight_type W> struct stacked_weight {
    const typename W::storage* data = nullptr;
    std::size_t rows = 0, cols = 0;
    std::size_t row_stride = 0; // 0: storage_cols<W>(cols)
    std::size_t expert_stride = 0; // 0: rows * row_stride

    std::size_t row_stride_or_dense() const noexcept { return row_stride ? row_stride : storage_cols<W>(cols); }
    std::size_t expert_stride_or_dense() const noexcept
    {
        return expert_stride ? expert_stride : rows * row_stride_or_dense();
    }
    weight_view<W> expert(std::size_t e) const noexcept
    {
        return { data + e * expert_stride_or_dense(), rows, cols, row_stride_or_dense() };
    }
};

class expert_set {
public:
    expert_set() = default;

    // Takes E experts, each gate/up [F, d] and down [d, F]. Throws
    // kdial::error naming the expert and tensor on a shape mismatch.
    template <weight_type W>
    expert_set(std::vector<expert_weights<W>> experts, std::size_t d, std::size_t F)
        : d_(d)
        , F_(F)
    {
        detail::check(!experts.empty(), "kdial::expert_set: no experts");
        for (std::size_t e = 0; e < experts.size(); ++e) {
            const std::string where = detail::cat("kdial::expert_set: expert ", e);
            check_expert_weights(experts[e], d, F, where.c_str());
        }
        experts_ = std::move(experts);
    }

    // Stacked experts: gate and up [E, F, d], down [E, d, F].
    template <weight_type W>
    static expert_set stacked(std::size_t E, stacked_weight<W> gate, stacked_weight<W> up, stacked_weight<W> down)
    {
        constexpr const char* where = "kdial::expert_set::stacked";
        detail::check(E >= 1, where, ": no experts");
        detail::check(gate.data && up.data && down.data, where, ": a stacked tensor is null");
        const std::size_t F = gate.rows, d = gate.cols;
        std::vector<expert_weights<W>> v;
        v.reserve(E);
        for (std::size_t e = 0; e < E; ++e)
            v.push_back({ gate.expert(e), up.expert(e), down.expert(e) });
        return expert_set(std::move(v), d, F);
    }

    // Stacked experts with gate and up fused: gate_up [E, 2F, d] (expert e:
    // its F gate rows, then its F up rows), down [E, d, F]. gate_up.rows is 2F.
    template <weight_type W>
    static expert_set stacked_fused(std::size_t E, stacked_weight<W> gate_up, stacked_weight<W> down)
    {
        detail::check(gate_up.rows % 2 == 0, "kdial::expert_set::stacked_fused: gate_up has ", gate_up.rows,
            " rows per expert, expected 2F (an even number)");
        const std::size_t F = gate_up.rows / 2, rs = gate_up.row_stride_or_dense();
        stacked_weight<W> gate { gate_up.data, F, gate_up.cols, rs, gate_up.expert_stride_or_dense() };
        stacked_weight<W> up { gate_up.data ? gate_up.data + F * rs : nullptr, F, gate_up.cols, rs,
            gate_up.expert_stride_or_dense() };
        return stacked(E, gate, up, down);
    }

    std::size_t size() const noexcept
    {
        return std::visit([](const auto& v) { return v.size(); }, experts_);
    }
    bool empty() const noexcept { return size() == 0; }
    std::size_t hidden() const noexcept { return d_; } // d
    std::size_t ffn() const noexcept { return F_; } // F
    dtype type() const noexcept
    {
        return std::visit(
            [](const auto& v) {
                using E = typename std::decay_t<decltype(v)>::value_type;
                return decltype(E::gate)::format::id;
            },
            experts_);
    }
    // Bytes of one expert's three matrices as streamed by the kernels.
    std::size_t expert_bytes() const noexcept
    {
        return std::visit(
            [&](const auto& v) -> std::size_t {
                if (v.empty())
                    return 0;
                return v[0].gate.bytes() + v[0].up.bytes() + v[0].down.bytes();
            },
            experts_);
    }

    // Calls f(const std::vector<expert_weights<W>>&) for the set's format.
    template <class F> decltype(auto) visit(F&& f) const { return std::visit(std::forward<F>(f), experts_); }

private:
    template <class L> struct lists;
    template <weight_type... Ws> struct lists<weight_type_list<Ws...>> {
        using type = std::variant<std::vector<expert_weights<Ws>>...>;
    };
    typename lists<expert_weight_types>::type experts_;
    std::size_t d_ = 0, F_ = 0;
};

} // namespace kdial
