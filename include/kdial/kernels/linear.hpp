// Linear layers of an expert (stage 3): Y[n, o0:o1] = X[n, :] . W[o0:o1, :]ᵀ
// and the fused SwiGLU front half H[:, f0:f1] = silu(X Wgᵀ) * (X Wuᵀ), for
// weights in f32, bf16, f16 or q8, tiled over output columns by the caller.
// Path rule (exact activations), by n and the weight type only: n <=
// gemv_max_rows streams weights (GEMV, memory-bound); n <=
// small_max_rows_of(type) converts weights in registers and reuses them
// across groups of rows (kernels/rows.hpp); larger n packs weight panels
// (GEMM, FMA-bound). Within a path a row's outputs are bit-identical for any
// column split [o0, o1); the GEMV's bits depend on n (see row_class), the
// small-row path gives a row the same bits for any n in (gemv_max_rows,
// small_max_rows_of(type)] (it sums per chunk of rows_kc = 2048
// inputs, so only for K within one chunk do they equal the GEMV's at
// n = 3, 4), and the GEMM gives a row the same bits for any larger n.
// act_mode::int8 (q8, q4_0, q4_k weights) takes kernels/qdot.hpp at every
// n: a row's bits there do not depend on n at all.
// Serial, noexcept, no heap allocation, no checks: validate at the edge.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../core/views.hpp"
#include "gemm.hpp"
#include "gemv.hpp"
#include "qdot.hpp"
#include "rows.hpp"
#include "weights.hpp"

