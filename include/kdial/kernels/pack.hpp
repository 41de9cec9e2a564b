// Panel packing for the GEMM (stage 3 prefill): weight rows, converted to
// f32, transposed into a k-major panel, L x L blocks at a time with an
// in-register transpose (AVX-512 16 x 16, AVX2 8 x 8, SSE and NEON 4 x 4;
// any other arch transposes through a small stack buffer). The packed
// values are exactly simd::load_weights / simd::weight_at of the source, so
// packing never changes a result. Serial, noexcept, no allocation.
#pragma once

#include <cstddef>
#include <type_traits>

#include "../simd/compat.hpp"
#include "../simd/convert.hpp"

namespace kdial::detail {

// v[i][j] <- v[j][i] for i, j < L (L = batch size), on any arch.
template <class Arch> inline void transpose(xsimd::batch<float, Arch>* v) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t L = B::size;
    if constexpr (false) {
    }
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX512F
    else if constexpr (simd::is_avx512_arch<Arch> && L == 16) {
        __m512 a[16], b[16], c[16];
        for (int i = 0; i < 8; ++i) {
            a[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
        }
        for (int i = 0; i < 4; ++i) {
            const __m512d a0 = _mm512_castps_pd(a[4 * i]), a1 = _mm512_castps_pd(a[4 * i + 1]);
            const __m512d a2 = _mm512_castps_pd(a[4 * i + 2]), a3 = _mm512_castps_pd(a[4 * i + 3]);
            b[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
            b[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
            b[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
            b[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
        }
        for (int i = 0; i < 2; ++i)
            for (int j = 0; j < 4; ++j) {
                c[8 * i + j] = _mm512_shuffle_f32x4(b[8 * i + j], b[8 * i + j + 4], 0x88);
                c[8 * i + j + 4] = _mm512_shuffle_f32x4(b[8 * i + j], b[8 * i + j + 4], 0xdd);
            }
        for (int j = 0; j < 8; ++j) {
            v[j] = B(_mm512_shuffle_f32x4(c[j], c[j + 8], 0x88));
            v[j + 8] = B(_mm512_shuffle_f32x4(c[j], c[j + 8], 0xdd));
        }
    }
#endif
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX
    else if constexpr (simd::is_avx_arch<Arch> && L == 8) {
        __m256 t[8], u[8];
        for (int i = 0; i < 4; ++i) {
            t[2 * i] = _mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]);
        }
        for (int i = 0; i < 2; ++i) {
            const __m256d t0 = _mm256_castps_pd(t[4 * i]), t1 = _mm256_castps_pd(t[4 * i + 1]);
            const __m256d t2 = _mm256_castps_pd(t[4 * i + 2]), t3 = _mm256_castps_pd(t[4 * i + 3]);
            u[4 * i] = _mm256_castpd_ps(_mm256_unpacklo_pd(t0, t2));
            u[4 * i + 1] = _mm256_castpd_ps(_mm256_unpackhi_pd(t0, t2));
            u[4 * i + 2] = _mm256_castpd_ps(_mm256_unpacklo_pd(t1, t3));
            u[4 * i + 3] = _mm256_castpd_ps(_mm256_unpackhi_pd(t1, t3));
        }
        for (int j = 0; j < 4; ++j) {
            v[j] = B(_mm256_permute2f128_ps(u[j], u[j + 4], 0x20));
            v[j + 4] = B(_mm256_permute2f128_ps(u[j], u[j + 4], 0x31));
        }
    }
#endif
#if KDIAL_SIMD_X86 && XSIMD_WITH_SSE2
    else if constexpr (simd::is_sse_arch<Arch> && L == 4) {
        __m128 a = v[0], b = v[1], c = v[2], d = v[3];
        _MM_TRANSPOSE4_PS(a, b, c, d);
        v[0] = B(a);
        v[1] = B(b);
        v[2] = B(c);
        v[3] = B(d);
    }
#endif
#if KDIAL_SIMD_NEON64
    else if constexpr (simd::is_neon64_arch<Arch> && L == 4) {
        // trn pairs lanes (a0 b0 a2 b2 / a1 b1 a3 b3), then halves combine.
        const float32x4x2_t ab = vtrnq_f32(v[0], v[1]), cd = vtrnq_f32(v[2], v[3]);
        v[0] = B(vcombine_f32(vget_low_f32(ab.val[0]), vget_low_f32(cd.val[0])));
        v[1] = B(vcombine_f32(vget_low_f32(ab.val[1]), vget_low_f32(cd.val[1])));
        v[2] = B(vcombine_f32(vget_high_f32(ab.val[0]), vget_high_f32(cd.val[0])));
        v[3] = B(vcombine_f32(vget_high_f32(ab.val[1]), vget_high_f32(cd.val[1])));
    }
#endif
    else {
        alignas(Arch::alignment()) float m[L][L];
        for (std::size_t i = 0; i < L; ++i)
            v[i].store_aligned(m[i]);
        alignas(Arch::alignment()) float t[L];
        for (std::size_t j = 0; j < L; ++j) {
            for (std::size_t i = 0; i < L; ++i)
                t[i] = m[i][j];
            v[j] = B::load_aligned(t);
        }
    }
}

// One L x L group of pack_panel: panel[kk + j, g + t] = src[g + t][k0 + kk + j]
// for j, t < L, where kk = (idx / (NC / L)) * L and g = (idx % (NC / L)) * L.
template <class Arch, std::size_t NC, class S>
inline void pack_group(const S* const* src, std::size_t k0, std::size_t idx, float* panel) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t L = B::size;
    const std::size_t kk = idx / (NC / L) * L, g = idx % (NC / L) * L;
    B v[L];
    for (std::size_t t = 0; t < L; ++t)
        v[t] = src[g + t] != nullptr ? simd::load_weights<Arch>(src[g + t], k0 + kk) : B(0.0f);
    transpose<Arch>(v);
    for (std::size_t j = 0; j < L; ++j)
        v[j].store_aligned(panel + (kk + j) * NC + g);
}

// panel[k * NC + c] = src[c][k0 + k] as f32, for k < kc, c < NC (NC a
// multiple of the lane count); a null src[c] gives a zero column.
template <class Arch, std::size_t NC, class S>
inline void pack_panel(const S* const* src, std::size_t k0, std::size_t kc, float* panel) noexcept
{
    using B = xsimd::batch<float, Arch>;
    constexpr std::size_t L = B::size;
    static_assert(NC % L == 0);
    for (std::size_t idx = 0; idx < kc / L * (NC / L); ++idx)
        pack_group<Arch, NC>(src, k0, idx, panel);
    std::size_t k = kc / L * L;
    for (; k < kc; ++k)
        for (std::size_t c = 0; c < NC; ++c)
            panel[k * NC + c] = src[c] != nullptr ? simd::weight_at(src[c], k0 + k) : 0.0f;
}

} // namespace kdial::detail
