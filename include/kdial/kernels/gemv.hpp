// Weight-streaming GEMV for a few rows of activations (decode: n <= 4),
// the memory-bound half of an expert's FFN (stage 3). Each weight row is read
// once, converted in registers (bf16, f16, q8, q4_0, q4_k) and reused for all n rows of X,
// while the next pass's rows are prefetched (measured on Sapphire Rapids,
// 1 core, cold weights: q8 8.0 -> 14.0 GB/s, bf16 14.5 -> 15.7 GB/s, of a
// 15.9 GB/s read roofline; without it the hardware prefetchers leave the
// conversion and the memory latency serialised). The prefetch stops at L2
// (prefetcht1): a pass ahead is 16-32 KiB of rows, which with x in L1 too
// overflowed Zen 4's 32 KiB L1 and evicted the lines before their use
// (bench_moe decode, 1 thread, of the read bandwidth: bf16 0.49-0.61 ->
// 0.71-0.80, q8 0.46-0.55 -> 0.69-0.73, f32 0.54-0.70 -> 0.82-0.94).
// Deterministic: the sum for one (x row, weight row) pair uses the same lanes,
// chains and order whatever the output range or the row group it is in.
// Serial, noexcept, no allocation, no checks (the caller validates).
#pragma once

#include <cstddef>
#include <type_traits>

#include "../core/views.hpp"
#include "../simd/compat.hpp"
#include "../simd/convert.hpp"
#include "../simd/vec.hpp"
#include "row_groups.hpp"
#include "weights.hpp"