namespace kdial {

// Largest row count that takes the GEMV path. At n = 4 the GEMV still
// streams weights at memory speed and does 4 FMAs per converted weight; from
// n = 5 on, packing a panel once and reusing it across rows is faster.
inline constexpr std::size_t gemv_max_rows = 4;

namespace detail {
// act_mode::int8: X quantised into a stack buffer (see act_q8_stack_elems)
// a chunk of rows at a time (a multiple of 4 rows where K allows), then the
// integer-dot kernel on each chunk (the rows' bits do not depend on the
// chunking, kernels/qdot.hpp). False (nothing done) when W has no integer
// path or a row of X does not fit the buffer.
template <class Arch, weight_type W>
bool try_int8(const weight_view<W>* w, const weight_view<W>* up, cmatrix_view<float> x, std::size_t o0, std::size_t o1,
    matrix_view<float> y) noexcept
{
    if constexpr (qdot_weight<W>) {
        const std::size_t nb = (x.cols + act_block - 1) / act_block, fit = act_q8_stack_elems / (nb * act_block);
        if (fit == 0)
            return false;
        const std::size_t chunk = fit >= 4 ? fit / 4 * 4 : fit;
        alignas(64) std::int8_t q[act_q8_stack_elems];
        float d[act_q8_stack_elems / act_block];
        std::int32_t s[act_q8_stack_elems / act_block];
        for (std::size_t i0 = 0; i0 < x.rows; i0 += chunk) {
            const std::size_t n = std::min(chunk, x.rows - i0);
            const act_q8_view v { q, d, s, n, nb };
            quantize_act_q8(x.sub_rows(i0, n), v);
            if (up)
                swiglu_gate_up_q8act<W, Arch>(*w, *up, v, o0, o1, y.sub_rows(i0, n));
            else
                linear_q8act<W, Arch>(*w, v, o0, o1, y.sub_rows(i0, n));
        }
        return true;
    } else
        return false;
}
} // namespace detail
// Largest row count that takes the small-row path for weights of type t
// (the rest: packed GEMM), and small_max_rows, the largest over every type
// (bounds of buffers and tests). Set from bench_experts' exact_rows /
// exact_gemm pairs (one expert, d = 2048, F = 1024, 1 thread, weights
// streamed from memory; the README's small-row table): on an Intel Xeon
// with AVX-512 BF16/FP16 the AVX2 build's small-row path beats the GEMM for
// bf16 and f16 up to 16 rows and the AVX-512 build's ties it there; on AMD
// Zen 5 bf16 won to 20. f32 ties past 12 rows and q8 loses (AVX-512) past
// 12. After the small-row path's 3-row passes and 2048-input chunks
// (rows.hpp), on Zen 5: bf16 wins to 20 rows (AVX2 build, bf16 and f16: to
// 24), f32 to 16 (AVX2: 24), q8 ties at 16 (AVX-512) and loses from 20; so
// 20 for bf16 and f16, 16 for f32, 12 for the rest (q4_0 and q4_k were not
// measured past 12). tests/layer/chunks.cpp checks small_max_rows against
// every type.
constexpr std::size_t small_max_rows_of(dtype t) noexcept
{
    return t == dtype::bf16 || t == dtype::f16 ? 20 : t == dtype::f32 ? 16 : 12;
}
inline constexpr std::size_t small_max_rows = 20;

// Y[:, o0:o1] = X . W[o0:o1, :]ᵀ; other columns of Y are not touched.
// Requires W.cols == X.cols, o0 <= o1 <= W.rows, Y.rows == X.rows,
// o1 <= Y.cols. act: act_mode::int8 quantises X for q8/q4_0/q4_k weights
// (any row count, K <= act_q8_stack_elems; kernels/qdot.hpp) and runs
// integer dots; exact otherwise.
template <weight_type W, class Arch = xsimd::default_arch>
void linear(const weight_view<W>& w /*[O, K]*/, cmatrix_view<float> x /*[n, K]*/, std::size_t o0, std::size_t o1,
    matrix_view<float> y /*[n, O]*/, act_mode act = act_mode::exact) noexcept
{
    if (x.rows == 0 || o0 >= o1)
        return;
    if (act == act_mode::int8 && detail::try_int8<Arch, W>(&w, nullptr, x, o0, o1, y))
        return;
    switch (x.rows) {
    case 1:
        detail::linear_gemv<Arch, W, 1>(w, x.data, x.stride, o0, o1, y.data, y.stride);
        break;
    case 2:
        detail::linear_gemv<Arch, W, 2>(w, x.data, x.stride, o0, o1, y.data, y.stride);
        break;
    case 3:
        detail::linear_gemv<Arch, W, 3>(w, x.data, x.stride, o0, o1, y.data, y.stride);
        break;
    case 4:
        detail::linear_gemv<Arch, W, 4>(w, x.data, x.stride, o0, o1, y.data, y.stride);
        break;
    default:
        if (x.rows <= small_max_rows_of(W::id))
            detail::linear_rows<Arch, W>(w, x, o0, o1, y);
        else
            detail::linear_gemm<Arch, W>(w, x, o0, o1, y);
        break;
    }
}

// H[:, f0:f1] = silu(X . Wg[f0:f1]ᵀ) * (X . Wu[f0:f1]ᵀ), one pass over X for
// both; other columns of H are not touched. Requires Wg and Wu both [F, d],
// X.cols == d, f0 <= f1 <= F, H.rows == X.rows, f1 <= H.cols.
template <weight_type W, class Arch = xsimd::default_arch>
void swiglu_gate_up(const weight_view<W>& gate /*[F, d]*/, const weight_view<W>& up /*[F, d]*/,
    cmatrix_view<float> x /*[n, d]*/, std::size_t f0, std::size_t f1, matrix_view<float> h /*[n, F]*/,
    act_mode act = act_mode::exact) noexcept
{
    if (x.rows == 0 || f0 >= f1)
        return;
    if (act == act_mode::int8 && detail::try_int8<Arch, W>(&gate, &up, x, f0, f1, h))
        return;
    switch (x.rows) {
    case 1:
        detail::gate_up_gemv<Arch, W, 1>(gate, up, x.data, x.stride, f0, f1, h.data, h.stride);
        break;
    case 2:
        detail::gate_up_gemv<Arch, W, 2>(gate, up, x.data, x.stride, f0, f1, h.data, h.stride);
        break;
    case 3:
        detail::gate_up_gemv<Arch, W, 3>(gate, up, x.data, x.stride, f0, f1, h.data, h.stride);
        break;
    case 4:
        detail::gate_up_gemv<Arch, W, 4>(gate, up, x.data, x.stride, f0, f1, h.data, h.stride);
        break;
    default:
        if (x.rows <= small_max_rows_of(W::id))
            detail::gate_up_rows<Arch, W>(gate, up, x, f0, f1, h);
        else
            detail::gate_up_gemm<Arch, W>(gate, up, x, f0, f1, h);
        break;
    }
}

} // namespace kdial

namespace kdial {
// The row class of an n-row call on weights of type t, the key to a row's
// bits: n itself on the GEMV path (bits depend on the exact count,
// 1..gemv_max_rows), small_max_rows_of(t) on the small-row path, one more
// on the GEMM. Two calls of one class give a row the same bits (for the
// GEMV, at the same position), whatever else they hold (distributed/ pads
// rows to keep them).
constexpr std::size_t row_class(std::size_t n, dtype t) noexcept
{
    const std::size_t s = small_max_rows_of(t);
    return n <= gemv_max_rows ? n : n <= s ? s : s + 1;
}
} // namespace kdial
