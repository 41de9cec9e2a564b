// Register-tiled GEMM for many rows of activations (prefill: n > 4), the
// compute-bound half of an expert's FFN (stage 3). Weights are packed, K
// block by K block, into a small f32 panel on the stack (bf16, f16 and q8
// are converted while packing, L x L blocks transposed in registers, see
// pack.hpp), then a 6 x 2-vector micro-kernel broadcasts X and runs 12
// independent FMA chains. Every output element is one sequential FMA chain
// over k = 0..K-1, so it does not depend on the output range, the panel it
// fell in or the row block. Serial, noexcept, no heap allocation.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "../core/cache.hpp"
#include "../core/views.hpp"
#include "../simd/compat.hpp"
#include "../simd/convert.hpp"
#include "../simd/vec.hpp"
#include "pack.hpp"
#include "weights.hpp"

namespace kdial::detail {

// Blocking. A panel is NC = NV vectors of output columns by KC inputs; an
// MR x NV tile of accumulators stays in registers: 6 x 2 vectors, 12 FMA
// chains, 8 loads per 12 FMAs, fits AVX2's 16 registers. Panel KC x NC
// floats = 16 KiB (AVX2) / 32 KiB (AVX-512), L1-resident; partial sums for
// MC rows live in `part` (MC x NC floats = 64 KiB), so up to MC rows share
// one packing of the weights (mc_rows: as many as half the L2 holds). Measured on Sapphire Rapids (AVX-512, 1 core,
// d=2048, F=1024, gate+up, n=64, 256-column calls): the scalar scatter-pack
// took 35% of the time (40% for f32); the vectorised transpose-pack took
// bf16 from 104-118 to 137-157 GFLOP/s. With it, 6x2/KC=256, 6x4/KC=64 or
// 128, 8x3/KC=128 and 12x2/KC=256 all measured 148-157 GFLOP/s (noise
// larger than the differences), so 6 x 2 stays on every arch. The micro
// kernel alone on an L1-hot panel reached about 180 GFLOP/s (0.75 of peak).
template <class Arch> struct gemm_blocking {
    static constexpr std::size_t lanes = xsimd::batch<float, Arch>::size;
    static constexpr int nv = 2;
    static constexpr std::size_t nc = nv * lanes;
    static constexpr int mr = 6;
    static constexpr std::size_t kc = 256; // multiple of q8_block_size and of lanes
    static constexpr std::size_t mc = 16384 / nc; // most rows per part block (the stack arrays)
    static_assert(kc % q8_block_size == 0 && kc % lanes == 0);

    // Rows per part block on this CPU: their x block (rows x kc floats) fits
    // half the L2 read at run time (core/cache.hpp; 512 rows with a 1 MiB
    // L2, 256 with Zen 3's 512 KiB; the constant mc gave AVX2 a 1 MiB x
    // block), a multiple of mr, at most mc. Rows are independent sums, so
    // this never changes a result.
    static std::size_t mc_rows() noexcept
    {
        static const std::size_t m = std::clamp<std::size_t>(
            cpu_caches().l2 / 2 / (kc * sizeof(float)) / mr * mr, std::size_t { 4 } * mr, mc / mr * mr);
        return m;
    }
};

// part[i, 0:NC] (+)= sum_k x[i * ldx + k] * panel[k, 0:NC] for i < MR, k < kc,
// each element one FMA chain in k order. first: start from zero, not part.
// pf[0:npf]: cache lines to bring into L2, spread evenly over the k loop so
// they overlap the FMAs (hints only: no effect on results).
template <class Arch, int MR>
inline void gemm_micro(std::size_t kc, const float* panel, const float* x, std::size_t ldx, float* part, bool first,
    const char* const* pf, std::size_t npf) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t L = B::size;
    constexpr int NV = gemm_blocking<Arch>::nv;
    constexpr std::size_t NC = NV * L;
    B c[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v)
            c[i][v] = first ? B(0.0f) : B::load_aligned(part + i * NC + v * L);
    const auto step = [&](std::size_t k) {
        B b[NV];
        for (int v = 0; v < NV; ++v)
            b[v] = B::load_aligned(panel + k * NC + v * L);
        for (int i = 0; i < MR; ++i) {
            const B a(x[i * ldx + k]);
            for (int v = 0; v < NV; ++v)
                c[i][v] = simd::fma(a, b[v], c[i][v]);
        }
    };
    std::size_t k = 0;
    for (std::size_t p = 0; p < npf; ++p) {
        simd::prefetch_l2(pf[p]);
        for (const std::size_t ke = (p + 1) * kc / npf; k < ke; ++k)
            step(k);
    }
    for (; k < kc; ++k)
        step(k);
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v)
            c[i][v].store_aligned(part + i * NC + v * L);
}

