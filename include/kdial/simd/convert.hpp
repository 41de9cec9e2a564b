// Widening loads for the weight formats: bf16 -> f32 (an exact 16-bit
// shift), f16 -> f32 (exact; F16C on x86, NEON on aarch64), q8 (int8 ->
// f32, times the block scale), q4_0 ((4-bit q - 8) times the block scale,
// exact) and q4_k (d sc q - dmin m, one rounding, see core/blocks.hpp). Used by the expert kernels (stage 3) to
// convert weights in registers, so a bf16, f16 or q8 matrix is never
// materialised as a full f32 copy. Pure functions of their input: the value
// loaded for a weight is the same in every kernel, every path and every
// arch (each arch-specific branch below has a portable fallback that gives
// the same bits, used by any arch without one).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../core/blocks.hpp"
#include "../core/dtype.hpp"
#include "compat.hpp"

namespace kdial::simd {

// batch::size consecutive bf16 values from p (any alignment), widened to f32.
template <class Arch = xsimd::default_arch> inline xsimd::batch<float, Arch> load_bf16(const bf16* p) noexcept
{
    using B = xsimd::batch<float, Arch>;
    if constexpr (false) {
    }
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX512F
    else if constexpr (is_avx512_arch<Arch>) {
        // maskz forms: same instructions, but GCC 12 does not warn about the
        // _mm512_undefined_* pass-through of the unmasked intrinsics.
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m512i w = _mm512_maskz_cvtepu16_epi32(__mmask16(0xffff), h);
        return B(_mm512_castsi512_ps(_mm512_maskz_slli_epi32(__mmask16(0xffff), w, 16)));
    }
#endif
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX2
    else if constexpr (is_avx2_arch<Arch>) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return B(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
#endif
#if KDIAL_SIMD_X86 && XSIMD_WITH_SSE4_1
    else if constexpr (is_sse_arch<Arch> && std::is_base_of_v<xsimd::sse4_1, Arch>) {
        const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        return B(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16)));
    }
#endif
#if KDIAL_SIMD_NEON64
    else if constexpr (is_neon64_arch<Arch>) {
        std::uint16_t h[4];
        std::memcpy(h, p, sizeof h);
        return B(vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(h), 16)));
    }
#endif
    else {
        alignas(Arch::alignment()) float tmp[B::size];
        for (std::size_t i = 0; i < B::size; ++i)
            tmp[i] = p[i].to_float();
        return B::load_aligned(tmp);
    }
}

// batch::size consecutive f16 values from p (any alignment), widened to f32.
template <class Arch = xsimd::default_arch> inline xsimd::batch<float, Arch> load_f16(const f16* p) noexcept
{
    using B = xsimd::batch<float, Arch>;
    if constexpr (false) {
    }
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX512F
    else if constexpr (is_avx512_arch<Arch>) {
        // maskz form, as in load_bf16.
        return B(_mm512_maskz_cvtph_ps(__mmask16(0xffff), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
    }
#endif
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX2 && defined(__F16C__)
    else if constexpr (is_avx2_arch<Arch>) {
        return B(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
#endif
#if KDIAL_SIMD_X86 && defined(__F16C__)
    else if constexpr (is_sse_arch<Arch>) {
        return B(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    }
#endif
#if KDIAL_SIMD_NEON64
    else if constexpr (is_neon64_arch<Arch>) {
        std::uint16_t h[4];
        std::memcpy(h, p, sizeof h);
        return B(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h))));
    }
#endif
    else {
        alignas(Arch::alignment()) float tmp[B::size];
        for (std::size_t i = 0; i < B::size; ++i)
            tmp[i] = p[i].to_float();
        return B::load_aligned(tmp);
    }
}

// One f16 widened to f32 with the CPU's conversion where it has one (the
// q8 block scale on the GEMV hot path); the same value as f16::to_float.
inline float widen(f16 h) noexcept
{
#if KDIAL_SIMD_X86 && defined(__F16C__)
    return _cvtsh_ss(h.bits);
#elif KDIAL_SIMD_NEON64
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(h.bits))), 0);
#else
    return h.to_float();
#endif
}

// batch::size consecutive int8 values from q (any alignment), as f32.
template <class Arch = xsimd::default_arch> inline xsimd::batch<float, Arch> load_i8(const std::int8_t* q) noexcept
{
    using B = xsimd::batch<float, Arch>;
    if constexpr (false) {
    }
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX512F
    else if constexpr (is_avx512_arch<Arch>) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        const __m512i w = _mm512_maskz_cvtepi8_epi32(__mmask16(0xffff), v);
        return B(_mm512_maskz_cvtepi32_ps(__mmask16(0xffff), w));
    }
