// Widening loads for the weight formats: bf16 -> f32 (an exact 16-bit
// shift), f16 -> f32 (exact; F16C on x86, NEON on aarch64) and q8 (int8 ->
// f32, times the block scale). Used by the expert kernels (stage 3) to
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

// Logical elements per storage element (q8: a block of 32).
template <class S> inline constexpr std::size_t weight_group = std::is_same_v<S, q8_block> ? q8_block_size : 1;

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

// Elements [k, k + batch::size) of a weight row, as f32. For q8 the range
// must not cross a block boundary (batch::size divides 32).
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

} // namespace kdial::simd