// Appends to pf the cache lines of src[c][k0, k0 + kn) for the non-null rows.
template <class S, std::size_t NC>
inline std::size_t gemm_lines(
    const S* const* src, std::size_t k0, std::size_t kn, const char** pf, std::size_t npf) noexcept
{
    constexpr std::size_t G = simd::weight_group<S>;
    for (std::size_t c = 0; c < NC; ++c) {
        if (src[c] == nullptr)
            continue;
        const auto b = reinterpret_cast<std::uintptr_t>(src[c] + k0 / G) & ~std::uintptr_t(63);
        const auto e = reinterpret_cast<std::uintptr_t>(src[c] + (k0 + kn + G - 1) / G);
        for (std::uintptr_t p = b; p < e; p += 64)
            pf[npf++] = reinterpret_cast<const char*>(p);
    }
    return npf;
}

// part[0:m, :] = x[0:m, :] . panel-columns(src)ᵀ over all K, K block by K
// block. While a block computes, the rows the next pack reads (this panel's
// next K block, or after the last one the first block of `next`, the next
// panel's rows, if not null) are prefetched into L2 from inside the micro
// kernel. Measured (Sapphire Rapids, 1 core, n = 64, cold weights): f32
// 0.48 -> 0.54 of FMA peak, bf16 0.53 -> 0.57; a burst of prefetches at the
// start of the pack (the previous scheme) measured no better than none.
template <class Arch, class S>
inline void gemm_panel(const S* const* src, const S* const* next, std::size_t K, const float* x, std::size_t ldx,
    std::size_t m, float* panel, float* part) noexcept
{
    using G = gemm_blocking<Arch>;
    constexpr std::size_t NC = G::nc;
    constexpr int MR = G::mr;
    constexpr std::size_t max_lines = NC * (G::kc * sizeof(S) / simd::weight_group<S> / 64 + 2);
    if (K == 0) {
        std::fill(part, part + m * NC, 0.0f);
        return;
    }
    const std::size_t calls = (m + MR - 1) / MR;
    for (std::size_t k0 = 0; k0 < K; k0 += G::kc) {
        const std::size_t kc = std::min(G::kc, K - k0);
        const bool first = k0 == 0;
        pack_panel<Arch, NC>(src, k0, kc, panel);
        const char* pf[max_lines];
        std::size_t npf = 0;
        if (k0 + kc < K)
            npf = gemm_lines<S, NC>(src, k0 + kc, std::min(G::kc, K - k0 - kc), pf, 0);
        else if (next != nullptr)
            npf = gemm_lines<S, NC>(next, 0, std::min(G::kc, K), pf, 0);
        const auto lo = [&](std::size_t call) { return call * npf / calls; };
        const float* xk = x + k0;
        std::size_t i = 0, q = 0;
        for (; i + MR <= m; i += MR, ++q)
            gemm_micro<Arch, MR>(kc, panel, xk + i * ldx, ldx, part + i * NC, first, pf + lo(q), lo(q + 1) - lo(q));
        const char* const* pq = pf + lo(q);
        const std::size_t nq = lo(q + 1) - lo(q);
        switch (m - i) {
        case 1:
            gemm_micro<Arch, 1>(kc, panel, xk + i * ldx, ldx, part + i * NC, first, pq, nq);
            break;
        case 2:
            gemm_micro<Arch, 2>(kc, panel, xk + i * ldx, ldx, part + i * NC, first, pq, nq);
            break;
        case 3:
            gemm_micro<Arch, 3>(kc, panel, xk + i * ldx, ldx, part + i * NC, first, pq, nq);
            break;
        case 4:
            gemm_micro<Arch, 4>(kc, panel, xk + i * ldx, ldx, part + i * NC, first, pq, nq);
            break;
        case 5:
            gemm_micro<Arch, 5>(kc, panel, xk + i * ldx, ldx, part + i * NC, first, pq, nq);
            break;
        default:
            break;
        }
    }
}