#endif
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX2
    else if constexpr (is_avx2_arch<Arch>) {
        std::int64_t bits;
        std::memcpy(&bits, q, sizeof bits);
        return B(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bits))));
    }
#endif
#if KDIAL_SIMD_X86 && XSIMD_WITH_SSE4_1
    else if constexpr (is_sse_arch<Arch> && std::is_base_of_v<xsimd::sse4_1, Arch>) {
        std::int32_t bits;
        std::memcpy(&bits, q, sizeof bits);
        return B(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(bits))));
    }
#endif
#if KDIAL_SIMD_NEON64
    else if constexpr (is_neon64_arch<Arch>) {
        // Exactly 4 bytes are read (a q8 block may end right after them).
        std::uint32_t bits;
        std::memcpy(&bits, q, sizeof bits);
        const int16x8_t h = vmovl_s8(vreinterpret_s8_u32(vdup_n_u32(bits)));
        return B(vcvtq_f32_s32(vmovl_s16(vget_low_s16(h))));
    }
#endif
    else {
        alignas(Arch::alignment()) float tmp[B::size];
        for (std::size_t i = 0; i < B::size; ++i)
            tmp[i] = static_cast<float>(q[i]);
        return B::load_aligned(tmp);
    }
}

#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX512F
// 16 bytes at p zero-extended to 32 bits, shifted right by 4 for the high
// nibbles (the low 4 bits of each lane are then the nibble).
inline __m512i u4_index_avx512(const std::uint8_t* p, bool high) noexcept
{
    const __m512i w
        = _mm512_maskz_cvtepu8_epi32(__mmask16(0xffff), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return high ? _mm512_maskz_srli_epi32(__mmask16(0xffff), w, 4) : w;
}
#endif

// batch::size consecutive 4-bit values as f32 in [0, 15]: the low nibbles
// (high = false) or the high nibbles of the bytes p[0 : batch::size] (any
// alignment; exactly batch::size bytes are read).
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_u4(const std::uint8_t* p, bool high) noexcept
{
    using B = xsimd::batch<float, Arch>;
    if constexpr (false) {
    }
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX512F
    else if constexpr (is_avx512_arch<Arch>) {
        // The value comes from a 16-entry table (vpermps reads the low 4
        // bits of each index), which saves the mask and the conversion.
        return B(_mm512_maskz_permutexvar_ps(__mmask16(0xffff), u4_index_avx512(p, high),
            _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f, 14.f, 15.f)));
    }
#endif
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX2
    else if constexpr (is_avx2_arch<Arch>) {
        std::int64_t bits;
        std::memcpy(&bits, p, sizeof bits);
        const __m256i w = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bits));
        const __m256i n = high ? _mm256_srli_epi32(w, 4) : _mm256_and_si256(w, _mm256_set1_epi32(0xf));
        return B(_mm256_cvtepi32_ps(n));
    }
#endif
#if KDIAL_SIMD_X86 && XSIMD_WITH_SSE4_1
    else if constexpr (is_sse_arch<Arch> && std::is_base_of_v<xsimd::sse4_1, Arch>) {
        std::int32_t bits;
        std::memcpy(&bits, p, sizeof bits);
        const __m128i w = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(bits));
        const __m128i n = high ? _mm_srli_epi32(w, 4) : _mm_and_si128(w, _mm_set1_epi32(0xf));
        return B(_mm_cvtepi32_ps(n));
    }
#endif
#if KDIAL_SIMD_NEON64
    else if constexpr (is_neon64_arch<Arch>) {
        std::uint32_t bits;
        std::memcpy(&bits, p, sizeof bits);
        const uint32x4_t w = vmovl_u16(vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(bits)))));
        return B(vcvtq_f32_u32(high ? vshrq_n_u32(w, 4) : vandq_u32(w, vdupq_n_u32(0xf))));
    }
#endif
    else {
        alignas(Arch::alignment()) float tmp[B::size];
        for (std::size_t i = 0; i < B::size; ++i)
            tmp[i] = static_cast<float>(high ? p[i] >> 4 : p[i] & 0xf);
        return B::load_aligned(tmp);
    }
}

// Logical elements per storage element (q8, q4_0: a block of 32; q4_k: a
// super-block of 256).
template <class S>
inline constexpr std::size_t weight_group = std::is_same_v<S, q8_block> || std::is_same_v<S, q4_0_block> ? 32
    : std::is_same_v<S, q4_k_block>                                                                      ? qk_k
                                                                                                         : 1;

// Formats whose blocks are 32 integers times one f16 scale (q8, q4_0): the
// GEMV sums integer times x per block and scales once.
template <class S> inline constexpr bool is_scaled_block = std::is_same_v<S, q8_block> || std::is_same_v<S, q4_0_block>;

