// Widening loads for the weight formats: bf16 -> f32 (an exact 16-bit shift)
// and q8 (int8 -> f32, times the block scale). Used by the expert kernels
// (stage 3) to convert weights in registers, so a bf16 or q8 matrix is never
// materialised as a full f32 copy. Pure functions of their input: the value
// loaded for a weight is the same in every kernel and every path.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <immintrin.h>

#include "../core/dtype.hpp"
#include "compat.hpp"

namespace kdial::simd {

template <class Arch> inline constexpr bool is_avx512_arch = std::is_base_of_v<xsimd::avx512f, Arch>;
template <class Arch> inline constexpr bool is_avx2_arch = std::is_base_of_v<xsimd::avx2, Arch>;

// batch::size consecutive bf16 values from p (any alignment), widened to f32.
template <class Arch = xsimd::default_arch> inline xsimd::batch<float, Arch> load_bf16(const bf16* p) noexcept
{
    using B = xsimd::batch<float, Arch>;
    if constexpr (is_avx512_arch<Arch> && B::size == 16) {
        // maskz forms: same instructions, but GCC 12 does not warn about the
        // _mm512_undefined_* pass-through of the unmasked intrinsics.
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m512i w = _mm512_maskz_cvtepu16_epi32(__mmask16(0xffff), h);
        return B(_mm512_castsi512_ps(_mm512_maskz_slli_epi32(__mmask16(0xffff), w, 16)));
    } else if constexpr (is_avx2_arch<Arch> && B::size == 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        return B(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    } else {
        alignas(Arch::alignment()) float tmp[B::size];
        for (std::size_t i = 0; i < B::size; ++i)
            tmp[i] = p[i].to_float();
        return B::load_aligned(tmp);
    }
}

// batch::size consecutive int8 values from q (any alignment), as f32.
template <class Arch = xsimd::default_arch> inline xsimd::batch<float, Arch> load_i8(const std::int8_t* q) noexcept
{
    using B = xsimd::batch<float, Arch>;
    if constexpr (is_avx512_arch<Arch> && B::size == 16) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
        const __m512i w = _mm512_maskz_cvtepi8_epi32(__mmask16(0xffff), v);
        return B(_mm512_maskz_cvtepi32_ps(__mmask16(0xffff), w));
    } else if constexpr (is_avx2_arch<Arch> && B::size == 8) {
        std::int64_t bits;
        std::memcpy(&bits, q, sizeof bits);
        return B(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(bits))));
    } else {
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

// The dequantised value of element i (< q8_block_size) of a q8 block:
// scale * q, one f32 product. Vector and scalar paths give the same value.
inline float dequant(const q8_block& b, std::size_t i) noexcept
{
    return b.scale * static_cast<float>(b.q[i]);
}

// Elements [i, i + batch::size) of a q8 block, dequantised (scale * q).
// Requires i + batch::size <= q8_block_size.
template <class Arch = xsimd::default_arch>
inline xsimd::batch<float, Arch> load_q8(const q8_block& b, std::size_t i) noexcept
{
    return load_i8<Arch>(b.q + i) * xsimd::batch<float, Arch>(b.scale);
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
inline xsimd::batch<float, Arch> load_weights(const q8_block* row, std::size_t k) noexcept
{
    return load_q8<Arch>(row[k / q8_block_size], k % q8_block_size);
}

} // namespace kdial::simd
