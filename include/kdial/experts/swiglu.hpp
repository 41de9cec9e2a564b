// One expert's SwiGLU FFN on its block of rows (stage 3 of the MoE layer):
// Y = down( silu(X gateᵀ) * (X upᵀ) ), weights in HF orientation
// (gate, up: [F, d]; down: [d, F]) and any weight format. swiglu_expert is the
// serial convenience; parallel callers tile swiglu_gate_up over F, then
// linear over d (kernels/linear.hpp). Deterministic, views only, no allocation.
#pragma once

#include <cstddef>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/views.hpp"
#include "../kernels/linear.hpp"
#include "../kernels/weights.hpp"

namespace kdial {

template <weight_type W> struct expert_weights {
    weight_view<W> gate; // [F, d]
    weight_view<W> up; // [F, d]
    weight_view<W> down; // [d, F]

    std::size_t hidden() const noexcept { return gate.cols; } // d
    std::size_t ffn() const noexcept { return gate.rows; } // F
};

// Throws kdial::error, naming the tensor and the shapes, unless gate and up
// are [F, d] and down is [d, F]. `where` prefixes the message (e.g. the
// layer and expert index).
template <weight_type W>
void check_expert_weights(const expert_weights<W>& w, std::size_t d, std::size_t F, const char* where = "expert")
{
    detail::check(d > 0 && F > 0, where, ": hidden size d = ", d, " and FFN size F = ", F, " must be positive");
    detail::check_weight_shape(w.gate, F, d, where, "gate_proj");
    detail::check_weight_shape(w.up, F, d, where, "up_proj");
    detail::check_weight_shape(w.down, d, F, where, "down_proj");
}

// Y = down(silu(X gateᵀ) * (X upᵀ)), serial; H is caller scratch.
// Requires check_expert_weights(w, d, F) and the view shapes below; use
// check_swiglu_expert at the edge.
template <weight_type W, class Arch = xsimd::default_arch>
void swiglu_expert(const expert_weights<W>& w, cmatrix_view<float> x /*[n, d]*/, matrix_view<float> h /*[n, F]*/,
    matrix_view<float> y /*[n, d]*/, act_mode act = act_mode::exact) noexcept
{
    swiglu_gate_up<W, Arch>(w.gate, w.up, x, 0, w.gate.rows, h, act);
    linear<W, Arch>(w.down, cmatrix_view<float>(h), 0, w.down.rows, y, act);
}

// Validates the weights and the views of a swiglu_expert call.
template <weight_type W>
void check_swiglu_expert(const expert_weights<W>& w, cmatrix_view<float> x /*[n, d]*/, matrix_view<float> h /*[n, F]*/,
    matrix_view<float> y /*[n, d]*/, const char* where = "swiglu_expert")
{
    const std::size_t d = w.gate.cols, F = w.gate.rows;
    check_expert_weights(w, d, F, where);
    detail::check_shape(x, x.rows, d, where, "X");
    detail::check_shape(h, x.rows, F, where, "H");
    detail::check_shape(y, x.rows, d, where, "Y");
}

} // namespace kdial
