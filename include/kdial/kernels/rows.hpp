// Small-row expert kernels (stage 3, prefill at low k: 5 to
// small_max_rows_of(type) = 12 rows per expert, 16 for f32, 20 for bf16
// and f16, e.g. ~8 rows per expert at T = 512, k = 1, E = 64 and ~16 at
// k = 2; the measurements that set the bound are in linear.hpp). Between
// the GEMV (n <= 4, kernels/gemv.hpp) and the packed GEMM (kernels/gemm.hpp):
// the packed GEMM converts and transposes every weight into a panel and then
// reuses it for only a few rows, so at 8 rows the pack costs about as much
// as the FMAs (measured 0.17-0.29 of FMA peak, and 8 rows slower than 4).
// Here the weights are converted in registers with no panel, by the GEMV's
// inner kernel (gemv_rows), and each converted vector serves a group of up
// to 8 rows (6 with 16 vector registers). Three levels of blocking: output
// columns in blocks whose weights fit half the L2 (read at run time,
// core/cache.hpp), so a block is streamed from memory once for all row
// groups; rows in near-equal groups; and the inputs in chunks of
// rows_kc (2048), so a group's slice of X stays in L2 while every
// weight row of the block passes over it,
// rows_per_pass weight rows at a time.
// Bits: each output is the sum, in chunk order, of the GEMV's one-chain dot
// products (gemv_chains<NR> == 1 for every group of >= 3 rows) over the
// fixed chunks: it does not depend on the row count (5 ...
// small_max_rows_of(type)), the row group, the column block, the column
// split or the cache sizes. Serial, noexcept, no heap allocation, no checks.
#pragma once

#include <algorithm>
#include <cstddef>
#include <type_traits>

#include "../core/cache.hpp"
#include "../core/views.hpp"
#include "../simd/compat.hpp"
#include "gemv.hpp"
#include "row_groups.hpp"
#include "weights.hpp"

