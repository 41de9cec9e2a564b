// Eigen interop (optional: only this header needs Eigen, and kdial::kdial
// does not link it). An Eigen-based engine passes its row-major matrices —
// Eigen::Matrix, Map or Ref with row-major storage and unit inner stride —
// to the MoE layer's entry points directly; they are viewed, never copied.
//   kdial::eigen::cview(m), view(m)  a cmatrix_view / matrix_view of m
//   kdial::moe::forward(w, ws, X, policy, out, ...)   X, out Eigen row-major
//   kdial::moe::route / dispatch / run_experts / combine  likewise
// Column-major matrices are not accepted (kdial's activations are rows).
#pragma once

#include <Eigen/Core>

#include "../layer/moe.hpp"

namespace kdial::eigen {

// The row-major float matrix kdial's activations are.
using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
// What the entry points take: any row-major float matrix, map or block with
// unit inner stride (Eigen converts a Matrix or Map to a Ref without a copy).
using const_ref = Eigen::Ref<const row_matrix, 0, Eigen::OuterStride<>>;
using ref = Eigen::Ref<row_matrix, 0, Eigen::OuterStride<>>;

inline cmatrix_view<float> cview(const const_ref& m) noexcept
{
    return { m.data(), std::size_t(m.rows()), std::size_t(m.cols()), std::size_t(m.outerStride()) };
}
inline matrix_view<float> view(ref m) noexcept
{
    return { m.data(), std::size_t(m.rows()), std::size_t(m.cols()), std::size_t(m.outerStride()) };
}

} // namespace kdial::eigen

namespace kdial::moe {

template <routing_policy P>
void forward(const moe_weights& w, moe_workspace& ws, const eigen::const_ref& X, const P& policy, eigen::ref out,
    combine_mode mode = combine_mode::overwrite, executor_ref ex = default_executor {})
{
    forward(w, ws, eigen::cview(X), policy, eigen::view(out), mode, ex);
}
inline void forward(const moe_weights& w, moe_workspace& ws, const eigen::const_ref& X, int k, eigen::ref out,
    combine_mode mode = combine_mode::overwrite, executor_ref ex = default_executor {})
{
    forward(w, ws, eigen::cview(X), dynamic_k { k }, eigen::view(out), mode, ex);
}
template <routing_policy P>
void route(const moe_weights& w, moe_workspace& ws, const eigen::const_ref& X, const P& policy,
    executor_ref ex = default_executor {})
{
    route(w, ws, eigen::cview(X), policy, ex);
}
inline const dispatch_plan& dispatch(
    const moe_weights& w, moe_workspace& ws, const eigen::const_ref& X, executor_ref ex = default_executor {})
{
    return dispatch(w, ws, eigen::cview(X), ex);
}
inline void run_experts(
    const moe_weights& w, moe_workspace& ws, const eigen::const_ref& X, executor_ref ex = default_executor {})
{
    run_experts(w, ws, eigen::cview(X), ex);
}
inline void combine(const moe_weights& w, const moe_workspace& ws, eigen::ref out,
    combine_mode mode = combine_mode::overwrite, executor_ref ex = default_executor {})
{
    combine(w, ws, eigen::view(out), mode, ex);
}

} // namespace kdial::moe