// A read hint for the cache line holding p (no effect on results).
inline void prefetch(const void* p) noexcept
{
    __builtin_prefetch(p, 0, 3);
}
// A read hint that stops at the second-level cache (prefetcht1 on x86), for
// data needed after the L1-resident working set has moved on.
inline void prefetch_l2(const void* p) noexcept
{
    __builtin_prefetch(p, 0, 2);
}

// The scale of a q8 block as f32 (exact widening of its f16 d).
inline float scale_of(const q8_block& b) noexcept
{
    return widen(b.scale_f16());
}

// The dequantised value of element i (< q8_block_size) of a q8 block:
// d * q, one f32 product. Vector and scalar paths give the same value.
inline float dequant(const q8_block& b, std::size_t i) noexcept
{
    return scale_of(b) * static_cast<float>(b.q[i]);
}

// Elements [i, i + batch::size) of a q8 block, dequantised (d * q).
// Requires i + batch::size <= q8_block_size.
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_q8(const q8_block& b, std::size_t i) noexcept
{
    return load_i8<Arch>(b.q + i) * xsimd::batch<float, Arch>(scale_of(b));
}

// The scale of a q4_0 block as f32 (exact widening of its f16 d).
inline float scale_of(const q4_0_block& b) noexcept
{
    return widen(b.scale_f16());
}

// The integers of elements [i, i + batch::size) of a scaled block, as f32
// (q8: q; q4_0: q - 8). i is a multiple of batch::size (which divides 16
// for q4_0, so a vector never mixes low and high nibbles).
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> block_ints(const q8_block& b, std::size_t i) noexcept
{
    return load_i8<Arch>(b.q + i);
}
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> block_ints(const q4_0_block& b, std::size_t i) noexcept
{
    if constexpr (false) {
    }
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX512F
    else if constexpr (is_avx512_arch<Arch>) {
        // q - 8 straight from a table (see load_u4).
        return xsimd::batch<float, Arch>(_mm512_maskz_permutexvar_ps(__mmask16(0xffff),
            u4_index_avx512(b.qs + i % 16, i >= 16),
            _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f)));
    }
#endif
    else
        return load_u4<Arch>(b.qs + i % 16, i >= 16) - xsimd::batch<float, Arch>(8.0f);
}

