// The routed experts of one MoE layer (stage 3): E SwiGLU experts sharing
// one weight format, held as views (the weights may live in a memory-mapped
// checkpoint). The format is a runtime property of the set (a std::variant
// over the four weight types) and a compile-time type inside the kernels:
// visit() is the one place where the two meet. Shapes are checked once, at
// construction.
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
    template <weight_type W> using list = std::vector<expert_weights<W>>;
    std::variant<list<f32_t>, list<bf16_t>, list<f16_t>, list<q8_t>> experts_;
    std::size_t d_ = 0, F_ = 0;
};

} // namespace kdial
