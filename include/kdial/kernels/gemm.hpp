// Register-tiled GEMM for many rows of activations (prefill: n > 4), the
// compute-bound half of an expert's FFN (stage 3). Weights are packed, K
// block by K block, into a small f32 panel on the stack (bf16 and q8 are
// converted while packing, L x L blocks transposed in registers, see
// pack.hpp), then a 6 x 2-vector micro-kernel broadcasts X and runs 12
// independent FMA chains. Every output element is one sequential FMA chain
// over k = 0..K-1, so it does not depend on the output range, the panel it
// fell in or the row block. Serial, noexcept, no heap allocation.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>

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
// one packing of the weights. Measured on Sapphire Rapids (AVX-512, 1 core,
// d=2048, F=1024, gate+up, n=64, 256-column calls): the scalar scatter-pack
// took 35% of the time (40% for f32); the vectorised transpose-pack took
// bf16 from 104-118 to 137-157 GFLOP/s. With it, 6x2/KC=256, 6x4/KC=64 or
// 128, 8x3/KC=128 and 12x2/KC=256 all measured 148-157 GFLOP/s (noise
// larger than the differences), so 6 x 2 stays on every arch. The micro
// kernel alone on an L1-hot panel reached about 180 GFLOP/s (0.75 of peak).
template <class Arch>
struct gemm_blocking {
    static constexpr std::size_t lanes = xsimd::batch<float, Arch>::size;
    static constexpr int nv = 2;
    static constexpr std::size_t nc = nv * lanes;
    static constexpr int mr = 6;
    static constexpr std::size_t kc = 256; // multiple of q8_block_size and of lanes
    static constexpr std::size_t mc = 16384 / nc;
    static_assert(kc % q8_block_size == 0 && kc % lanes == 0);
};

// part[i, 0:NC] (+)= sum_k x[i * ldx + k] * panel[k, 0:NC] for i < MR, k < kc.
// first: start from zero instead of part.
template <class Arch, int MR>
inline void gemm_micro(std::size_t kc, const float* panel, const float* x, std::size_t ldx, float* part,
                       bool first) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t L = B::size;
    constexpr int NV = gemm_blocking<Arch>::nv;
    constexpr std::size_t NC = NV * L;
    B c[MR][NV];
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v)
            c[i][v] = first ? B(0.0f) : B::load_aligned(part + i * NC + v * L);
    for (std::size_t k = 0; k < kc; ++k) {
        B b[NV];
        for (int v = 0; v < NV; ++v)
            b[v] = B::load_aligned(panel + k * NC + v * L);
        for (int i = 0; i < MR; ++i) {
            const B a(x[i * ldx + k]);
            for (int v = 0; v < NV; ++v)
                c[i][v] = simd::fma(a, b[v], c[i][v]);
        }
    }
    for (int i = 0; i < MR; ++i)
        for (int v = 0; v < NV; ++v)
            c[i][v].store_aligned(part + i * NC + v * L);
}

// part[0:m, :] = x[0:m, :] . panel-columns(src)ᵀ over all K, K-block by K-block.
template <class Arch, class S>
inline void gemm_panel(const S* const* src, std::size_t K, const float* x, std::size_t ldx, std::size_t m,
                       float* panel, float* part) noexcept
{
    using G = gemm_blocking<Arch>;
    constexpr std::size_t NC = G::nc;
    constexpr int MR = G::mr;
    if (K == 0) {
        std::fill(part, part + m * NC, 0.0f);
        return;
    }
    for (std::size_t k0 = 0; k0 < K; k0 += G::kc) {
        const std::size_t kc = std::min(G::kc, K - k0);
        const bool first = k0 == 0;
        const std::size_t ahead = k0 + kc < K ? std::min(G::kc, K - k0 - kc) : 0;
        pack_panel<Arch, NC>(src, k0, kc, panel, ahead);
        const float* xk = x + k0;
        std::size_t i = 0;
        for (; i + MR <= m; i += MR)
            gemm_micro<Arch, MR>(kc, panel, xk + i * ldx, ldx, part + i * NC, first);
        switch (m - i) {
        case 1: gemm_micro<Arch, 1>(kc, panel, xk + i * ldx, ldx, part + i * NC, first); break;
        case 2: gemm_micro<Arch, 2>(kc, panel, xk + i * ldx, ldx, part + i * NC, first); break;
        case 3: gemm_micro<Arch, 3>(kc, panel, xk + i * ldx, ldx, part + i * NC, first); break;
        case 4: gemm_micro<Arch, 4>(kc, panel, xk + i * ldx, ldx, part + i * NC, first); break;
        case 5: gemm_micro<Arch, 5>(kc, panel, xk + i * ldx, ldx, part + i * NC, first); break;
        default: break;
        }
    }
}

// y[:, o] = x . w[o]ᵀ for o in [o0, o1).
template <class Arch, weight_type W>
void linear_gemm(const weight_view<W>& w, cmatrix_view<float> x, std::size_t o0, std::size_t o1,
                 matrix_view<float> y) noexcept
{
    using S = typename W::storage;
    using G = gemm_blocking<Arch>;
    constexpr std::size_t NC = G::nc;
    alignas(64) float panel[G::kc * NC];
    alignas(64) float part[G::mc * NC];
    for (std::size_t j = o0; j < o1; j += NC) {
        const std::size_t nc = std::min(NC, o1 - j);
        const S* src[NC];
        for (std::size_t c = 0; c < NC; ++c)
            src[c] = c < nc ? w.row(j + c) : nullptr;
        for (std::size_t r0 = 0; r0 < x.rows; r0 += G::mc) {
            const std::size_t m = std::min(G::mc, x.rows - r0);
            gemm_panel<Arch>(src, w.cols, x.row(r0), x.stride, m, panel, part);
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
    for (std::size_t f = f0; f < f1; f += HC) {
        const std::size_t nf = std::min(HC, f1 - f);
        const S* src[NC];
        for (std::size_t c = 0; c < HC; ++c) {
            src[c] = c < nf ? gate.row(f + c) : nullptr;
            src[HC + c] = c < nf ? up.row(f + c) : nullptr;
        }
        for (std::size_t r0 = 0; r0 < x.rows; r0 += G::mc) {
            const std::size_t m = std::min(G::mc, x.rows - r0);
            gemm_panel<Arch>(src, gate.cols, x.row(r0), x.stride, m, panel, part);
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