// All 32 / batch::size vectors of block_ints(b, v * batch::size), v = 0, 1,
// ... (the same values). On AVX2 a q4_0 block is split into nibbles and
// re-centred byte-wise once (16 bytes at a time) before widening, which
// saves a fifth of the decode against four separate loads.
template <class Arch, class S> inline void block_ints_all(const S& b, xsimd::batch<float, Arch>* out) noexcept
{
    constexpr std::size_t L = xsimd::batch<float, Arch>::size;
    if constexpr (false) {
    }
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX2
    else if constexpr (std::is_same_v<S, q4_0_block> && is_avx2_arch<Arch> && L == 8) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
        const __m128i m = _mm_set1_epi8(0x0f), e = _mm_set1_epi8(8);
        const __m128i lo = _mm_sub_epi8(_mm_and_si128(v, m), e);
        const __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m), e);
        out[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
        out[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
        out[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
        out[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
    }
#endif
    else {
        for (std::size_t v = 0; v < 32 / L; ++v)
            out[v] = block_ints<Arch>(b, v * L);
    }
}

// Elements [i, i + batch::size) of a q4_0 block, dequantised (d (q - 8),
// exact). Requires i + batch::size <= 32.
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_q4_0(const q4_0_block& b, std::size_t i) noexcept
{
    return block_ints<Arch>(b, i) * xsimd::batch<float, Arch>(scale_of(b));
}

// D = d sc and M = dmin m of sub-block j of a q4_k super-block (exact), with
// the CPU's f16 widening.
inline k_sub_scale sub_scale_of(const q4_k_block& b, std::size_t j) noexcept
{
    const k_scale_min s = k_scale_min_at(b.scales, j);
    return { widen(f16_at(b.d)) * static_cast<float>(s.sc), widen(f16_at(b.dmin)) * static_cast<float>(s.m) };
}

// D = d sc_j and M = dmin m_j of all 8 sub-blocks of a q4_k super-block
// (the values of sub_scale_of), the 6-bit fields unpacked four at a time
// from 32-bit words of the 12 packed bytes (see k_scale_min_at).
struct q4_k_scales {
    float d[8], m[8];
};
inline q4_k_scales scales_of(const q4_k_block& b) noexcept
{
    std::uint32_t u[3];
    std::memcpy(u, b.scales, sizeof u);
    const std::uint32_t s03 = u[0] & 0x3f3f3f3fu, m03 = u[1] & 0x3f3f3f3fu;
    const std::uint32_t s47 = (u[2] & 0x0f0f0f0fu) | ((u[0] >> 2) & 0x30303030u);
    const std::uint32_t m47 = ((u[2] >> 4) & 0x0f0f0f0fu) | ((u[1] >> 2) & 0x30303030u);
    const float d = widen(f16_at(b.d)), dm = widen(f16_at(b.dmin));
    q4_k_scales r;
    for (int j = 0; j < 4; ++j) {
        r.d[j] = d * static_cast<float>((s03 >> (8 * j)) & 0xffu);
        r.d[j + 4] = d * static_cast<float>((s47 >> (8 * j)) & 0xffu);
        r.m[j] = dm * static_cast<float>((m03 >> (8 * j)) & 0xffu);
        r.m[j + 4] = dm * static_cast<float>((m47 >> (8 * j)) & 0xffu);
    }
    return r;
}

// Elements [i, i + batch::size) of a q4_k super-block, dequantised:
// fma(q, D, -M), the same single rounding as block_value. i is a multiple
// of batch::size, so the vector lies in one sub-block of 32.
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_q4_k(const q4_k_block& b, std::size_t i, k_sub_scale s) noexcept
{
    using B = xsimd::batch<float, Arch>;
    return simd::fma(load_u4<Arch>(b.qs + (i / 64) * 32 + i % 32, (i / 32) % 2 == 1), B(s.d), B(-s.m));
}
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_q4_k(const q4_k_block& b, std::size_t i) noexcept
{
    return load_q4_k<Arch>(b, i, sub_scale_of(b, i / 32));
}

// A sub-block's 16 possible values fma(n, D, -M), n = 0..15, as one
// AVX-512 register (a vpermps table; other archs: unused), and the load
// that reads it: the same values as load_q4_k, one permute per vector.
template <class Arch = xsimd::default_arch> inline xsimd::batch<float, Arch> q4_k_lut(k_sub_scale s) noexcept
{
    using B = xsimd::batch<float, Arch>;
    if constexpr (B::size == 16) {
        alignas(Arch::alignment()) float n[16];
        for (int i = 0; i < 16; ++i)
            n[i] = float(i);
        return simd::fma(B::load_aligned(n), B(s.d), B(-s.m));
    } else {
        (void)s;
        return B(0.0f);
    }
}
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_q4_k(
    const q4_k_block& b, std::size_t i, k_sub_scale s, const xsimd::batch<float, Arch>& lut) noexcept
{
    if constexpr (false) {
    }
#if KDIAL_SIMD_X86 && XSIMD_WITH_AVX512F
    else if constexpr (is_avx512_arch<Arch>) {
        (void)s;
        return xsimd::batch<float, Arch>(_mm512_maskz_permutexvar_ps(
            __mmask16(0xffff), u4_index_avx512(b.qs + (i / 64) * 32 + i % 32, (i / 32) % 2 == 1), lut));
    }
#endif
    else {
        (void)lut;
        return load_q4_k<Arch>(b, i, s);
    }
}

// Element k of a weight row in storage format W, as f32 (scalar tails,
// packing and references).
inline float weight_at(const float* row, std::size_t k) noexcept
{
    return row[k];
}
inline float weight_at(const bf16* row, std::size_t k) noexcept
{
    return row[k].to_float();
}
inline float weight_at(const f16* row, std::size_t k) noexcept
{
    return widen(row[k]);
}
inline float weight_at(const q8_block* row, std::size_t k) noexcept
{
    return dequant(row[k / q8_block_size], k % q8_block_size);
}
inline float weight_at(const q4_0_block* row, std::size_t k) noexcept
{
    return block_value(row[k / q4_0_block_size], k % q4_0_block_size);
}
inline float weight_at(const q4_k_block* row, std::size_t k) noexcept
{
    return block_value(row[k / qk_k], k % qk_k);
}

// Elements [k, k + batch::size) of a weight row, as f32. For the block
// formats the range must not cross a block of 32 (batch::size divides 32).
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_weights(const float* row, std::size_t k) noexcept
{
    return xsimd::batch<float, Arch>::load_unaligned(row + k);
}
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_weights(const bf16* row, std::size_t k) noexcept
{
    return load_bf16<Arch>(row + k);
}
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_weights(const f16* row, std::size_t k) noexcept
{
    return load_f16<Arch>(row + k);
}
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_weights(const q8_block* row, std::size_t k) noexcept
{
    return load_q8<Arch>(row[k / q8_block_size], k % q8_block_size);
}
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_weights(const q4_0_block* row, std::size_t k) noexcept
{
    return load_q4_0<Arch>(row[k / q4_0_block_size], k % q4_0_block_size);
}
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_weights(const q4_k_block* row, std::size_t k) noexcept
{
    return load_q4_k<Arch>(row[k / qk_k], k % qk_k);
}

} // namespace kdial::simd
