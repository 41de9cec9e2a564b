// Panel packing for the GEMM (stage 3 prefill): weight rows, converted to
// f32, transposed into a k-major panel, L x L blocks at a time with an
// in-register transpose (AVX-512 16 x 16, AVX2 8 x 8; other archs fall back
// to a scalar scatter). The packed values are exactly simd::load_weights /
// simd::weight_at of the source, so packing never changes a result.
// Serial, noexcept, no allocation.
#pragma once

#include <cstddef>
#include <type_traits>

#include <immintrin.h>

#include "../simd/compat.hpp"
#include "../simd/convert.hpp"

namespace kdial::detail {

template <class Arch>
inline constexpr bool has_transpose = (simd::is_avx512_arch<Arch> && xsimd::batch<float, Arch>::size == 16)
    || (simd::is_avx2_arch<Arch> && xsimd::batch<float, Arch>::size == 8);

// v[i][j] <- v[j][i] for i, j < L (L = batch size); only where has_transpose.
template <class Arch> inline void transpose(xsimd::batch<float, Arch>* v) noexcept
{
    using B = xsimd::batch<float, Arch>;
    if constexpr (simd::is_avx512_arch<Arch> && B::size == 16) {
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
    } else if constexpr (simd::is_avx2_arch<Arch> && B::size == 8) {
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
}

// One L x L group of pack_panel: panel[kk + j, g + t] = src[g + t][k0 + kk + j]
// for j, t < L, where kk = (idx / (NC / L)) * L and g = (idx % (NC / L)) * L.
// Only where has_transpose; the same values pack_panel stores there.
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
    std::size_t k = 0;
    if constexpr (has_transpose<Arch>) {
        for (std::size_t idx = 0; idx < kc / L * (NC / L); ++idx)
            pack_group<Arch, NC>(src, k0, idx, panel);
        k = kc / L * L;
    } else {
        alignas(64) float tmp[L];
        for (std::size_t c = 0; c < NC; ++c)
            for (std::size_t kk = 0; kk + L <= kc; kk += L) {
                if (src[c] != nullptr)
                    simd::load_weights<Arch>(src[c], k0 + kk).store_aligned(tmp);
                for (std::size_t t = 0; t < L; ++t)
                    panel[(kk + t) * NC + c] = src[c] != nullptr ? tmp[t] : 0.0f;
            }
        k = kc / L * L;
    }
    for (; k < kc; ++k)
        for (std::size_t c = 0; c < NC; ++c)
            panel[k * NC + c] = src[c] != nullptr ? simd::weight_at(src[c], k0 + k) : 0.0f;
}

} // namespace kdial::detail