namespace kdial::detail {

// Independent accumulator chains per (x row, weight row) pair. With NR rows
// of X and R weight rows in flight, R * NR * chains accumulators (<= 8 here)
// hide the 4-cycle FMA latency on two FMA ports without spilling on AVX2's 16
// registers. Depends on NR only, so every output of a call sums the same way.
template <int NR> inline constexpr int gemv_chains = NR <= 2 ? 2 : 1;

// out[r * NR + i] = dot(rows[r][0:cols], x[i * ldx + 0:cols]) for r < R, i < NR.
// Summation order for each pair: lane-wise over vector index v in chain
// v % C, chains added, lanes summed (hsum), then the scalar tail in order
// (C = gemv_chains<NR> unless given: a pair's bits depend on C only, not on
// NR or R, which is how routing/router.hpp gets row-count-free logits
// through linear_gemv).
// `next` holds R rows to prefetch while these stream (the next pass's rows,
// or `rows` again on the last pass): each step touches the same byte offset
// in them, so they are in L2 when their pass starts. A hint only; it does
// not change any result.
template <class Arch, class S, int NR, int R, int C = gemv_chains<NR>>
inline void gemv_rows(
    const S* const* rows, const S* const* next, std::size_t cols, const float* x, std::size_t ldx, float* out) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t L = B::size;
    B acc[R][NR][C];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i)
            for (int c = 0; c < C; ++c)
                acc[r][i][c] = B(0.0f);

    std::size_t k = 0;
    if constexpr (simd::is_scaled_block<S>) {
        // Whole blocks (q8, q4_0): the block's integer weights (q, or q - 8)
        // times x summed first (32 / L vectors, lane-wise: one multiply then
        // FMAs), then scaled once, acc[b % C] = fma(block sum, d, acc) with
        // the block's f16 scale d widened exactly. This rounds differently
        // from dot(fl(d * q), x); the error bound is derived in
        // tests/kernels/linear.cpp (still gamma_K * sum |w x|).
        // Block b goes to chain c = b % C, a constant in `block` (C blocks
        // per step, unrolled): with c known only at run time GCC 12 kept
        // acc on the stack, a load and a store per block and row pair on
        // the loop's critical path (Zen 4, one matrix in L2, n = 1, GB/s:
        // q8 AVX2 20.5 -> 24.2, q4_0 AVX-512 10.1 -> 11.1; q8 AVX-512 21
        // either way).
        constexpr std::size_t V = 32 / L;
        const std::size_t nb = cols / 32;
        const auto block = [&]<int c>(std::size_t b) {
            const std::size_t k = 32 * b;
            for (int r = 0; r < R; ++r)
                simd::prefetch_l2(next[r] + b);
            B bs[R][NR];
            if constexpr (std::is_same_v<S, q8_block>) {
                for (std::size_t v = 0; v < V; ++v) {
                    B q[R];
                    for (int r = 0; r < R; ++r)
                        q[r] = simd::block_ints<Arch>(rows[r][b], v * L);
                    for (int i = 0; i < NR; ++i) {
                        B xv = B::load_unaligned(x + i * ldx + k + v * L);
                        // Held in a register for its R uses, except with
                        // 16 vector registers at NR > 4, where R * NR block
                        // sums already fill them (measured slower, AVX2).
                        if constexpr (R > 1 && (NR <= 4 || simd::is_avx512_arch<Arch>))
                            simd::in_register(xv);
                        for (int r = 0; r < R; ++r)
                            bs[r][i] = v == 0 ? q[r] * xv : simd::fma(q[r], xv, bs[r][i]);
                    }
                }
            } else {
                // q4_0: a row's whole block decoded at once (the same
                // values, and the same order v = 0, 1, ... per sum).
                for (int r = 0; r < R; ++r) {
                    B q[V];
                    simd::block_ints_all<Arch>(rows[r][b], q);
                    for (int i = 0; i < NR; ++i) {
                        bs[r][i] = q[0] * B::load_unaligned(x + i * ldx + k);
                        for (std::size_t v = 1; v < V; ++v)
                            bs[r][i] = simd::fma(q[v], B::load_unaligned(x + i * ldx + k + v * L), bs[r][i]);
                    }
                }
            }
            for (int r = 0; r < R; ++r) {
                const B s(simd::scale_of(rows[r][b]));
                for (int i = 0; i < NR; ++i)
                    acc[r][i][c] = simd::fma(bs[r][i], s, acc[r][i][c]);
            }
        };
        std::size_t b = 0;
        for (; b + C <= nb; b += C)
            for_each_index<C>([&]<int c>() { block.template operator()<c>(b + c); });
        for_each_index<C>([&]<int c>() {
            if (b + c < nb)
                block.template operator()<c>(b + c);
        });
        k = 32 * nb;
    } else if constexpr (std::is_same_v<S, q4_k_block>) {
        // Super-blocks of 256 (cols % 256 == 0): the scales D and offsets M
        // of all 8 sub-blocks once per row (AVX-512: per sub-block a
        // 16-entry table of its values), then each vector's weights
        // fma(q, D, -M) (the values simd::load_weights gives) into the
        // chains in the vector order v % C, as the generic path below.
        constexpr std::size_t V = 32 / L;
        const std::size_t nb = cols / qk_k;
        for (std::size_t b = 0; b < nb; ++b) {
            simd::q4_k_scales sc[R]; // all 8 sub-blocks' D and M, once per row
            for (int r = 0; r < R; ++r)
                sc[r] = simd::scales_of(rows[r][b]);
            for (std::size_t j = 0; j < 8; ++j, k += 32) {
                if (j < 3) // a super-block is 144 bytes: at most 4 lines
                    for (int r = 0; r < R; ++r)
                        simd::prefetch_l2(reinterpret_cast<const char*>(next[r] + b) + 64 * j);
                else if (j == 3)
                    for (int r = 0; r < R; ++r)
                        simd::prefetch_l2(reinterpret_cast<const char*>(next[r] + b) + sizeof(S) - 1);
                k_sub_scale ds[R];
                B lut[R];
                for (int r = 0; r < R; ++r) {
                    ds[r] = { sc[r].d[j], sc[r].m[j] };
                    lut[r] = simd::q4_k_lut<Arch>(ds[r]);
                }
                // Vector index k / L + v is v mod C (k is a multiple of
                // V * L): c is a constant of the unrolled loop.
                static_assert(V % C == 0);
                for (std::size_t v = 0; v < V; ++v) {
                    const int c = int(v % C);
                    B wv[R];
                    for (int r = 0; r < R; ++r)
                        wv[r] = simd::load_q4_k<Arch>(rows[r][b], j * 32 + v * L, ds[r], lut[r]);
                    for (int i = 0; i < NR; ++i) {
                        B xv = B::load_unaligned(x + i * ldx + k + v * L);
                        if constexpr (R > 1)
                            simd::in_register(xv);
                        for (int r = 0; r < R; ++r)
                            acc[r][i][c] = simd::fma(wv[r], xv, acc[r][i][c]);
                    }
                }
            }
        }
    } else {
        for (; k + C * L <= cols; k += C * L) {
            for (std::size_t p = 0; p < C * L * sizeof(S); p += 64)
                for (int r = 0; r < R; ++r)
                    simd::prefetch_l2(reinterpret_cast<const char*>(next[r] + k) + p);
            for (int c = 0; c < C; ++c) {
                // Each loaded vector serves NR (or R) FMAs: held in a
                // register (simd::in_register), not reloaded per FMA, for
                // NR > 4 (the small-row path). Not at decode (n <= 4):
                // there the compiler's own choice streams faster from
                // memory, f32 ~10 % (Zen 5) and bf16 on Zen 4: bench_moe
                // decode bf16, 1 thread, two sets of five alternating
                // rounds, GB/s medians 18.0-18.4 -> 19.7-19.9 (k = 1) and
                // 16.7-17.9 -> 19.2-19.3 (k = 8), ahead in 19 of 20
                // pairs (the AVX2 build: within run-order noise).
                constexpr bool hold = NR > 4;
                B wv[R];
                for (int r = 0; r < R; ++r) {
                    B t = simd::load_weights<Arch>(rows[r], k + c * L);
                    if constexpr (hold) // NR > 4
                        simd::in_register(t);
                    wv[r] = t;
                }
                for (int i = 0; i < NR; ++i) {
                    B xv = B::load_unaligned(x + i * ldx + k + c * L);
                    if constexpr (hold && R > 1)
                        simd::in_register(xv);
                    for (int r = 0; r < R; ++r)
                        acc[r][i][c] = simd::fma(wv[r], xv, acc[r][i][c]);
                }
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
    // The lane sums first, in loops with no loop inside (so every compiler
    // unrolls them and indexes acc by constants only; clang 14 does not
    // unroll a loop that holds another, and with acc[r][i] indexed at run
    // time here it kept all of acc on the stack in the loops above, a store
    // per FMA: half the speed), then the scalar tails.
    float sums[R * NR];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i) {
            B a = acc[r][i][0];
            for (int c = 1; c < C; ++c)
                a += acc[r][i][c];
            sums[r * NR + i] = simd::hsum(a);
        }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i) {
            float s = sums[r * NR + i];
            for (std::size_t t = k; t < cols; ++t)
                s = std::fma(simd::weight_at(rows[r], t), x[i * ldx + t], s);
            out[r * NR + i] = s;
        }
}