// y[:, o] = x . w[o]ᵀ for o in [o0, o1).
template <class Arch, weight_type W>
void linear_gemm(
    const weight_view<W>& w, cmatrix_view<float> x, std::size_t o0, std::size_t o1, matrix_view<float> y) noexcept
{
    using S = typename W::storage;
    using G = gemm_blocking<Arch>;
    constexpr std::size_t NC = G::nc;
    alignas(64) float panel[G::kc * NC];
    alignas(64) float part[G::mc * NC];
    const std::size_t mc = G::mc_rows();
    for (std::size_t j = o0; j < o1; j += NC) {
        const std::size_t nc = std::min(NC, o1 - j);
        const S* src[NC];
        const S* nsrc[NC]; // the next panel's rows
        for (std::size_t c = 0; c < NC; ++c) {
            src[c] = c < nc ? w.row(j + c) : nullptr;
            nsrc[c] = j + NC + c < o1 ? w.row(j + NC + c) : nullptr;
        }
        for (std::size_t r0 = 0; r0 < x.rows; r0 += mc) {
            const std::size_t m = std::min(mc, x.rows - r0);
            const S* const* next = r0 + mc < x.rows ? src : j + NC < o1 ? nsrc : nullptr;
            gemm_panel<Arch>(src, next, w.cols, x.row(r0), x.stride, m, panel, part);
            for (std::size_t i = 0; i < m; ++i)
                std::memcpy(y.row(r0 + i) + j, part + i * NC, nc * sizeof(float));
        }
    }
}

// h[:, f] = silu(x . gate[f]ᵀ) * (x . up[f]ᵀ) for f in [f0, f1): a panel holds
// NC/2 gate columns then the same NC/2 up columns, so X is read once for both.
template <class Arch, weight_type W>
void gate_up_gemm(const weight_view<W>& gate, const weight_view<W>& up, cmatrix_view<float> x, std::size_t f0,
    std::size_t f1, matrix_view<float> h) noexcept
{
    using S = typename W::storage;
    using B = xsimd::batch<float, Arch>;
    using G = gemm_blocking<Arch>;
    constexpr std::size_t NC = G::nc, L = G::lanes, HC = NC / 2;
    alignas(64) float panel[G::kc * NC];
    alignas(64) float part[G::mc * NC];
    alignas(64) float tmp[HC];
    const std::size_t mc = G::mc_rows();
    for (std::size_t f = f0; f < f1; f += HC) {
        const std::size_t nf = std::min(HC, f1 - f);
        const S* src[NC];
        const S* nsrc[NC]; // the next panel's rows
        for (std::size_t c = 0; c < HC; ++c) {
            src[c] = c < nf ? gate.row(f + c) : nullptr;
            src[HC + c] = c < nf ? up.row(f + c) : nullptr;
            nsrc[c] = f + HC + c < f1 ? gate.row(f + HC + c) : nullptr;
            nsrc[HC + c] = f + HC + c < f1 ? up.row(f + HC + c) : nullptr;
        }
        for (std::size_t r0 = 0; r0 < x.rows; r0 += mc) {
            const std::size_t m = std::min(mc, x.rows - r0);
            const S* const* next = r0 + mc < x.rows ? src : f + HC < f1 ? nsrc : nullptr;
            gemm_panel<Arch>(src, next, gate.cols, x.row(r0), x.stride, m, panel, part);
            // Epilogue: the same vector silu for every column (padding lanes
            // are 0 and give 0), so h does not depend on the panel split.
            for (std::size_t i = 0; i < m; ++i) {
                float* hr = h.row(r0 + i) + f;
                for (std::size_t v = 0; v < HC; v += L) {
                    const B g = B::load_aligned(part + i * NC + v);
                    const B u = B::load_aligned(part + i * NC + HC + v);
                    const B hv = simd::silu(g) * u;
                    if (nf == HC)
                        hv.store_unaligned(hr + v);
                    else
                        hv.store_aligned(tmp + v);
                }
                if (nf != HC)
                    std::memcpy(hr, tmp, nf * sizeof(float));
            }
        }
    }
}

} // namespace kdial::detail