namespace kdial::detail {

// Most rows per group: 8 with 32 vector registers (AVX-512, NEON; 6 for
// q8 and q4_0, whose block sums double the live registers), else 6 (AVX2,
// SSE: 16 registers). Groups of a call hold ceil or floor of n / g rows for
// g = ceil(n / max) groups, so 3 <= rows <= max for any n >= 5.
template <class Arch, class S>
inline constexpr int rows_group_max
    = (simd::is_avx512_arch<Arch> || KDIAL_SIMD_NEON64) && !simd::is_scaled_block<S> ? 8 : 6;

// Weight rows per pass (gemv_rows' R): 3 with 32 vector registers for f32,
// bf16 and f16 (3 x 8 accumulators; each weight vector serves 8 rows and
// each X vector 3 rows), else 2: q8 / q4_0 hold block sums beside the
// accumulators, q4_k its scale tables, AVX2 has 16 registers. R does not
// change any sum's bits. f32 took 3 on Zen 4 (it had measured no faster on
// Zen 5): bench_moe prefill/f32/T:512/k:1, 1 thread, AVX-512, of FMA peak,
// 0.33-0.36 -> 0.38 (two alternating runs).
template <class Arch, class S>
inline constexpr int rows_per_pass = (simd::is_avx512_arch<Arch> || KDIAL_SIMD_NEON64)
        && (std::is_same_v<S, bf16> || std::is_same_v<S, f16> || std::is_same_v<S, float>)
    ? 3
    : 2;

// Inputs per chunk: a constant (the sum is split here, so it must not
// depend on the machine), a multiple of 256 (whole q4_k super-blocks, whole
// q8 / q4_0 blocks) and of every lane count. Each chunk ends in a lane sum
// per (row, weight row) pair, and a group's slice of X (NR rows x chunk
// floats, <= 64 KiB: in L2 on any machine) is reused by every weight row of
// the block. 2048 for every type: at OLMoE sizes a weight row is one chunk,
// streamed whole.
// bench_experts exact_rows, Zen 5, 512 -> 2048 with rows_per_pass 2 -> 3:
// bf16 8 rows 1.21-1.37 -> 0.88-0.96 ms, 16 rows 2.18-2.51 -> 1.63-1.67;
// q8 (R = 2) 8 rows 1.41-1.64 -> 1.02-1.18 ms. f32 kept 512 there (its X
// slice in L1; 2048 measured ~8 % slower with R = 2) until Zen 4 (32 KiB,
// 8-way L1, as Zen 3's), where 2048 is faster: f32 exact_rows, 1 thread,
// fraction of FMA peak at 8 / 16 rows, two alternating rounds, 512 -> 2048:
// AVX2 0.36-0.37 / 0.50-0.53 -> 0.46-0.48 / 0.46-0.58; AVX-512 with R = 3
// (above) 0.40-0.44 / 0.53-0.56 vs R = 2 at 512 0.27-0.34 / 0.43-0.44.
// A row has the GEMV's bits at n = 3, 4 for K <= its chunk.
inline constexpr std::size_t rows_kc = 2048;

// Most output columns of a block (bounds the gate/up scratch on the stack).
inline constexpr std::size_t rows_max_block = 256;

// Weight bytes per column block: half the L2, at least 64 KiB.
inline std::size_t rows_block_bytes() noexcept
{
    static const std::size_t b = std::max<std::size_t>(std::size_t { 64 } << 10, cpu_caches().l2 / 2);
    return b;
}

// Output columns per block for weight rows of row_bytes bytes, `per` rows
// per column (gate + up: 2): a multiple of 4, in [4, rows_max_block].
inline std::size_t rows_block_cols(std::size_t row_bytes, std::size_t per) noexcept
{
    const std::size_t c = rows_block_bytes() / std::max<std::size_t>(1, per * row_bytes) / 4 * 4;
    return std::clamp<std::size_t>(c, 4, rows_max_block);
}

// gemv_rows kept out of line for the small-row drivers below: inlined
// there, GCC 12 ran the f32 AVX2 kernel 1.4x slower (down projection, 8
// rows, weights from memory: 1.05-1.25 vs 0.71-0.86 ms; the same code,
// only inlined). A call covers R weight rows times a chunk (at expert
// sizes 512-2048 inputs), so the call costs nothing measurable.
template <class Arch, class S, int NR, int R>
[[gnu::noinline]] void rows_pass(
    const S* const* rows, const S* const* next, std::size_t cols, const float* x, std::size_t ldx, float* out) noexcept
{
    gemv_rows<Arch, S, NR, R>(rows, next, cols, x, ldx, out);
}

// One chunk of inputs, [k0, k0 + kn), for NR activation rows (x: the
// chunk's first input of the group's first row) over weight rows [j0, j1):
// passes of R rows, then one of 2 and one of 1 for the rest, each pass
// prefetching the next one's rows. row_of(j) is weight row j; dst(i, j) the
// float that row i's sum over weight row j is stored in on the first chunk
// (first) and added to after. The two drivers below differ only in these.
template <class Arch, class S, int NR, int R, class RowOf, class Dst>
inline void rows_chunk(const RowOf& row_of, std::size_t j0, std::size_t j1, std::size_t k0, std::size_t kn,
    const float* x, std::size_t ldx, bool first, const Dst& dst) noexcept
{
    constexpr std::size_t G = simd::weight_group<S>; // inputs per storage element
    float out[R * NR];
    const auto pass = [&]<int P>(std::size_t j) {
        const S* rows[P];
        const S* next[P];
        for (int r = 0; r < P; ++r) {
            rows[r] = row_of(j + std::size_t(r)) + k0 / G;
            next[r] = row_of(std::min(j + std::size_t(P + r), j1 - 1)) + k0 / G;
        }
        rows_pass<Arch, S, NR, P>(rows, next, kn, x, ldx, out);
        for (int r = 0; r < P; ++r)
            for (int i = 0; i < NR; ++i) {
                float& d = dst(i, j + std::size_t(r));
                d = first ? out[r * NR + i] : d + out[r * NR + i];
            }
    };
    std::size_t j = j0;
    for (; j + R <= j1; j += R)
        pass.template operator()<R>(j);
    if (j1 - j >= 2) {
        pass.template operator()<2>(j);
        j += 2;
    }
    if (j < j1)
        pass.template operator()<1>(j);
}

// Y[:, o0:o1] = X . W[o0:o1, :]ᵀ for 5 <= X.rows.
template <class Arch, weight_type W>
void linear_rows(
    const weight_view<W>& w, cmatrix_view<float> x, std::size_t o0, std::size_t o1, matrix_view<float> y) noexcept
{
    using S = typename W::storage;
    constexpr int R = rows_per_pass<Arch, S>;
    constexpr std::size_t kc = rows_kc;
    const std::size_t K = w.cols;
    const std::size_t ob = rows_block_cols(storage_cols<W>(K) * sizeof(S), 1);
    for (std::size_t b0 = o0; b0 < o1; b0 += ob) {
        const std::size_t b1 = std::min(o1, b0 + ob);
        for_row_groups<3, rows_group_max<Arch, S>>(x.rows, [&]<int NR>(std::size_t i0) {
            const float* xg = x.row(i0);
            float* yg = y.row(i0);
            // K == 0 runs one empty chunk (zeros).
            for (std::size_t k0 = 0; k0 < K || k0 == 0; k0 += kc) {
                const std::size_t kn = std::min(kc, K - k0);
                const bool first = k0 == 0;
                rows_chunk<Arch, S, NR, R>([&](std::size_t o) { return w.row(o); }, b0, b1, k0, kn, xg + k0, x.stride,
                    first, [&](int i, std::size_t o) -> float& { return yg[std::size_t(i) * y.stride + o]; });
            }
        });
    }
}

// H[:, f0:f1] = silu(X . Wg[f0:f1]ᵀ) * (X . Wu[f0:f1]ᵀ) for 5 <= X.rows: the
// gate and up rows of the block, interleaved (gate f, up f, gate f + 1,
// ...), go through passes of R rows as linear_rows' do; their sums stay on
// the stack until the last chunk, then h = silu(g) * u as in the GEMV.
template <class Arch, weight_type W>
void gate_up_rows(const weight_view<W>& gate, const weight_view<W>& up, cmatrix_view<float> x, std::size_t f0,
    std::size_t f1, matrix_view<float> h) noexcept
{
    using S = typename W::storage;
    constexpr int M = rows_group_max<Arch, S>;
    constexpr int R = rows_per_pass<Arch, S>;
    constexpr std::size_t kc = rows_kc;
    const std::size_t K = gate.cols;
    const std::size_t fb = rows_block_cols(storage_cols<W>(K) * sizeof(S), 2);
    // gu[i][2 * (f - b0)] is row i's gate sum of feature f, + 1 its up sum.
    float gu[M][2 * rows_max_block];
    for (std::size_t b0 = f0; b0 < f1; b0 += fb) {
        const std::size_t b1 = std::min(f1, b0 + fb), j1 = 2 * (b1 - b0);
        // Interleaved row j of the block: gate (even j) or up (odd j) of
        // feature b0 + j / 2.
        const auto row_of = [&](std::size_t j) { return (j % 2 ? up : gate).row(b0 + j / 2); };
        for_row_groups<3, M>(x.rows, [&]<int NR>(std::size_t i0) {
            const float* xg = x.row(i0);
            for (std::size_t k0 = 0; k0 < K || k0 == 0; k0 += kc) {
                const std::size_t kn = std::min(kc, K - k0);
                const bool first = k0 == 0;
                rows_chunk<Arch, S, NR, R>(row_of, 0, j1, k0, kn, xg + k0, x.stride, first,
                    [&](int i, std::size_t j) -> float& { return gu[i][j]; });
            }
            for (int i = 0; i < NR; ++i) {
                float* hr = h.row(i0 + std::size_t(i));
                for (std::size_t f = b0; f < b1; ++f)
                    hr[f] = simd::silu(gu[i][2 * (f - b0)]) * gu[i][2 * (f - b0) + 1];
            }
        });
    }
}

} // namespace kdial::detail