// Weight rows per pass for NR rows of X (register budget, see gemv_chains).
template <int NR> inline constexpr int gemv_rows_per_pass = NR == 1 ? 4 : 2;

// y[i, o] = x[i, :] . w[o, :] for o in [o0, o1), i < NR, each sum with C
// chains (gemv_rows).
template <class Arch, weight_type W, int NR, int C = gemv_chains<NR>>
void linear_gemv(const weight_view<W>& w, const float* x, std::size_t ldx, std::size_t o0, std::size_t o1, float* y,
    std::size_t ldy) noexcept
{
    using S = typename W::storage;
    constexpr int R = gemv_rows_per_pass<NR>;
    float out[R * NR];
    std::size_t o = o0;
    for (; o + R <= o1; o += R) {
        const S* rows[R];
        const S* next[R];
        const std::size_t on = o + 2 * R <= o1 ? o + R : o;
        for (int r = 0; r < R; ++r) {
            rows[r] = w.row(o + r);
            next[r] = w.row(on + r);
        }
        gemv_rows<Arch, S, NR, R, C>(rows, next, w.cols, x, ldx, out);
        for (int r = 0; r < R; ++r)
            for (int i = 0; i < NR; ++i)
                y[i * ldy + o + r] = out[r * NR + i];
    }
    for (; o < o1; ++o) {
        const S* rows[1] = { w.row(o) };
        gemv_rows<Arch, S, NR, 1, C>(rows, rows, w.cols, x, ldx, out);
        for (int i = 0; i < NR; ++i)
            y[i * ldy + o] = out[i];
    }
}

// h[i, f] = silu(x[i] . gate[f]) * (x[i] . up[f]) for f in [f0, f1), i < NR.
// The gate and up rows of a feature go through one pass over x.
template <class Arch, weight_type W, int NR>
void gate_up_gemv(const weight_view<W>& gate, const weight_view<W>& up, const float* x, std::size_t ldx, std::size_t f0,
    std::size_t f1, float* h, std::size_t ldh) noexcept
{
    using S = typename W::storage;
    constexpr int P = gemv_rows_per_pass<NR> / 2; // features per pass
    float out[2 * P * NR];
    std::size_t f = f0;
    if constexpr (P > 1) {
        for (; f + P <= f1; f += P) {
            const S* rows[2 * P];
            const S* next[2 * P];
            const std::size_t fn = f + 2 * P <= f1 ? f + P : f;
            for (int p = 0; p < P; ++p) {
                rows[2 * p] = gate.row(f + p);
                rows[2 * p + 1] = up.row(f + p);
                next[2 * p] = gate.row(fn + p);
                next[2 * p + 1] = up.row(fn + p);
            }
            gemv_rows<Arch, S, NR, 2 * P>(rows, next, gate.cols, x, ldx, out);
            for (int p = 0; p < P; ++p)
                for (int i = 0; i < NR; ++i)
                    h[i * ldh + f + p] = simd::silu(out[2 * p * NR + i]) * out[(2 * p + 1) * NR + i];
        }
    }
    for (; f < f1; ++f) {
        const S* rows[2] = { gate.row(f), up.row(f) };
        const S* next[2] = { gate.row(f + 1 < f1 ? f + 1 : f), up.row(f + 1 < f1 ? f + 1 : f) };
        gemv_rows<Arch, S, NR, 2>(rows, next, gate.cols, x, ldx, out);
        for (int i = 0; i < NR; ++i)
            h[i * ldh + f] = simd::silu(out[i]) * out[NR + i];
    }
}

} // namespace kdial::detail
