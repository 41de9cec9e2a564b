// Weight-streaming GEMV for a few rows of activations (decode: n <= 4),
// the memory-bound half of an expert's FFN (stage 3). Each weight row is read
// once, converted in registers (bf16, q8) and reused for all n rows of X.
// Deterministic: the sum for one (x row, weight row) pair uses the same lanes,
// chains and order whatever the output range or the row group it is in.
// Serial, noexcept, no allocation, no checks (the caller validates).
#pragma once

#include <cstddef>

#include "../core/views.hpp"
#include "../simd/compat.hpp"
#include "../simd/convert.hpp"
#include "../simd/vec.hpp"
#include "weights.hpp"

namespace kdial::detail {

// Independent accumulator chains per (x row, weight row) pair. With NR rows
// of X and R weight rows in flight, R * NR * chains accumulators (<= 8 here)
// hide the 4-cycle FMA latency on two FMA ports without spilling on AVX2's 16
// registers. Depends on NR only, so every output of a call sums the same way.
template <int NR>
inline constexpr int gemv_chains = NR <= 2 ? 2 : 1;

// out[r * NR + i] = dot(rows[r][0:cols], x[i * ldx + 0:cols]) for r < R, i < NR.
// Summation order for each pair: lane-wise over vector index v in chain
// v % C, chains added, lanes summed (hsum), then the scalar tail in order.
template <class Arch, class S, int NR, int R>
inline void gemv_rows(const S* const* rows, std::size_t cols, const float* x, std::size_t ldx, float* out) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t L = B::size;
    constexpr int C = gemv_chains<NR>;
    B acc[R][NR][C];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i)
            for (int c = 0; c < C; ++c)
                acc[r][i][c] = B(0.0f);

    std::size_t k = 0;
    if constexpr (std::is_same_v<S, q8_block>) {
        // Whole blocks: 32 / L vectors each (a multiple of C), one scale load.
        static_assert(q8_block_size % (L * C) == 0);
        const std::size_t nb = cols / q8_block_size;
        for (std::size_t b = 0; b < nb; ++b, k += q8_block_size) {
            B wv[R][q8_block_size / L];
            for (int r = 0; r < R; ++r) {
                const q8_block& blk = rows[r][b];
                const B s(blk.scale);
                for (std::size_t v = 0; v < q8_block_size / L; ++v)
                    wv[r][v] = simd::load_i8<Arch>(blk.q + v * L) * s;
            }
            for (std::size_t v = 0; v < q8_block_size / L; ++v)
                for (int i = 0; i < NR; ++i) {
                    const B xv = B::load_unaligned(x + i * ldx + k + v * L);
                    for (int r = 0; r < R; ++r)
                        acc[r][i][v % C] = simd::fma(wv[r][v], xv, acc[r][i][v % C]);
                }
        }
    } else {
        for (; k + C * L <= cols; k += C * L)
            for (int c = 0; c < C; ++c) {
                B wv[R];
                for (int r = 0; r < R; ++r)
                    wv[r] = simd::load_weights<Arch>(rows[r], k + c * L);
                for (int i = 0; i < NR; ++i) {
                    const B xv = B::load_unaligned(x + i * ldx + k + c * L);
                    for (int r = 0; r < R; ++r)
                        acc[r][i][c] = simd::fma(wv[r], xv, acc[r][i][c]);
                }
            }
    }
    // Remaining whole vectors (fewer than C, or inside the last partial q8
    // block), continuing the chain pattern v % C.
    for (int c = 0; k + L <= cols; k += L, c = (c + 1) % C)
        for (int r = 0; r < R; ++r) {
            const B wv = simd::load_weights<Arch>(rows[r], k);
            for (int i = 0; i < NR; ++i)
                acc[r][i][c] = simd::fma(wv, B::load_unaligned(x + i * ldx + k), acc[r][i][c]);
        }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i) {
            B a = acc[r][i][0];
            for (int c = 1; c < C; ++c)
                a += acc[r][i][c];
            float s = simd::hsum(a);
            for (std::size_t t = k; t < cols; ++t)
                s = std::fma(simd::weight_at(rows[r], t), x[i * ldx + t], s);
            out[r * NR + i] = s;
        }
}

// Weight rows per pass for NR rows of X (register budget, see gemv_chains).
template <int NR>
inline constexpr int gemv_rows_per_pass = NR == 1 ? 4 : 2;

// y[i, o] = x[i, :] . w[o, :] for o in [o0, o1), i < NR.
template <class Arch, weight_type W, int NR>
void linear_gemv(const weight_view<W>& w, const float* x, std::size_t ldx, std::size_t o0, std::size_t o1,
                 float* y, std::size_t ldy) noexcept
{
    using S = typename W::storage;
    constexpr int R = gemv_rows_per_pass<NR>;
    float out[R * NR];
    std::size_t o = o0;
    for (; o + R <= o1; o += R) {
        const S* rows[R];
        for (int r = 0; r < R; ++r)
            rows[r] = w.row(o + r);
        gemv_rows<Arch, S, NR, R>(rows, w.cols, x, ldx, out);
        for (int r = 0; r < R; ++r)
            for (int i = 0; i < NR; ++i)
                y[i * ldy + o + r] = out[r * NR + i];
    }
    for (; o < o1; ++o) {
        const S* rows[1] = {w.row(o)};
        gemv_rows<Arch, S, NR, 1>(rows, w.cols, x, ldx, out);
        for (int i = 0; i < NR; ++i)
            y[i * ldy + o] = out[i];
    }
}

// h[i, f] = silu(x[i] . gate[f]) * (x[i] . up[f]) for f in [f0, f1), i < NR.
// The gate and up rows of a feature go through one pass over x.
template <class Arch, weight_type W, int NR>
void gate_up_gemv(const weight_view<W>& gate, const weight_view<W>& up, const float* x, std::size_t ldx,
                  std::size_t f0, std::size_t f1, float* h, std::size_t ldh) noexcept
{
    using S = typename W::storage;
    constexpr int P = gemv_rows_per_pass<NR> / 2; // features per pass
    float out[2 * P * NR];
    std::size_t f = f0;
    if constexpr (P > 1) {
        for (; f + P <= f1; f += P) {
            const S* rows[2 * P];
            for (int p = 0; p < P; ++p) {
                rows[2 * p] = gate.row(f + p);
                rows[2 * p + 1] = up.row(f + p);
            }
            gemv_rows<Arch, S, NR, 2 * P>(rows, gate.cols, x, ldx, out);
            for (int p = 0; p < P; ++p)
                for (int i = 0; i < NR; ++i)
                    h[i * ldh + f + p] = simd::silu(out[2 * p * NR + i]) * out[(2 * p + 1) * NR + i];
        }
    }
    for (; f < f1; ++f) {
        const S* rows[2] = {gate.row(f), up.row(f)};
        gemv_rows<Arch, S, NR, 2>(rows, gate.cols, x, ldx, out);
        for (int i = 0; i < NR; ++i)
            h[i * ldh + f] = simd::silu(out[i]) * out[NR + i];
    }
}

} // namespace kdial::detail
