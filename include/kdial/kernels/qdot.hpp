// Integer dot products for 8- and 4-bit weights (stage 3), the
// act_mode::int8 alternative to the exact f32-activation kernels: each row of
// X is quantised per block of 32 to int8 with an f32 scale (as the GGUF
// Q8_0 x Q8_0 dot does), then every (x block, weight block) pair gives an
// exact int32 dot (VPDPBUSD on AVX-512 VNNI / AVX-VNNI, vpmaddubsw +
// vpmaddwd on AVX2 and AVX-512BW, sdot or smull + sadalp on aarch64, plain
// loops elsewhere), scaled and summed in f32. Any row count: decode (n <= 4)
// streams weights once for all rows; prefill (n > 4) on x86 packs 8 or 16
// output columns into a panel whose lanes are the columns (no horizontal
// reduction) and runs every group of rows over it; elsewhere it cuts the
// outputs into column blocks whose weights fit half the L2 (core/cache.hpp)
// and passes every near-equal group of <= 4 rows over a block in cache.
//
// One summation order for every path (so the result is bit-identical for
// any thread count, any output split, any row count, row group or position
// AND across all arch paths: generic, AVX2, AVX-VNNI, AVX-512BW, AVX-512
// VNNI, NEON; tested): block b of a row
// (32 inputs; q4_k: sub-block b % 8 of super-block b / 8) goes to lane
// b % 8 of 8 f32 accumulators,
//   q8, q4_0: a[b % 8] = fma(float(I_b), dw_b * dx_b, a[b % 8])
//             I_b = sum q_w q_x (q4_0: q_w = nibble - 8), exact in int32;
//   q4_k:     a[j] = fma(float(I_b), D_j * dx_b, a[j]);
//             a[j] = fma(float(S_b), -(M_j * dx_b), a[j])
//             I_b = sum nibble q_x, S_b = sum q_x, D_j = d sc_j, M_j = dmin m_j;
// then out = ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)).
// Every int32 is exact (|I_b| <= 32 * 128 * 127 < 2^24, so float(I_b) is
// too); the only roundings are the f32 products and sums above. So a row's
// outputs are the same bits at decode (n = 1) and inside any prefill batch.
// Serial, noexcept, no allocation, no checks (the caller validates).
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <type_traits>
#include <utility>

#include "../core/blocks.hpp"
#include "../core/cache.hpp"
#include "../core/dtype.hpp"
#include "../core/views.hpp"
#include "../simd/compat.hpp"
#include "../simd/convert.hpp"
#include "../simd/vec.hpp"
#include "row_groups.hpp"
#include "weights.hpp"

#if KDIAL_SIMD_X86 && (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
#define KDIAL_QDOT_AVX_VNNI 1
#else
#define KDIAL_QDOT_AVX_VNNI 0
#endif
#if KDIAL_SIMD_X86 && defined(__AVX512BW__)
#define KDIAL_QDOT_AVX512BW 1
#else
#define KDIAL_QDOT_AVX512BW 0
#endif
#if KDIAL_QDOT_AVX512BW && defined(__AVX512VNNI__)
#define KDIAL_QDOT_AVX512_VNNI 1
#else
#define KDIAL_QDOT_AVX512_VNNI 0
#endif
#if KDIAL_SIMD_X86 && defined(__AVX2__) && defined(__FMA__)
#define KDIAL_QDOT_AVX2 1
#else
#define KDIAL_QDOT_AVX2 0
#endif
#if KDIAL_SIMD_NEON64 && defined(__ARM_FEATURE_DOTPROD)
#define KDIAL_QDOT_NEON_DOT 1
#else
#define KDIAL_QDOT_NEON_DOT 0
#endif

namespace kdial {

// How the kernels of q8, q4_0 and q4_k weights treat their activations, at
// any row count. exact (the default): f32 activations times the weights
// widened to f32 (kernels/gemv.hpp, rows.hpp, gemm.hpp). int8: activations
// quantised to int8 per block of 32 and integer dot products (this header);
// other weight formats ignore it and run exact.
enum class act_mode { exact, int8 };

// Elements per activation block.
inline constexpr std::size_t act_block = 32;

// Rows of activations quantised per block of 32: row i, block b holds
// q[i * stride + 32 b + l] (int8 in [-127, 127]), its scale d[i * blocks + b]
// (value ~= d * q) and the sum of its 32 q, s[i * blocks + b]. stride =
// 32 * blocks; a row's last block is zero past the row's end.
struct act_q8_view {
    std::int8_t* q = nullptr;
    float* d = nullptr;
    std::int32_t* s = nullptr;
    std::size_t rows = 0, blocks = 0;
};
struct act_q8_cview {
    const std::int8_t* q = nullptr;
    const float* d = nullptr;
    const std::int32_t* s = nullptr;
    std::size_t rows = 0, blocks = 0;

    act_q8_cview() = default;
    act_q8_cview(const act_q8_view& v) noexcept
        : q(v.q)
        , d(v.d)
        , s(v.s)
        , rows(v.rows)
        , blocks(v.blocks)
    {
    }
    act_q8_cview(const std::int8_t* q_, const float* d_, const std::int32_t* s_, std::size_t r, std::size_t b) noexcept
        : q(q_)
        , d(d_)
        , s(s_)
        , rows(r)
        , blocks(b)
    {
    }
    const std::int8_t* qrow(std::size_t i) const noexcept { return q + i * blocks * act_block; }
    const float* drow(std::size_t i) const noexcept { return d + i * blocks; }
    const std::int32_t* srow(std::size_t i) const noexcept { return s + i * blocks; }
    // Rows [i0, i0 + n).
    act_q8_cview sub_rows(std::size_t i0, std::size_t n) const noexcept
    {
        return { qrow(i0), drow(i0), srow(i0), n, blocks };
    }
};

// Bytes an act_q8_view of `rows` rows of `cols` inputs takes in
// bind_act_q8 (each array 64-byte aligned).
inline constexpr std::size_t act_q8_bytes(std::size_t rows, std::size_t cols) noexcept
{
    const std::size_t nb = (cols + act_block - 1) / act_block;
    auto up = [](std::size_t n) { return (n + 63) / 64 * 64; };
    return up(rows * nb * act_block) + up(rows * nb * sizeof(float)) + up(rows * nb * sizeof(std::int32_t));
}

// Lays an act_q8_view on caller memory (64-byte aligned, at least
// act_q8_bytes(rows, cols) bytes; not checked).
inline act_q8_view bind_act_q8(std::byte* mem, std::size_t rows, std::size_t cols) noexcept
{
    const std::size_t nb = (cols + act_block - 1) / act_block;
    auto up = [](std::size_t n) { return (n + 63) / 64 * 64; };
    act_q8_view v;
    v.q = reinterpret_cast<std::int8_t*>(mem);
    v.d = reinterpret_cast<float*>(mem + up(rows * nb * act_block));
    v.s = reinterpret_cast<std::int32_t*>(mem + up(rows * nb * act_block) + up(rows * nb * sizeof(float)));
    v.rows = rows;
    v.blocks = nb;
    return v;
}

namespace detail {
// The scale of a block whose largest magnitude is amax: amax / 127; 0 when
// that is below the f32 normal range (the block then quantises to zero:
// its values are below 127 * 2^-126 ~ 1.5e-36, and 1 / d would overflow);
// inf or NaN stay (a non-finite input gives a non-finite output).
inline float act_scale(float amax) noexcept
{
    const float d = amax / 127.0f;
    return d < FLT_MIN ? 0.0f : d;
}
inline float act_inv_scale(float d) noexcept
{
    return d >= FLT_MIN && d <= FLT_MAX ? 1.0f / d : 0.0f;
}
// q = round-to-nearest-even(clamp(x * id, -127, 127)); a NaN product gives -127.
inline std::int8_t act_round(float x, float id) noexcept
{
    const float v = std::fmin(std::fmax(x * id, -127.0f), 127.0f);
    return static_cast<std::int8_t>(static_cast<int>(std::nearbyint(v)));
}
} // namespace detail

// Quantises the rows of x [n, K] into out (out.rows == n, out.blocks ==
// ceil(K / 32)), per block of 32: d = max|x| / 127 (in f32; 0 below the
// normal range, see act_scale), q = round-to-nearest-even(x * (1 / d))
// clamped to [-127, 127], s = sum q. The tail past K is zero. Same bytes on
// every path (the AVX2 one is a vector copy of the scalar rule).
// |x - d q| <= d / 2 (plus the f32 rounding of x * (1 / d), < 2^-17 d).
inline void quantize_act_q8(cmatrix_view<float> x, const act_q8_view& out) noexcept
{
    const std::size_t K = x.cols, nb = out.blocks;
    for (std::size_t i = 0; i < x.rows; ++i) {
        const float* xr = x.row(i);
        std::int8_t* q = out.q + i * nb * act_block;
        for (std::size_t b = 0; b < nb; ++b) {
            const std::size_t k0 = b * act_block, n = std::min(act_block, K - k0);
            std::int8_t* qb = q + k0;
#if KDIAL_QDOT_AVX2
            if (n == act_block) {
                const __m256 sign = _mm256_set1_ps(-0.0f);
                __m256 v[4], m = _mm256_setzero_ps();
                for (int j = 0; j < 4; ++j) {
                    v[j] = _mm256_loadu_ps(xr + k0 + 8 * j);
                    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
                }
                __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
                m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
                // A NaN lane: _mm_max_ps keeps its second operand, so fold
                // NaN in explicitly as the scalar rule (fmax ignores NaN,
                // but the block's d must become NaN).
                float amax = _mm_cvtss_f32(m4);
                for (int j = 0; j < 4; ++j)
                    if (_mm256_movemask_ps(_mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q)))
                        amax = NAN;
                const float d = detail::act_scale(amax), id = detail::act_inv_scale(d);
                const __m256 vid = _mm256_set1_ps(id), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
                __m256i r[4];
                for (int j = 0; j < 4; ++j) {
                    // max(p, lo): a NaN p gives lo, as fmax(NaN, -127).
                    const __m256 p = _mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v[j], vid), lo), hi);
                    r[j] = _mm256_cvtps_epi32(p);
                }
                const __m256i p01 = _mm256_packs_epi32(r[0], r[1]), p23 = _mm256_packs_epi32(r[2], r[3]);
                __m256i p = _mm256_packs_epi16(p01, p23);
                // packs interleave 128-bit lanes: restore element order.
                p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), p);
                const __m256i s16 = _mm256_maddubs_epi16(_mm256_set1_epi8(1), p);
                const __m256i s32 = _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
                __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
                s4 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
                s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 1));
                out.d[i * nb + b] = d;
                out.s[i * nb + b] = _mm_cvtsi128_si32(s4);
                continue;
            }
#endif
            float amax = 0.0f;
            bool nan = false;
            for (std::size_t l = 0; l < n; ++l) {
                amax = std::fmax(amax, std::fabs(xr[k0 + l]));
                nan = nan || std::isnan(xr[k0 + l]);
            }
            const float d = detail::act_scale(nan ? NAN : amax), id = detail::act_inv_scale(d);
            std::int32_t s = 0;
            for (std::size_t l = 0; l < act_block; ++l) {
                qb[l] = l < n ? detail::act_round(xr[k0 + l], id) : std::int8_t(0);
                s += qb[l];
            }
            out.d[i * nb + b] = d;
            out.s[i * nb + b] = s;
        }
    }
}

// The integer-dot instruction families (one per kernel path).
enum class qdot_isa { generic, avx2, avx_vnni, avx512bw, avx512_vnni, neon, neon_dot };

// The path an xsimd arch takes with this build's flags.
template <class Arch> constexpr qdot_isa qdot_isa_for() noexcept
{
    if constexpr (simd::is_avx512_arch<Arch>) {
        if constexpr (KDIAL_QDOT_AVX512_VNNI)
            return qdot_isa::avx512_vnni;
        else if constexpr (KDIAL_QDOT_AVX512BW && KDIAL_QDOT_AVX2)
            return qdot_isa::avx512bw;
        else if constexpr (KDIAL_QDOT_AVX_VNNI && KDIAL_QDOT_AVX2)
            return qdot_isa::avx_vnni;
        else if constexpr (KDIAL_QDOT_AVX2)
            return qdot_isa::avx2;
        else
            return qdot_isa::generic;
    } else if constexpr (simd::is_avx2_arch<Arch>) {
        if constexpr (KDIAL_QDOT_AVX_VNNI && KDIAL_QDOT_AVX2)
            return qdot_isa::avx_vnni;
        else if constexpr (KDIAL_QDOT_AVX2)
            return qdot_isa::avx2;
        else
            return qdot_isa::generic;
    } else if constexpr (simd::is_neon64_arch<Arch>) {
        return KDIAL_QDOT_NEON_DOT ? qdot_isa::neon_dot : qdot_isa::neon;
    } else
        return qdot_isa::generic;
}

// Whether this build has the instructions of path I.
template <qdot_isa I>
inline constexpr bool qdot_isa_built = I == qdot_isa::generic || (I == qdot_isa::avx2 && KDIAL_QDOT_AVX2)
    || (I == qdot_isa::avx_vnni && KDIAL_QDOT_AVX2 && KDIAL_QDOT_AVX_VNNI)
    || (I == qdot_isa::avx512bw && KDIAL_QDOT_AVX2 && KDIAL_QDOT_AVX512BW)
    || (I == qdot_isa::avx512_vnni && KDIAL_QDOT_AVX2 && KDIAL_QDOT_AVX512_VNNI)
    || (I == qdot_isa::neon && KDIAL_SIMD_NEON64) || (I == qdot_isa::neon_dot && KDIAL_QDOT_NEON_DOT);

template <class S>
concept qdot_block = std::is_same_v<S, q8_block> || std::is_same_v<S, q4_0_block> || std::is_same_v<S, q4_k_block>;
template <class W>
concept qdot_weight = std::is_same_v<W, q8_t> || std::is_same_v<W, q4_0_t> || std::is_same_v<W, q4_k_t>;

namespace detail {

// ---- scalar block dots (the generic path, the tails) ----------------------

// I_b for q8 / q4_0 block w against 32 int8 x (xs: their sum).
inline std::int32_t qdot_block_int(const q8_block& w, const std::int8_t* x, std::int32_t) noexcept
{
    std::int32_t s = 0;
    for (std::size_t l = 0; l < 32; ++l)
        s += std::int32_t(w.q[l]) * x[l];
    return s;
}
inline std::int32_t qdot_block_int(const q4_0_block& w, const std::int8_t* x, std::int32_t) noexcept
{
    // Low and high nibbles in one loop: GCC 12.2 at -O2 -march=native
    // (AVX-512) vectorises the loop over w.nibble(l), l < 32, wrongly.
    std::int32_t s = 0;
    for (std::size_t l = 0; l < 16; ++l)
        s += (std::int32_t(w.qs[l] & 0xf) - 8) * x[l] + (std::int32_t(w.qs[l] >> 4) - 8) * x[l + 16];
    return s;
}
// I_b for sub-block j of a q4_k super-block.
inline std::int32_t qdot_sub_int(const q4_k_block& w, std::size_t j, const std::int8_t* x) noexcept
{
    const std::uint8_t* qs = w.qs + (j / 2) * 32;
    const int shift = j % 2 ? 4 : 0;
    std::int32_t s = 0;
    for (std::size_t l = 0; l < 32; ++l)
        s += std::int32_t((qs[l] >> shift) & 0xf) * x[l];
    return s;
}

inline float qdot_tree(const float* a) noexcept
{
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// ---- 8 lanes of f32 / int32 per path --------------------------------------

template <qdot_isa I> struct lanes8 {
    // Generic: plain arrays.
    struct f {
        float v[8];
    };
    struct i {
        std::int32_t v[8];
    };
    static f zero() noexcept { return {}; }
    static f load(const float* p) noexcept
    {
        f r;
        std::memcpy(r.v, p, sizeof r.v);
        return r;
    }
    static void store(const f& a, float* p) noexcept { std::memcpy(p, a.v, sizeof a.v); }
    static i loadi(const std::int32_t* p) noexcept
    {
        i r;
        std::memcpy(r.v, p, sizeof r.v);
        return r;
    }
    static f cvt(const i& a) noexcept
    {
        f r;
        for (int j = 0; j < 8; ++j)
            r.v[j] = float(a.v[j]);
        return r;
    }
    static f mul(const f& a, const f& b) noexcept
    {
        f r;
        for (int j = 0; j < 8; ++j)
            r.v[j] = a.v[j] * b.v[j];
        return r;
    }
    static f fma(const f& a, const f& b, const f& c) noexcept // a * b + c
    {
        f r;
        for (int j = 0; j < 8; ++j)
            r.v[j] = std::fma(a.v[j], b.v[j], c.v[j]);
        return r;
    }
    static f fnma(const f& a, const f& b, const f& c) noexcept // -(a * b) + c
    {
        f r;
        for (int j = 0; j < 8; ++j)
            r.v[j] = std::fma(a.v[j], -b.v[j], c.v[j]);
        return r;
    }
};

#if KDIAL_QDOT_AVX2
struct lanes8_x86 {
    using f = __m256;
    using i = __m256i;
    static f zero() noexcept { return _mm256_setzero_ps(); }
    static f load(const float* p) noexcept { return _mm256_loadu_ps(p); }
    static void store(const f& a, float* p) noexcept { _mm256_storeu_ps(p, a); }
    static i loadi(const std::int32_t* p) noexcept { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
    static f cvt(const i& a) noexcept { return _mm256_cvtepi32_ps(a); }
    static f mul(const f& a, const f& b) noexcept { return _mm256_mul_ps(a, b); }
    static f fma(const f& a, const f& b, const f& c) noexcept { return _mm256_fmadd_ps(a, b, c); }
    static f fnma(const f& a, const f& b, const f& c) noexcept { return _mm256_fnmadd_ps(a, b, c); }
};
template <> struct lanes8<qdot_isa::avx2> : lanes8_x86 {
};
template <> struct lanes8<qdot_isa::avx_vnni> : lanes8_x86 {
};
template <> struct lanes8<qdot_isa::avx512bw> : lanes8_x86 {
};
template <> struct lanes8<qdot_isa::avx512_vnni> : lanes8_x86 {
};

// Exact int32 totals of 8 vectors of 8 int32 partial sums: lane b = sum of
// p[b]'s lanes.
inline __m256i qdot_tree8(const __m256i* p) noexcept
{
    const __m256i h01 = _mm256_hadd_epi32(p[0], p[1]), h23 = _mm256_hadd_epi32(p[2], p[3]);
    const __m256i h45 = _mm256_hadd_epi32(p[4], p[5]), h67 = _mm256_hadd_epi32(p[6], p[7]);
    const __m256i g0 = _mm256_hadd_epi32(h01, h23), g1 = _mm256_hadd_epi32(h45, h67);
    return _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20), _mm256_permute2x128_si256(g0, g1, 0x31));
}

// 8 int32 partial sums of u (unsigned bytes) times s (signed bytes).
template <qdot_isa I> inline __m256i qdot_us256(__m256i u, __m256i s) noexcept
{
#if KDIAL_QDOT_AVX_VNNI
    if constexpr (I == qdot_isa::avx_vnni || I == qdot_isa::avx512_vnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
        return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#endif
    }
#endif
    // vpmaddubsw saturates at 2^15 - 1: no pair reaches it here, since
    // u <= 128 (q8: |w|; q4: <= 15) and |s| <= 127 (x is clamped), so
    // |u s + u' s'| <= 32512.
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

#if KDIAL_QDOT_AVX512BW
template <qdot_isa I> inline __m512i qdot_us512(__m512i u, __m512i s) noexcept
{
#if KDIAL_QDOT_AVX512_VNNI
    if constexpr (I == qdot_isa::avx512_vnni)
        return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s);
#endif
    return _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1));
}
inline __m512i qdot_join(__m256i lo, __m256i hi) noexcept
{
    // maskz / zext forms: GCC 12 warns about the _mm512_undefined_* of the
    // plain ones (see simd/convert.hpp).
    // (GCC 12's _mm512_zextsi256_si512 warns too.)
    const __m512i z = _mm512_maskz_inserti64x4(__mmask8(0xff), _mm512_setzero_si512(), lo, 0);
    return _mm512_maskz_inserti64x4(__mmask8(0xff), z, hi, 1);
}
// p[k] holds blocks 2k (lanes 0-7) and 2k + 1 (lanes 8-15).
inline __m256i qdot_tree8(const __m512i* p) noexcept
{
    __m256i h[8];
    for (int k = 0; k < 4; ++k) {
        h[2 * k] = _mm512_maskz_extracti64x4_epi64(__mmask8(0xf), p[k], 0);
        h[2 * k + 1] = _mm512_maskz_extracti64x4_epi64(__mmask8(0xf), p[k], 1);
    }
    return qdot_tree8(h);
}
#endif

inline __m256i q4_0_u256(const q4_0_block& w) noexcept
{
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.qs));
    const __m128i m = _mm_set1_epi8(0x0f);
    return _mm256_inserti128_si256(
        _mm256_zextsi128_si256(_mm_and_si128(v, m)), _mm_and_si128(_mm_srli_epi16(v, 4), m), 1);
}

// ---- 4-bit weights, 8 blocks at a time (x86) --------------------------------
// The per-row kernels' cost is the reduction of each block's 32 products to
// its I_b, not the dot: so the nibbles are laid out to let the integer dot
// instructions do part of it. Each vector holds the first 16 elements (l) or
// the last 16 (h) of several blocks, one block per 128-bit lane; the
// activations are arranged to match, and dot(l) + dot(h) accumulate into
// the same lanes (VPDPBUSD twice; or two vpmaddubsw added in int16: a lane's
// pair sums are <= 2 * 2 * 15 * 127 = 7620), so each lane holds 4 dwords (or
// 8 words) of one block and the 8 blocks need only short in-lane trees.
// Unpacked once per weight row and group, used by every activation row.

// 256-bit: pair k (< 4) is block k (low lane) and block k + 4 (high lane).
struct q4w256 {
    __m256i l[4], h[4];
};
// The 16 bytes at lo (low lane) and hi (high lane).
inline __m256i qdot_lanes2(const void* lo, const void* hi) noexcept
{
    return _mm256_blend_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(lo))),
        _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(hi))), 0xf0);
}
// q4_0 blocks w[0:8]: l = low nibbles (elements 0-15), h = high (16-31).
inline q4w256 q4_unpack256(const q4_0_block* w) noexcept
{
    const __m256i m = _mm256_set1_epi8(0x0f);
    q4w256 u;
    for (int k = 0; k < 4; ++k) {
        const __m256i v = qdot_lanes2(w[k].qs, w[k + 4].qs);
        u.l[k] = _mm256_and_si256(v, m);
        u.h[k] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    }
    return u;
}
// The 8 sub-blocks of q4_k super-block w: sub-block j is the nibbles j % 2
// of qs[32 (j / 2) .. + 32]; pairs k and k + 1 (k even) share their bytes.
inline q4w256 q4_unpack256(const q4_k_block* w) noexcept
{
    const __m256i m = _mm256_set1_epi8(0x0f);
    q4w256 u;
    for (int k = 0; k < 4; k += 2) {
        const std::uint8_t* q = w->qs + 16 * k;
        const __m256i a = qdot_lanes2(q, q + 64), b = qdot_lanes2(q + 16, q + 80);
        u.l[k] = _mm256_and_si256(a, m);
        u.h[k] = _mm256_and_si256(b, m);
        u.l[k + 1] = _mm256_and_si256(_mm256_srli_epi16(a, 4), m);
        u.h[k + 1] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
    }
    return u;
}
// x[0:256] (block b at x + 32 b) laid out as q4w256: l[k] = the first 16
// bytes of blocks k and k + 4, h[k] the last 16. Once per activation row
// and group, for every weight row.
struct q4x256 {
    __m256i l[4], h[4];
};
inline q4x256 q4_xprep256(const std::int8_t* x) noexcept
{
    q4x256 v;
    for (int k = 0; k < 4; ++k) {
        v.l[k] = qdot_lanes2(x + 32 * k, x + 32 * k + 128);
        v.h[k] = qdot_lanes2(x + 32 * k + 16, x + 32 * k + 144);
    }
    return v;
}
// The 8 blocks' sums of nibble * x, exact, block b in lane b.
template <qdot_isa I> inline __m256i q4_ints256(const q4w256& u, const q4x256& x) noexcept
{
    __m256i t[4];
    for (int k = 0; k < 4; ++k) {
#if KDIAL_QDOT_AVX_VNNI
        if constexpr (I == qdot_isa::avx_vnni || I == qdot_isa::avx512_vnni) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            t[k] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u.l[k], x.l[k]), u.h[k], x.h[k]);
#else
            t[k] = _mm256_dpbusd_avx_epi32(
                _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u.l[k], x.l[k]), u.h[k], x.h[k]);
#endif
            continue;
        }
#endif
        // Words: pair sums <= 2 * 15 * 127, two of them <= 7620.
        t[k] = _mm256_add_epi16(_mm256_maddubs_epi16(u.l[k], x.l[k]), _mm256_maddubs_epi16(u.h[k], x.h[k]));
    }
    if constexpr (I == qdot_isa::avx_vnni || I == qdot_isa::avx512_vnni) {
        // Lane 0 of t[k]: 4 dwords of block k; lane 1: of block k + 4.
        return _mm256_hadd_epi32(_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3]));
    } else {
        // 8 words per block and lane; two word hadds leave 2 words per
        // block (sums <= 4 * 7620 = 30480 < 2^15, exact), vpmaddwd adds them.
        const __m256i w = _mm256_hadd_epi16(_mm256_hadd_epi16(t[0], t[1]), _mm256_hadd_epi16(t[2], t[3]));
        return _mm256_madd_epi16(w, _mm256_set1_epi16(1));
    }
}

// dw of 8 consecutive q8 / q4_0 blocks, one scalar widening each (builds
// without F16C).
template <class S> inline __m256 scales8_scalar(const S* w) noexcept
{
    float s[8];
    for (int b = 0; b < 8; ++b)
        s[b] = simd::scale_of(w[b]);
    return _mm256_loadu_ps(s);
}

// dw of q4_0 blocks w[0:8]: d_b sits at byte 18 b of the 144, so word b of
// lane b % 2 of the 32 bytes at 32 (b / 2) (16 b - 2 b bytes in); 4 loads and
// 4 word blends instead of 8 scalar loads and stores.
inline __m256 q4_0_scales256(const q4_0_block* w) noexcept
{
#if !defined(__F16C__)
    return scales8_scalar(w);
#else
    const auto* p = reinterpret_cast<const __m256i*>(w);
    __m256i v = _mm256_blend_epi16(_mm256_loadu_si256(p), _mm256_loadu_si256(p + 1), 0x0c);
    v = _mm256_blend_epi16(v, _mm256_loadu_si256(p + 2), 0x30);
    v = _mm256_blend_epi16(v, _mm256_loadu_si256(p + 3), 0xc0);
    // Lane 0 holds d0 d2 d4 d6 in words 0 2 4 6, lane 1 d1 d3 d5 d7 in 1 3 5 7.
    return _mm256_cvtph_ps(_mm_blend_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1), 0xaa));
#endif
}

// D_j and M_j of a q4_k super-block (the values of simd::scales_of, the
// same f32 products) as vectors. F16C: the 6-bit fields unpacked from the
// block's first 16 bytes in vector registers (two byte shuffles, shifts and
// masks; the scalar bit-field code below made the n = 1 int8 kernel ~25 %
// slower, weights in L2).
inline void q4_k_scales256(const q4_k_block& b, __m256& D, __m256& M) noexcept
{
#if defined(__F16C__)
    // v = d, dmin (f16), scales[0:12]. Fields (scales bytes s_i = v[4 + i]):
    // sc_j = s_j & 63, m_j = s_{4+j} & 63 (j < 4); sc_{4+j} = (s_{8+j} & 15)
    // | (s_j >> 6) << 4, m_{4+j} = (s_{8+j} >> 4) | (s_{4+j} >> 6) << 4.
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(&b));
    // Dwords: s0-3, s8-11, s4-7, s8-11 (the low field bits) ...
    const __m128i P = _mm_shuffle_epi8(v, _mm_setr_epi8(4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15));
    // ... and -, s0-3, -, s4-7 (the high 2 bits of sc / m 4-7).
    const __m128i Q = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11));
    const __m128i lo = _mm_and_si128(_mm_blend_epi32(P, _mm_srli_epi16(P, 4), 0x8),
        _mm_setr_epi8(0x3f, 0x3f, 0x3f, 0x3f, 0x0f, 0x0f, 0x0f, 0x0f, 0x3f, 0x3f, 0x3f, 0x3f, 0x0f, 0x0f, 0x0f, 0x0f));
    // sc_0..7 in bytes 0-7, m_0..7 in bytes 8-15.
    const __m128i f = _mm_or_si128(lo, _mm_and_si128(_mm_srli_epi16(Q, 2), _mm_set1_epi8(0x30)));
    const __m128 dd = _mm_cvtph_ps(v); // d, dmin
    D = _mm256_mul_ps(_mm256_broadcastss_ps(dd), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(f)));
    M = _mm256_mul_ps(
        _mm256_broadcastss_ps(_mm_movehdup_ps(dd)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(f, f))));
#else
    std::uint32_t u[3];
    std::memcpy(u, b.scales, sizeof u);
    const std::uint64_t s03 = u[0] & 0x3f3f3f3fu, m03 = u[1] & 0x3f3f3f3fu;
    const std::uint64_t s47 = (u[2] & 0x0f0f0f0fu) | ((u[0] >> 2) & 0x30303030u);
    const std::uint64_t m47 = ((u[2] >> 4) & 0x0f0f0f0fu) | ((u[1] >> 2) & 0x30303030u);
    const __m128i s
        = _mm_set_epi64x(static_cast<long long>(m03 | (m47 << 32)), static_cast<long long>(s03 | (s47 << 32)));
    D = _mm256_mul_ps(_mm256_set1_ps(simd::widen(f16_at(b.d))), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(s)));
    M = _mm256_mul_ps(_mm256_set1_ps(simd::widen(f16_at(b.dmin))),
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(s, s))));
#endif
}

#if KDIAL_QDOT_AVX512BW
// 512-bit: vector k (< 2) holds blocks 4k .. 4k + 3, one per lane.
struct q4w512 {
    __m512i l[2], h[2];
};
inline q4w512 q4_unpack512(const q4_0_block* w) noexcept
{
    const __m512i m = _mm512_set1_epi8(0x0f);
    q4w512 u;
#if defined(__AVX512VBMI__)
    // The qs of blocks 0-3 are bytes 2 + 18 b + l (< 72) of the group, those
    // of blocks 4-7 bytes 74 .. 143: one byte permute of two loads each.
    struct idx_t {
        alignas(64) std::uint8_t v[2][64];
    };
    static constexpr idx_t idx = [] {
        idx_t t {};
        for (int b = 0; b < 4; ++b)
            for (int l = 0; l < 16; ++l) {
                t.v[0][16 * b + l] = static_cast<std::uint8_t>(2 + 18 * b + l);
                t.v[1][16 * b + l] = static_cast<std::uint8_t>(2 + 18 * (b + 4) + l - 64);
            }
        return t;
    }();
    const auto* p = reinterpret_cast<const std::uint8_t*>(w);
    const __m512i z1 = _mm512_loadu_si512(p + 64);
    const __m512i v[2] = { _mm512_permutex2var_epi8(_mm512_loadu_si512(p), _mm512_load_si512(idx.v[0]), z1),
        _mm512_permutex2var_epi8(z1, _mm512_load_si512(idx.v[1]), _mm512_maskz_loadu_epi8(0xffff, p + 128)) };
    for (int k = 0; k < 2; ++k) {
        u.l[k] = _mm512_and_si512(v[k], m);
        u.h[k] = _mm512_and_si512(_mm512_srli_epi16(v[k], 4), m);
    }
    return u;
#endif
    for (int k = 0; k < 2; ++k) {
        const auto ld = [&](int b) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[4 * k + b].qs)); };
        __m512i v = _mm512_broadcast_i32x4(ld(0));
        v = _mm512_inserti32x4(v, ld(1), 1);
        v = _mm512_inserti32x4(v, ld(2), 2);
        v = _mm512_inserti32x4(v, ld(3), 3);
        u.l[k] = _mm512_and_si512(v, m);
        u.h[k] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
    }
    return u;
}
inline q4w512 q4_unpack512(const q4_k_block* w) noexcept
{
    // qs[64 k .. + 64] = a0 a1 b0 b1 (16-byte quarters): sub-blocks 4k, 4k + 1
    // are the low and high nibbles of a, 4k + 2, 4k + 3 those of b.
    const __m512i m = _mm512_set1_epi8(0x0f);
    q4w512 u;
    for (int k = 0; k < 2; ++k) {
        const __m512i z = _mm512_loadu_si512(w->qs + 64 * k);
        const __m512i a = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(2, 2, 0, 0));
        const __m512i b = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 3, 1, 1));
        const __mmask32 odd = 0xff00ff00u; // the words of lanes 1 and 3
        u.l[k] = _mm512_and_si512(_mm512_mask_srli_epi16(a, odd, a, 4), m);
        u.h[k] = _mm512_and_si512(_mm512_mask_srli_epi16(b, odd, b, 4), m);
    }
    return u;
}
// x[0:256] laid out as q4w512 (two loads and two lane shuffles per 4 blocks).
struct q4x512 {
    __m512i l[2], h[2];
};
inline q4x512 q4_xprep512(const std::int8_t* x) noexcept
{
    q4x512 v;
    for (int k = 0; k < 2; ++k) {
        const __m512i x0 = _mm512_loadu_si512(x + 128 * k), x1 = _mm512_loadu_si512(x + 128 * k + 64);
        v.l[k] = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(2, 0, 2, 0));
        v.h[k] = _mm512_shuffle_i64x2(x0, x1, _MM_SHUFFLE(3, 1, 3, 1));
    }
    return v;
}
template <qdot_isa I> inline __m256i q4_ints512(const q4w512& u, const q4x512& x) noexcept
{
    __m512i t[2];
    for (int k = 0; k < 2; ++k) {
#if KDIAL_QDOT_AVX512_VNNI
        if constexpr (I == qdot_isa::avx512_vnni) {
            t[k] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u.l[k], x.l[k]), u.h[k], x.h[k]);
            continue;
        }
#endif
        t[k] = _mm512_madd_epi16(
            _mm512_add_epi16(_mm512_maddubs_epi16(u.l[k], x.l[k]), _mm512_maddubs_epi16(u.h[k], x.h[k])),
            _mm512_set1_epi16(1));
    }
    // Lane j: t[0] 4 dwords of block j, t[1] of block 4 + j.
    const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(t[0], t[1]), _mm512_unpackhi_epi32(t[0], t[1]));
    const __m512i s = _mm512_add_epi32(a, _mm512_shuffle_epi32(a, _MM_PERM_BADC)); // I_j, I_4+j, I_j, I_4+j
    const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castsi512_si256(_mm512_permutexvar_epi32(idx, s));
}
// dw of q4_0 blocks w[0:8] (d_b: word 9 b of the first 128 bytes).
inline __m256 q4_0_scales512(const q4_0_block* w) noexcept
{
    const auto* p = reinterpret_cast<const std::uint8_t*>(w);
    const __m512i idx = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 63, 54, 45, 36, 27, 18, 9, 0);
    const __m512i v = _mm512_permutex2var_epi16(_mm512_loadu_si512(p), idx, _mm512_loadu_si512(p + 64));
    return _mm256_cvtph_ps(_mm512_castsi512_si128(v));
}
#endif // KDIAL_QDOT_AVX512BW
#endif // KDIAL_QDOT_AVX2

#if KDIAL_SIMD_NEON64
struct lanes8_neon {
    struct f {
        float32x4_t lo, hi;
    };
    struct i {
        int32x4_t lo, hi;
    };
    static f zero() noexcept { return { vdupq_n_f32(0.0f), vdupq_n_f32(0.0f) }; }
    static f load(const float* p) noexcept { return { vld1q_f32(p), vld1q_f32(p + 4) }; }
    static void store(const f& a, float* p) noexcept
    {
        vst1q_f32(p, a.lo);
        vst1q_f32(p + 4, a.hi);
    }
    static i loadi(const std::int32_t* p) noexcept { return { vld1q_s32(p), vld1q_s32(p + 4) }; }
    static f cvt(const i& a) noexcept { return { vcvtq_f32_s32(a.lo), vcvtq_f32_s32(a.hi) }; }
    static f mul(const f& a, const f& b) noexcept { return { vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi) }; }
    static f fma(const f& a, const f& b, const f& c) noexcept
    {
        return { vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi) };
    }
    static f fnma(const f& a, const f& b, const f& c) noexcept
    {
        return { vfmsq_f32(c.lo, a.lo, b.lo), vfmsq_f32(c.hi, a.hi, b.hi) };
    }
};
template <> struct lanes8<qdot_isa::neon> : lanes8_neon {
};
template <> struct lanes8<qdot_isa::neon_dot> : lanes8_neon {
};

// The sum of 16 products of signed bytes, as 4 int32 partial sums added into acc.
template <qdot_isa I> inline int32x4_t qdot_s16(int32x4_t acc, int8x16_t a, int8x16_t b) noexcept
{
#if KDIAL_QDOT_NEON_DOT
    if constexpr (I == qdot_isa::neon_dot)
        return vdotq_s32(acc, a, b);
#endif
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(a), vget_low_s8(b)));
    return vpadalq_s16(acc, vmull_high_s8(a, b));
}
#endif

#if KDIAL_QDOT_AVX2
// Whether path I runs 4-bit weights S through the unpacked groups above.
template <qdot_isa I, class S>
inline constexpr bool qdot_q4_x86
    = !std::is_same_v<S,
          q8_block> && (I == qdot_isa::avx2 || I == qdot_isa::avx_vnni || I == qdot_isa::avx512bw || I == qdot_isa::avx512_vnni);

template <qdot_isa I, class S> inline auto q4_unpack(const S* w) noexcept
{
#if KDIAL_QDOT_AVX512BW
    if constexpr (I == qdot_isa::avx512bw || I == qdot_isa::avx512_vnni)
        return q4_unpack512(w);
    else
#endif
        return q4_unpack256(w);
}
template <qdot_isa I> inline auto q4_xprep(const std::int8_t* x) noexcept
{
#if KDIAL_QDOT_AVX512BW
    if constexpr (I == qdot_isa::avx512bw || I == qdot_isa::avx512_vnni)
        return q4_xprep512(x);
    else
#endif
        return q4_xprep256(x);
}
template <qdot_isa I> inline __m256i q4_ints(const q4w256& u, const q4x256& x) noexcept
{
    return q4_ints256<I>(u, x);
}
#if KDIAL_QDOT_AVX512BW
template <qdot_isa I> inline __m256i q4_ints(const q4w512& u, const q4x512& x) noexcept
{
    return q4_ints512<I>(u, x);
}
#endif
#endif

#if KDIAL_QDOT_AVX2
// ---- q8 weights, 8 blocks at a time (x86, the per-row kernels) -------------
// As the 4-bit layout above: pair k (< 4) holds blocks k (low 128-bit lane)
// and k + 4 (high lane), l their first 16 bytes, h the last 16, so each lane
// of the integer dot gathers 4 dwords of one block and the 8 blocks need a
// 3-hadd tree (a block per vector needed 6 hadds and 2 lane permutes).
struct q8w256 {
    __m256i l[4], h[4];
};
inline __m256i qdot_lo_hi(const std::int8_t* lo, const std::int8_t* hi) noexcept
{
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1);
}
inline q8w256 q8_split256(const q8_block* w) noexcept
{
    q8w256 u;
    for (int k = 0; k < 4; ++k) {
        u.l[k] = qdot_lo_hi(w[k].q, w[k + 4].q);
        u.h[k] = qdot_lo_hi(w[k].q + 16, w[k + 4].q + 16);
    }
    return u;
}
// x[0:256] in the same layout (Offset: as unsigned bytes x + 128, see
// q8_ints256).
template <bool Offset> inline q8w256 q8_xsplit256(const std::int8_t* x) noexcept
{
    q8w256 v;
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int k = 0; k < 4; ++k) {
        v.l[k] = qdot_lo_hi(x + 32 * k, x + 32 * k + 128);
        v.h[k] = qdot_lo_hi(x + 32 * k + 16, x + 32 * k + 144);
        if constexpr (Offset) {
            v.l[k] = _mm256_xor_si256(v.l[k], flip);
            v.h[k] = _mm256_xor_si256(v.h[k], flip);
        }
    }
    return v;
}
#if KDIAL_QDOT_AVX_VNNI
inline __m256i qdot_dpbusd256(__m256i acc, __m256i u, __m256i s) noexcept
{
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}
#endif
// Whether the VNNI kernels take x + 128 and subtract 128 sum w (one fix-up
// per weight row) rather than |w| and x with w's sign (two ops per vector
// and activation row): faster for several rows, slower for one (one
// weight matrix in L2, GB/s, n = 1 / n = 4: sign 41-43 / 14.0-14.3, offset
// 38 / 15.1-15.2; Zen 4, AVX-512 VNNI and AVX-VNNI alike).
template <qdot_isa I, int NR>
inline constexpr bool q8_offset_form = NR > 1 && (I == qdot_isa::avx_vnni || I == qdot_isa::avx512_vnni);
// 128 sum w of each of the 8 blocks (block b in lane b), the term that turns
// sum (x + 128) w into sum x w; once per weight row and group (Offset only).
template <bool Offset> inline __m256i q8_offset256([[maybe_unused]] const q8w256& w) noexcept
{
#if KDIAL_QDOT_AVX_VNNI
    if constexpr (Offset) {
        const __m256i c = _mm256_set1_epi8(static_cast<char>(0x80));
        __m256i t[4];
        for (int k = 0; k < 4; ++k)
            t[k] = qdot_dpbusd256(qdot_dpbusd256(_mm256_setzero_si256(), c, w.l[k]), c, w.h[k]);
        return _mm256_hadd_epi32(_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3]));
    }
#endif
    return _mm256_setzero_si256();
}
// I_b of the 8 blocks, block b in lane b, exact. Offset (VNNI): VPDPBUSD of
// x + 128 (unsigned) and w (signed), less off = 128 sum w (|sum (x + 128)
// w| <= 32 * 255 * 128 < 2^31). Otherwise |w| times x with w's sign
// (VPDPBUSD, or vpmaddubsw with pair sums <= 2 * 128 * 127, no saturation,
// widened by vpmaddwd before the two halves are added).
template <qdot_isa I, bool Offset>
inline __m256i q8_ints256(const q8w256& w, const q8w256& x, [[maybe_unused]] __m256i off) noexcept
{
    __m256i t[4];
    for (int k = 0; k < 4; ++k) {
#if KDIAL_QDOT_AVX_VNNI
        if constexpr (Offset) {
            t[k] = qdot_dpbusd256(qdot_dpbusd256(_mm256_setzero_si256(), x.l[k], w.l[k]), x.h[k], w.h[k]);
            continue;
        } else if constexpr (I == qdot_isa::avx_vnni || I == qdot_isa::avx512_vnni) {
            const __m256i a
                = qdot_dpbusd256(_mm256_setzero_si256(), _mm256_abs_epi8(w.l[k]), _mm256_sign_epi8(x.l[k], w.l[k]));
            t[k] = qdot_dpbusd256(a, _mm256_abs_epi8(w.h[k]), _mm256_sign_epi8(x.h[k], w.h[k]));
            continue;
        }
#endif
        const __m256i one = _mm256_set1_epi16(1);
        const __m256i a
            = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w.l[k]), _mm256_sign_epi8(x.l[k], w.l[k])), one);
        const __m256i b
            = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w.h[k]), _mm256_sign_epi8(x.h[k], w.h[k])), one);
        t[k] = _mm256_add_epi32(a, b);
    }
    const __m256i r = _mm256_hadd_epi32(_mm256_hadd_epi32(t[0], t[1]), _mm256_hadd_epi32(t[2], t[3]));
    if constexpr (Offset)
        return _mm256_sub_epi32(r, off);
    else
        return r;
}
// dw of q8 blocks w[0:8]: d_b is at byte 34 b = 32 b + 2 b, so word b of the
// 16 bytes at 32 b; 8 loads and 7 word blends.
inline __m256 q8_scales256(const q8_block* w) noexcept
{
#if !defined(__F16C__)
    return scales8_scalar(w);
#else
    const auto* p = reinterpret_cast<const std::uint8_t*>(w);
    const auto ld = [p](int b) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 * b)); };
    __m128i v = _mm_blend_epi16(ld(0), ld(1), 0x02);
    v = _mm_blend_epi16(v, ld(2), 0x04);
    v = _mm_blend_epi16(v, ld(3), 0x08);
    v = _mm_blend_epi16(v, ld(4), 0x10);
    v = _mm_blend_epi16(v, ld(5), 0x20);
    v = _mm_blend_epi16(v, ld(6), 0x40);
    v = _mm_blend_epi16(v, ld(7), 0x80);
    return _mm256_cvtph_ps(v);
#endif
}
#endif // KDIAL_QDOT_AVX2

// ---- the integer totals of 8 blocks per path -------------------------------

// I_b of the 8 blocks w[0:8] against x[0:256] (xs: the 8 blocks' sums).
template <qdot_isa I, class S>
inline typename lanes8<I>::i qdot_ints8(const S* w, const std::int8_t* x, const std::int32_t* xs) noexcept
{
    if constexpr (false) {
    }
#if KDIAL_QDOT_AVX2
    else if constexpr (qdot_q4_x86<I, S>) {
        __m256i t = q4_ints<I>(q4_unpack<I>(w), q4_xprep<I>(x));
        if constexpr (std::is_same_v<S, q4_0_block>)
            t = _mm256_sub_epi32(t, _mm256_slli_epi32(lanes8<I>::loadi(xs), 3));
        return t;
    }
#endif
#if KDIAL_QDOT_AVX512BW && KDIAL_QDOT_AVX2
    else if constexpr (I == qdot_isa::avx512bw || I == qdot_isa::avx512_vnni) {
        static_assert(std::is_same_v<S, q8_block>); // q4: qdot_q4_x86
        __m512i p[4];
        for (int k = 0; k < 4; ++k) {
            const __m512i xv = _mm512_loadu_si512(x + 64 * k);
            const __m512i wv = qdot_join(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[2 * k].q)),
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[2 * k + 1].q)));
            const __mmask64 neg = _mm512_movepi8_mask(wv);
            p[k] = qdot_us512<I>(_mm512_abs_epi8(wv), _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv));
        }
        return qdot_tree8(p);
    }
#endif
#if KDIAL_QDOT_AVX2
    else if constexpr (I == qdot_isa::avx2 || I == qdot_isa::avx_vnni) {
        static_assert(std::is_same_v<S, q8_block>); // q4: qdot_q4_x86
        __m256i p[8];
        for (int b = 0; b < 8; ++b) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32 * b));
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[b].q));
            p[b] = qdot_us256<I>(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
        }
        return qdot_tree8(p);
    }
#endif
#if KDIAL_SIMD_NEON64
    else if constexpr (I == qdot_isa::neon || I == qdot_isa::neon_dot) {
        alignas(16) std::int32_t t[8];
        for (int b = 0; b < 8; ++b) {
            const int8x16_t x0 = vld1q_s8(x + 32 * b), x1 = vld1q_s8(x + 32 * b + 16);
            int8x16_t w0, w1;
            if constexpr (std::is_same_v<S, q8_block>) {
                w0 = vld1q_s8(w[b].q);
                w1 = vld1q_s8(w[b].q + 16);
            } else if constexpr (std::is_same_v<S, q4_0_block>) {
                const uint8x16_t v = vld1q_u8(w[b].qs);
                const int8x16_t e = vdupq_n_s8(8);
                w0 = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0f))), e);
                w1 = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(v, 4)), e);
            } else {
                const uint8x16_t v0 = vld1q_u8(w->qs + 32 * (b / 2)), v1 = vld1q_u8(w->qs + 32 * (b / 2) + 16);
                if (b % 2) {
                    w0 = vreinterpretq_s8_u8(vshrq_n_u8(v0, 4));
                    w1 = vreinterpretq_s8_u8(vshrq_n_u8(v1, 4));
                } else {
                    w0 = vreinterpretq_s8_u8(vandq_u8(v0, vdupq_n_u8(0x0f)));
                    w1 = vreinterpretq_s8_u8(vandq_u8(v1, vdupq_n_u8(0x0f)));
                }
            }
            t[b] = vaddvq_s32(qdot_s16<I>(qdot_s16<I>(vdupq_n_s32(0), w0, x0), w1, x1));
        }
        return lanes8<I>::loadi(t);
    }
#endif
    else {
        typename lanes8<I>::i t;
        for (int b = 0; b < 8; ++b) {
            if constexpr (std::is_same_v<S, q4_k_block>)
                t.v[b] = qdot_sub_int(*w, std::size_t(b), x + 32 * b);
            else
                t.v[b] = qdot_block_int(w[b], x + 32 * b, xs[b]);
        }
        return t;
    }
}

// dw of 8 consecutive q8 / q4_0 blocks, widened exactly.
template <qdot_isa I, class S> inline typename lanes8<I>::f qdot_wscales8(const S* w) noexcept
{
#if KDIAL_QDOT_AVX2 && defined(__F16C__)
    if constexpr (I == qdot_isa::avx2 || I == qdot_isa::avx_vnni || I == qdot_isa::avx512bw
        || I == qdot_isa::avx512_vnni) {
        if constexpr (std::is_same_v<S, q4_0_block>)
            return q4_0_scales256(w);
        std::uint16_t h[8];
        for (int b = 0; b < 8; ++b)
            h[b] = w[b].scale_f16().bits;
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
    }
#endif
    float s[8];
    for (int b = 0; b < 8; ++b)
        s[b] = simd::scale_of(w[b]);
    return lanes8<I>::load(s);
}

// The end of qdot_rows: out[r * NR + i] from the 8 lanes of each pair
// (lane b % 8 holds blocks b of the whole groups of 8), with q8 and q4_0's
// last nb % 8 blocks added into their lanes in scalar (the same ops), then
// the fixed tree. q4_k has no partial group (nb % 8 == 0).
template <class S, int NR, int R>
inline void qdot_finish(
    float (&lanes)[R][NR][8], const S* const* rows, std::size_t nb, const act_q8_cview& xq, float* out) noexcept
{
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i) {
            float* a = lanes[r][i];
            if constexpr (!std::is_same_v<S, q4_k_block>)
                for (std::size_t b = nb / 8 * 8; b < nb; ++b) {
                    const std::int32_t t = qdot_block_int(rows[r][b], xq.qrow(i) + 32 * b, xq.srow(i)[b]);
                    a[b % 8] = std::fma(float(t), simd::scale_of(rows[r][b]) * xq.drow(i)[b], a[b % 8]);
                }
            out[r * NR + i] = qdot_tree(a);
        }
}

// out[r * NR + i] = the int8-activation dot of weight row r (blocks
// rows[r][0:..]) and activation row i of xq, in the order of the header
// comment. nb blocks of 32 (q4_k: nb % 8 == 0). `next`: rows to prefetch
// into L2 (as gemv.hpp; into L1 the lines were evicted before use on Zen 4:
// one expert at n = 1 with VNNI, of the read bandwidth, q8 0.39-0.41 ->
// 0.64-0.67, q4_0 0.33-0.34 -> 0.69-0.75).
#if KDIAL_QDOT_AVX2
// qdot_rows on x86: each group of 8 blocks of a weight row is laid out once
// (q4w256 / q4w512 / q8w256, with its scales and, for q8's offset form, its
// 128 sum w), then dotted with every activation row; the same I_b and the
// same f32 ops per block as qdot_rows_any. For q8 this replaced a vector per
// block reduced with 6 hadds and 2 lane permutes: Zen 4, one 256 x 2048
// matrix in L2, GB/s, n = 1: AVX-512 VNNI 30.5 -> 42, AVX-VNNI 39.5 -> 42,
// AVX2 33 -> 37; n = 4: 10.5-10.8 -> 15.1-15.4 (VNNI), 9.5 -> 10.7 (AVX2).
template <qdot_isa I, class S, int NR, int R>
inline void qdot_rows_x86(
    const S* const* rows, const S* const* next, std::size_t nb, const act_q8_cview& xq, float* out) noexcept
{
    constexpr bool k4 = std::is_same_v<S, q4_k_block>;
    constexpr std::size_t per = k4 ? 1 : 8; // storage blocks per group of 8
    __m256 acc[R][NR];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i)
            acc[r][i] = _mm256_setzero_ps();
    const std::size_t ng = nb / 8;
    for (std::size_t g = 0; g < ng; ++g) {
        const std::size_t b0 = 8 * g;
        for (int r = 0; r < R; ++r)
            for (std::size_t p = 0; p < per * sizeof(S); p += 64)
                simd::prefetch_l2(reinterpret_cast<const char*>(next[r] + per * g) + p);
        // Row by row, unrolled (a loop over r leaves acc in memory).
        const auto row = [&]<int r>() {
            const S* w = rows[r] + per * g;
            if constexpr (std::is_same_v<S, q8_block>) {
                constexpr bool offset = q8_offset_form<I, NR>;
                const __m256 dw = q8_scales256(w);
                const q8w256 u = q8_split256(w);
                const __m256i off = q8_offset256<offset>(u);
                for (int i = 0; i < NR; ++i) {
                    const __m256i t = q8_ints256<I, offset>(u, q8_xsplit256<offset>(xq.qrow(i) + 32 * b0), off);
                    const __m256 dx = _mm256_loadu_ps(xq.drow(i) + b0);
                    acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(dw, dx), acc[r][i]);
                }
            } else {
                __m256 dw, dm;
                if constexpr (k4) {
                    q4_k_scales256(*w, dw, dm);
                } else {
#if KDIAL_QDOT_AVX512BW
                    if constexpr (I == qdot_isa::avx512bw || I == qdot_isa::avx512_vnni)
                        dw = q4_0_scales512(w);
                    else
#endif
                        dw = q4_0_scales256(w);
                }
                const auto u = q4_unpack<I>(w);
                // The activation side is laid out again for each weight row:
                // hoisting it out of the row loop measured slower (spills; at
                // n = 1 on AVX-512, the same speed).
                for (int i = 0; i < NR; ++i) {
                    const __m256i t = q4_ints<I>(u, q4_xprep<I>(xq.qrow(i) + 32 * b0));
                    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.srow(i) + b0));
                    const __m256 dx = _mm256_loadu_ps(xq.drow(i) + b0);
                    if constexpr (k4) {
                        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(dw, dx), acc[r][i]);
                        acc[r][i] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dm, dx), acc[r][i]);
                    } else {
                        // I_b = sum nibble x - 8 S_b.
                        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(t, _mm256_slli_epi32(s, 3))),
                            _mm256_mul_ps(dw, dx), acc[r][i]);
                    }
                }
            }
        };
        for_each_index<R>(row);
    }
    // Stored first, in loops with no loop inside, so acc is indexed by
    // constants only (see the end of gemv_rows: clang 14 keeps acc on the
    // stack otherwise).
    float lanes[R][NR][8];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i)
            _mm256_storeu_ps(lanes[r][i], acc[r][i]);
    qdot_finish<S, NR, R>(lanes, rows, nb, xq, out);
}
#endif

template <qdot_isa I, class S, int NR, int R>
inline void qdot_rows_any(
    const S* const* rows, const S* const* next, std::size_t nb, const act_q8_cview& xq, float* out) noexcept
{
    using L = lanes8<I>;
    using F = typename L::f;
    F acc[R][NR];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i)
            acc[r][i] = L::zero();
    const std::size_t ng = nb / 8;
    for (std::size_t g = 0; g < ng; ++g) {
        const std::size_t b0 = 8 * g;
        if constexpr (std::is_same_v<S, q4_k_block>) {
            for (int r = 0; r < R; ++r)
                for (std::size_t p = 0; p < sizeof(S); p += 64)
                    simd::prefetch_l2(reinterpret_cast<const char*>(next[r] + g) + p);
            // Row by row, unrolled: a loop over r leaves acc in memory (GCC
            // 12: a load, FMA and store per block group, their latency on
            // the loop's critical path).
            for_each_index<R>([&]<int r>() {
                const simd::q4_k_scales sc = simd::scales_of(rows[r][g]);
                const F D = L::load(sc.d), M = L::load(sc.m);
                for (int i = 0; i < NR; ++i) {
                    const auto t = qdot_ints8<I>(rows[r] + g, xq.qrow(i) + 32 * b0, xq.srow(i) + b0);
                    const F dx = L::load(xq.drow(i) + b0);
                    acc[r][i] = L::fma(L::cvt(t), L::mul(D, dx), acc[r][i]);
                    acc[r][i] = L::fnma(L::cvt(L::loadi(xq.srow(i) + b0)), L::mul(M, dx), acc[r][i]);
                }
            });
        } else {
            for (int r = 0; r < R; ++r)
                for (std::size_t p = 0; p < 8 * sizeof(S); p += 64)
                    simd::prefetch_l2(reinterpret_cast<const char*>(next[r] + b0) + p);
            for_each_index<R>([&]<int r>() {
                const F dw = qdot_wscales8<I>(rows[r] + b0);
                for (int i = 0; i < NR; ++i) {
                    const auto t = qdot_ints8<I>(rows[r] + b0, xq.qrow(i) + 32 * b0, xq.srow(i) + b0);
                    acc[r][i] = L::fma(L::cvt(t), L::mul(dw, L::load(xq.drow(i) + b0)), acc[r][i]);
                }
            });
        }
    }
    // Stored first, as in qdot_rows_x86.
    float lanes[R][NR][8];
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < NR; ++i)
            L::store(acc[r][i], lanes[r][i]);
    qdot_finish<S, NR, R>(lanes, rows, nb, xq, out);
}

template <qdot_isa I, class S, int NR, int R>
inline void qdot_rows(
    const S* const* rows, const S* const* next, std::size_t nb, const act_q8_cview& xq, float* out) noexcept
{
#if KDIAL_QDOT_AVX2
    if constexpr (I == qdot_isa::avx2 || I == qdot_isa::avx_vnni || I == qdot_isa::avx512bw
        || I == qdot_isa::avx512_vnni)
        qdot_rows_x86<I, S, NR, R>(rows, next, nb, xq, out);
    else
#endif
        qdot_rows_any<I, S, NR, R>(rows, next, nb, xq, out);
}

// Weight rows per pass of the per-row kernels: at n = 1, 8 for 4-bit
// weights (4 measured ~30 % slower for cold q4_0 weights on AVX-512 VNNI:
// fewer rows in flight), 4 for q8 (8 rows, 4 passes ahead made model
// decode 10-25 % slower: q8 rows are twice as long).
template <class S, int NR>
inline constexpr int qdot_rows_per_pass = NR == 1 ? (std::is_same_v<S, q8_block> ? 4 : 8) : 2;
// How many passes ahead the per-row kernels prefetch their weight rows (4
// and 8 measured alike, 1 and 2 slower, for cold q4_0 weights; q8: 1).
template <class S> inline constexpr std::size_t qdot_prefetch_passes = std::is_same_v<S, q8_block> ? 1 : 4;

// y[i, o] = int8-activation dot of x row i and weight row o, o in [o0, o1), i < NR.
template <qdot_isa I, weight_type W, int NR>
void linear_qgemv(
    const weight_view<W>& w, const act_q8_cview& xq, std::size_t o0, std::size_t o1, float* y, std::size_t ldy) noexcept
{
    using S = typename W::storage;
    constexpr int R = qdot_rows_per_pass<S, NR>;
    const std::size_t nb = xq.blocks;
    float out[R * NR];
    std::size_t o = o0;
    for (; o + R <= o1; o += R) {
        const S* rows[R];
        const S* next[R];
        const std::size_t on = std::min(o + qdot_prefetch_passes<S> * R, o1 - R);
        for (int r = 0; r < R; ++r) {
            rows[r] = w.row(o + r);
            next[r] = w.row(on + r);
        }
        qdot_rows<I, S, NR, R>(rows, next, nb, xq, out);
        for (int r = 0; r < R; ++r)
            for (int i = 0; i < NR; ++i)
                y[i * ldy + o + r] = out[r * NR + i];
    }
    for (; o < o1; ++o) {
        const S* rows[1] = { w.row(o) };
        qdot_rows<I, S, NR, 1>(rows, rows, nb, xq, out);
        for (int i = 0; i < NR; ++i)
            y[i * ldy + o] = out[i];
    }
}

// h[i, f] = silu(gate . x) * (up . x) for f in [f0, f1), i < NR (int8 activations).
template <qdot_isa I, weight_type W, int NR>
void gate_up_qgemv(const weight_view<W>& gate, const weight_view<W>& up, const act_q8_cview& xq, std::size_t f0,
    std::size_t f1, float* h, std::size_t ldh) noexcept
{
    using S = typename W::storage;
    constexpr int P = qdot_rows_per_pass<S, NR> / 2;
    const std::size_t nb = xq.blocks;
    float out[2 * P * NR];
    std::size_t f = f0;
    if constexpr (P > 1) {
        for (; f + P <= f1; f += P) {
            const S* rows[2 * P];
            const S* next[2 * P];
            const std::size_t fn = std::min(f + qdot_prefetch_passes<S> * P, f1 - P);
            for (int p = 0; p < P; ++p) {
                rows[2 * p] = gate.row(f + p);
                rows[2 * p + 1] = up.row(f + p);
                next[2 * p] = gate.row(fn + p);
                next[2 * p + 1] = up.row(fn + p);
            }
            qdot_rows<I, S, NR, 2 * P>(rows, next, nb, xq, out);
            for (int p = 0; p < P; ++p)
                for (int i = 0; i < NR; ++i)
                    h[i * ldh + f + p] = simd::silu(out[2 * p * NR + i]) * out[(2 * p + 1) * NR + i];
        }
    }
    for (; f < f1; ++f) {
        const S* rows[2] = { gate.row(f), up.row(f) };
        const S* next[2] = { gate.row(f + 1 < f1 ? f + 1 : f), up.row(f + 1 < f1 ? f + 1 : f) };
        qdot_rows<I, S, NR, 2>(rows, next, nb, xq, out);
        for (int i = 0; i < NR; ++i)
            h[i * ldh + f] = simd::silu(out[i]) * out[NR + i];
    }
}

// ---- prefill: packed panels of output columns (x86) -------------------------
// The per-row kernels above reduce each block's 32 products across lanes
// (qdot_tree8), which costs as much as the dot itself. With many rows it pays
// to pack P weight rows (output columns) once into a panel whose vector lanes
// are the columns: block b, quad u (inputs 32 b + 4 u .. + 3) is one vector
// holding column c's 4 weight bytes in lane c. Against the broadcast 4 bytes
// of an activation row, VPDPBUSD (or vpmaddubsw + vpmaddwd) gives the P
// columns' I_b in P lanes with no reduction, and lane c runs the f32 fmas of
// the per-row kernel in the same order: same bits (header comment). P = 16
// (AVX-512 VNNI, zmm) or 8 (AVX2, AVX-VNNI, AVX-512BW: ymm). Panel bytes:
// q8 w + 128 on VNNI (the sum starts at -128 S_b, so the offset cancels
// exactly), q8 w itself on AVX2 (sign trick: vpmaddubsw(|w|, sign(x, w)));
// q4_0 and q4_k the nibble everywhere (q4_0: the sum ends -8 S_b; q4_k:
// the panel keeps D_j and M_j per sub-block and column, and the second fma
// subtracts S_b M_j dx_b as the per-row kernel does).

// Fewest rows for which a path packs panels (below: the per-row kernels);
// the most blocks packed at a time (a panel segment <= 72 KiB, on the
// stack: K <= 4096 is packed once for all rows; longer rows are packed a
// segment at a time for each qpanel_chunk_rows rows, whose f32 lane sums
// carry over from segment to segment in the same order). None changes a bit.
inline constexpr std::size_t qdot_panel_min_rows = 5;
inline constexpr std::size_t qpanel_max_blocks = 128;
inline constexpr std::size_t qpanel_chunk_rows = 32;

template <qdot_isa I> struct qpanel {
    static constexpr bool has = false;
};

#if KDIAL_QDOT_AVX2
// The 32 nibbles of q4_k sub-block b (super-block b / 8) of a row, as bytes.
inline __m256i qpanel_k4_u256(const q4_k_block* row, std::size_t b) noexcept
{
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[b / 8].qs + 32 * (b % 8 / 2)));
    return _mm256_and_si256(b % 2 ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0f));
}
// At the first sub-block of a super-block: d, m [8][C] = D_j, M_j of the C rows.
inline void qpanel_k4_scales(const q4_k_block* const* rows, std::size_t b, std::size_t C, float* d, float* m) noexcept
{
    if (b % 8 != 0)
        return;
    for (std::size_t c = 0; c < C; ++c) {
        const simd::q4_k_scales sc = simd::scales_of(rows[c][b / 8]);
        for (std::size_t j = 0; j < 8; ++j) {
            d[j * C + c] = sc.d[j];
            m[j * C + c] = sc.m[j];
        }
    }
}

// 8 x 8 dword transpose: o[u] lane c = r[c] dword u.
inline void qpanel_transpose8(const __m256i* r, __m256i* o) noexcept
{
    __m256i t[8], u[8];
    for (int h = 0; h < 2; ++h) {
        const __m256i* x = r + 4 * h;
        t[4 * h + 0] = _mm256_unpacklo_epi32(x[0], x[1]);
        t[4 * h + 1] = _mm256_unpackhi_epi32(x[0], x[1]);
        t[4 * h + 2] = _mm256_unpacklo_epi32(x[2], x[3]);
        t[4 * h + 3] = _mm256_unpackhi_epi32(x[2], x[3]);
        u[4 * h + 0] = _mm256_unpacklo_epi64(t[4 * h + 0], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h + 0], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int q = 0; q < 4; ++q) {
        o[q] = _mm256_permute2x128_si256(u[q], u[4 + q], 0x20);
        o[4 + q] = _mm256_permute2x128_si256(u[q], u[4 + q], 0x31);
    }
}

// The ymm panels (8 columns): AVX2, AVX-VNNI, AVX-512BW.
template <qdot_isa I> struct qpanel_ymm {
    static constexpr bool has = true;
    static constexpr std::size_t cols = 8;
    static constexpr bool vnni = I == qdot_isa::avx_vnni;

    template <class S> static __m256i bytes(const S* row, std::size_t b) noexcept
    {
        if constexpr (std::is_same_v<S, q4_k_block>)
            return qpanel_k4_u256(row, b);
        else if constexpr (std::is_same_v<S, q4_0_block>)
            return q4_0_u256(row[b]);
        else if constexpr (vnni)
            return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[b].q)),
                _mm256_set1_epi8(static_cast<char>(0x80)));
        else
            return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[b].q));
    }

    // Block b of 8 weight rows: q [8][32] bytes, d [8] scales (q4_k: at
    // b % 8 == 0, d and m [8][8] of the super-block's sub-blocks).
    template <class S>
    static void pack(const S* const* rows, std::size_t b, std::uint8_t* q, float* d, float* m) noexcept
    {
        (void)m;
        __m256i r[8], o[8];
        for (int c = 0; c < 8; ++c)
            r[c] = bytes(rows[c], b);
        qpanel_transpose8(r, o);
        for (int u = 0; u < 8; ++u)
            _mm256_store_si256(reinterpret_cast<__m256i*>(q + 32 * u), o[u]);
        if constexpr (std::is_same_v<S, q4_k_block>)
            qpanel_k4_scales(rows, b, 8, d, m);
        else
            for (int c = 0; c < 8; ++c)
                d[c] = simd::scale_of(rows[c][b]);
    }

    // Blocks [b0, b1) of the panel (pq, pd, pm hold them from b0 on; b0 % 8
    // == 0) added into acc [NR][8][8] (row i, lane j, column c), or stored
    // there when b0 == 0.
    template <class S, int NR>
    static void rows(const std::uint8_t* pq, const float* pd, const float* pm, std::size_t b0, std::size_t b1,
        const act_q8_cview& xq, float* acc) noexcept
    {
        (void)pm;
        constexpr bool q8 = std::is_same_v<S, q8_block>, k4 = std::is_same_v<S, q4_k_block>;
        constexpr std::int32_t off = q8 ? 128 : k4 ? 0 : 8;
        for (std::size_t j = 0; j < 8; ++j) {
            __m256 f[NR];
            for (int i = 0; i < NR; ++i)
                f[i] = b0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + (8 * std::size_t(i) + j) * 8);
            for (std::size_t b = b0 + j; b < b1; b += 8) {
                const std::uint8_t* wb = pq + 256 * (b - b0);
                __m256i t[NR];
                if constexpr (vnni) {
                    for (int i = 0; i < NR; ++i)
                        t[i] = _mm256_set1_epi32(-off * xq.srow(std::size_t(i))[b]);
                    for (int u = 0; u < 8; ++u) {
                        const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + 32 * u));
                        for (int i = 0; i < NR; ++i) {
                            std::int32_t xv;
                            std::memcpy(&xv, xq.qrow(std::size_t(i)) + 32 * b + 4 * std::size_t(u), 4);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
                            t[i] = _mm256_dpbusd_epi32(t[i], wv, _mm256_set1_epi32(xv));
#elif KDIAL_QDOT_AVX_VNNI
                            t[i] = _mm256_dpbusd_avx_epi32(t[i], wv, _mm256_set1_epi32(xv));
#endif
                        }
                    }
                } else if constexpr (q8) {
                    // |w| (<= 128) times sign(x, w): pair sums <= 32512, no saturation.
                    for (int i = 0; i < NR; ++i)
                        t[i] = _mm256_setzero_si256();
                    for (int u = 0; u < 8; ++u) {
                        const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + 32 * u));
                        const __m256i aw = _mm256_abs_epi8(wv);
                        for (int i = 0; i < NR; ++i) {
                            std::int32_t xv;
                            std::memcpy(&xv, xq.qrow(std::size_t(i)) + 32 * b + 4 * std::size_t(u), 4);
                            const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(_mm256_set1_epi32(xv), wv));
                            t[i] = _mm256_add_epi32(t[i], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
                        }
                    }
                } else {
                    // Nibbles (<= 15) times x: 8 quads of pair sums <= 8 * 3810
                    // < 2^15, so they add up in int16 exactly.
                    __m256i p[NR];
                    for (int i = 0; i < NR; ++i)
                        p[i] = _mm256_setzero_si256();
                    for (int u = 0; u < 8; ++u) {
                        const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(wb + 32 * u));
                        for (int i = 0; i < NR; ++i) {
                            std::int32_t xv;
                            std::memcpy(&xv, xq.qrow(std::size_t(i)) + 32 * b + 4 * std::size_t(u), 4);
                            p[i] = _mm256_add_epi16(p[i], _mm256_maddubs_epi16(wv, _mm256_set1_epi32(xv)));
                        }
                    }
                    for (int i = 0; i < NR; ++i)
                        t[i] = _mm256_add_epi32(_mm256_madd_epi16(p[i], _mm256_set1_epi16(1)),
                            _mm256_set1_epi32(-off * xq.srow(std::size_t(i))[b]));
                }
                const __m256 dw = _mm256_load_ps(pd + 8 * (b - b0));
                for (int i = 0; i < NR; ++i) {
                    const __m256 dx = _mm256_set1_ps(xq.drow(std::size_t(i))[b]);
                    f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[i]), _mm256_mul_ps(dw, dx), f[i]);
                    if constexpr (k4)
                        f[i] = _mm256_fnmadd_ps(_mm256_set1_ps(float(xq.srow(std::size_t(i))[b])),
                            _mm256_mul_ps(_mm256_load_ps(pm + 8 * (b - b0)), dx), f[i]);
                }
            }
            for (int i = 0; i < NR; ++i)
                _mm256_storeu_ps(acc + (8 * std::size_t(i) + j) * 8, f[i]);
        }
    }
    // out[c] = the final tree of the header comment over a [8][8] (lane j, column c).
    static void finish(const float* a, float* out) noexcept
    {
        const auto l = [&](int j) { return _mm256_loadu_ps(a + 8 * j); };
        _mm256_storeu_ps(out,
            _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(l(0), l(4)), _mm256_add_ps(l(2), l(6))),
                _mm256_add_ps(_mm256_add_ps(l(1), l(5)), _mm256_add_ps(l(3), l(7)))));
    }
    static constexpr int max_rows = 4;
};
template <> struct qpanel<qdot_isa::avx2> : qpanel_ymm<qdot_isa::avx2> {
};
template <> struct qpanel<qdot_isa::avx512bw> : qpanel_ymm<qdot_isa::avx2> {
};
#if KDIAL_QDOT_AVX_VNNI
template <> struct qpanel<qdot_isa::avx_vnni> : qpanel_ymm<qdot_isa::avx_vnni> {
};
#endif
#endif // KDIAL_QDOT_AVX2

#if KDIAL_QDOT_AVX512_VNNI && KDIAL_QDOT_AVX2
// Permute indices of the 16 x 8 dword transpose of the zmm panel.
struct qpanel_idx {
    alignas(64) std::int32_t s1[2][16], s2[4][16], s3[2][16];
};
inline const qpanel_idx& qpanel_indices() noexcept
{
    static const qpanel_idx t = [] {
        qpanel_idx x {};
        for (int p = 0; p < 16; ++p) {
            // Stage 1: (cols 4j..4j+3 from z[2j], z[2j+1]) -> quads 4t..4t+3,
            // position (u % 4) * 4 + c % 4; z[m] position (c % 2) * 8 + u.
            for (int t = 0; t < 2; ++t) {
                const int c4 = p % 4, u = 4 * t + p / 4;
                x.s1[t][p] = (c4 < 2 ? 0 : 16) + (c4 % 2) * 8 + u;
            }
            // Stage 2: cols 8g..8g+7 -> quads 2h, 2h + 1, position (u % 2) * 8 + c % 8.
            for (int h = 0; h < 4; ++h) {
                const int u = 2 * h + p / 8, c8 = p % 8;
                x.s2[h][p] = (c8 < 4 ? 0 : 16) + (u % 4) * 4 + c8 % 4;
            }
            // Stage 3: both column halves -> quad u, position c.
            for (int r = 0; r < 2; ++r)
                x.s3[r][p] = (p < 8 ? 0 : 16) + r * 8 + p % 8;
        }
        return x;
    }();
    return t;
}

// The zmm panel (16 columns): AVX-512 VNNI.
template <> struct qpanel<qdot_isa::avx512_vnni> {
    static constexpr bool has = true;
    static constexpr std::size_t cols = 16;

    template <class S> static __m256i bytes(const S* row, std::size_t b) noexcept
    {
        if constexpr (std::is_same_v<S, q4_k_block>)
            return qpanel_k4_u256(row, b);
        else if constexpr (std::is_same_v<S, q4_0_block>)
            return q4_0_u256(row[b]);
        else
            return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[b].q)),
                _mm256_set1_epi8(static_cast<char>(0x80)));
    }

    // Block b of 16 weight rows: q [8][64] bytes, d [16] scales.
    template <class S>
    static void pack(const S* const* rows, std::size_t b, std::uint8_t* q, float* d, float* m) noexcept
    {
        (void)m;
        const qpanel_idx& ix = qpanel_indices();
        __m512i z[8], u[8], v[8];
        for (int k = 0; k < 8; ++k)
            z[k] = qdot_join(bytes(rows[2 * k], b), bytes(rows[2 * k + 1], b));
        for (int j = 0; j < 4; ++j)
            for (int t = 0; t < 2; ++t)
                u[2 * j + t] = _mm512_permutex2var_epi32(z[2 * j], _mm512_load_si512(ix.s1[t]), z[2 * j + 1]);
        for (int g = 0; g < 2; ++g)
            for (int h = 0; h < 4; ++h)
                v[4 * g + h] = _mm512_permutex2var_epi32(
                    u[2 * (2 * g) + h / 2], _mm512_load_si512(ix.s2[h]), u[2 * (2 * g + 1) + h / 2]);
        for (int w = 0; w < 8; ++w)
            _mm512_store_si512(
                q + 64 * w, _mm512_permutex2var_epi32(v[w / 2], _mm512_load_si512(ix.s3[w % 2]), v[4 + w / 2]));
        if constexpr (std::is_same_v<S, q4_k_block>) {
            qpanel_k4_scales(rows, b, 16, d, m);
        } else {
            alignas(32) std::uint16_t h[16];
            for (int c = 0; c < 16; ++c)
                h[c] = rows[c][b].scale_f16().bits;
            _mm512_store_ps(d, _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(h))));
        }
    }

    // As qpanel_ymm::rows, acc [NR][8][16].
    template <class S, int NR>
    static void rows(const std::uint8_t* pq, const float* pd, const float* pm, std::size_t b0, std::size_t b1,
        const act_q8_cview& xq, float* acc) noexcept
    {
        (void)pm;
        constexpr bool k4 = std::is_same_v<S, q4_k_block>;
        constexpr std::int32_t off = std::is_same_v<S, q8_block> ? 128 : k4 ? 0 : 8;
        for (std::size_t j = 0; j < 8; ++j) {
            __m512 f[NR];
            for (int i = 0; i < NR; ++i)
                f[i] = b0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + (8 * std::size_t(i) + j) * 16);
            for (std::size_t b = b0 + j; b < b1; b += 8) {
                const std::uint8_t* wb = pq + 512 * (b - b0);
                __m512i t[NR];
                for (int i = 0; i < NR; ++i)
                    t[i] = _mm512_set1_epi32(-off * xq.srow(std::size_t(i))[b]);
                for (int u = 0; u < 8; ++u) {
                    const __m512i wv = _mm512_load_si512(wb + 64 * u);
                    for (int i = 0; i < NR; ++i) {
                        std::int32_t xv;
                        std::memcpy(&xv, xq.qrow(std::size_t(i)) + 32 * b + 4 * std::size_t(u), 4);
                        t[i] = _mm512_dpbusd_epi32(t[i], wv, _mm512_set1_epi32(xv));
                    }
                }
                const __m512 dw = _mm512_load_ps(pd + 16 * (b - b0));
                for (int i = 0; i < NR; ++i) {
                    const __m512 dx = _mm512_set1_ps(xq.drow(std::size_t(i))[b]);
                    f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[i]), _mm512_mul_ps(dw, dx), f[i]);
                    if constexpr (k4)
                        f[i] = _mm512_fnmadd_ps(_mm512_set1_ps(float(xq.srow(std::size_t(i))[b])),
                            _mm512_mul_ps(_mm512_load_ps(pm + 16 * (b - b0)), dx), f[i]);
                }
            }
            for (int i = 0; i < NR; ++i)
                _mm512_storeu_ps(acc + (8 * std::size_t(i) + j) * 16, f[i]);
        }
    }
    // As qpanel_ymm::finish, a [8][16].
    static void finish(const float* a, float* out) noexcept
    {
        const auto l = [&](int j) { return _mm512_loadu_ps(a + 16 * j); };
        _mm512_storeu_ps(out,
            _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(l(0), l(4)), _mm512_add_ps(l(2), l(6))),
                _mm512_add_ps(_mm512_add_ps(l(1), l(5)), _mm512_add_ps(l(3), l(7)))));
    }
    static constexpr int max_rows = 8;
};
#endif // KDIAL_QDOT_AVX512_VNNI && KDIAL_QDOT_AVX2

// Whether path I runs X of n rows through panels of S.
template <qdot_isa I, class S> inline bool qdot_use_panels(std::size_t n) noexcept
{
    return qpanel<I>::has && n >= qdot_panel_min_rows;
}

// y[i, o] for every row of xq and o in [o0, o1), panel by panel; with `up`
// (swiglu) the panel of up follows gate's and y = silu(gate dot) * (up dot)
// (gate's dot parked in y). Requires qdot_use_panels.
template <qdot_isa I, class S, class WV>
void qdot_panels(const WV& w, const WV* up, const act_q8_cview& xq, std::size_t o0, std::size_t o1, float* y,
    std::size_t ldy) noexcept
{
    if constexpr (qpanel<I>::has) {
        using P = qpanel<I>;
        constexpr std::size_t C = P::cols;
        constexpr bool k4 = std::is_same_v<S, q4_k_block>;
        const std::size_t nb = xq.blocks, n = xq.rows;
        const bool one_segment = nb <= qpanel_max_blocks;
        alignas(64) std::uint8_t pq[qpanel_max_blocks * 32 * C];
        alignas(64) float pd[qpanel_max_blocks * C];
        alignas(64) float pm[k4 ? qpanel_max_blocks * C : 1];
        alignas(64) float acc[qpanel_chunk_rows * 8 * C];
        for (std::size_t c0 = o0; c0 < o1; c0 += C) {
            const std::size_t cn = std::min(C, o1 - c0);
            for (int pass = 0; pass < (up ? 2 : 1); ++pass) {
                const WV& m = pass ? *up : w;
                const S* rows[C];
                for (std::size_t c = 0; c < C; ++c)
                    rows[c] = m.row(c0 + std::min(c, cn - 1)); // past cn: a copy, not stored
                const auto pack = [&](std::size_t s0, std::size_t s1) {
                    for (std::size_t b = s0; b < s1; ++b)
                        P::template pack<S>(
                            rows, b, pq + 32 * C * (b - s0), pd + C * (b - s0), pm + (k4 ? C * (b - s0) : 0));
                };
                if (one_segment)
                    pack(0, nb);
                for (std::size_t r0 = 0; r0 < n; r0 += qpanel_chunk_rows) {
                    const std::size_t rn = std::min(qpanel_chunk_rows, n - r0);
                    for (std::size_t s0 = 0; s0 < nb; s0 += qpanel_max_blocks) {
                        const std::size_t s1 = std::min(nb, s0 + qpanel_max_blocks);
                        if (!one_segment)
                            pack(s0, s1);
                        for_row_groups<1, P::max_rows>(rn, [&]<int NR>(std::size_t i0) {
                            P::template rows<S, NR>(pq, pd, pm, s0, s1, xq.sub_rows(r0 + i0, NR), acc + i0 * 8 * C);
                        });
                    }
                    for (std::size_t i = 0; i < rn; ++i) {
                        float out[C];
                        P::finish(acc + i * 8 * C, out);
                        float* yr = y + (r0 + i) * ldy + c0;
                        for (std::size_t c = 0; c < cn; ++c)
                            yr[c] = !up || pass == 0 ? out[c] : simd::silu(yr[c]) * out[c];
                    }
                }
            }
        }
    }
}

// Output columns per block of the prefill path for weight rows of
// row_bytes bytes, `per` rows per column (gate + up: 2): half the L2 (at
// least 64 KiB) of weights, a multiple of 4, at least 4. Changes no bits.
inline std::size_t qdot_block_cols(std::size_t row_bytes, std::size_t per) noexcept
{
    static const std::size_t bytes = std::max<std::size_t>(std::size_t { 64 } << 10, cpu_caches().l2 / 2);
    return std::max<std::size_t>(4, bytes / std::max<std::size_t>(1, per * row_bytes) / 4 * 4);
}

// linear_qgemv over any row count: column blocks outside, row groups inside.
template <qdot_isa I, weight_type W>
void linear_qgemm(
    const weight_view<W>& w, const act_q8_cview& xq, std::size_t o0, std::size_t o1, float* y, std::size_t ldy) noexcept
{
    using S = typename W::storage;
    if (qdot_use_panels<I, S>(xq.rows))
        return qdot_panels<I, S>(w, static_cast<const weight_view<W>*>(nullptr), xq, o0, o1, y, ldy);
    const std::size_t ob = qdot_block_cols(storage_cols<W>(w.cols) * sizeof(S), 1);
    for (std::size_t b0 = o0; b0 < o1; b0 += ob) {
        const std::size_t b1 = std::min(o1, b0 + ob);
        for_row_groups<1, 4>(xq.rows,
            [&]<int NR>(std::size_t i0) { linear_qgemv<I, W, NR>(w, xq.sub_rows(i0, NR), b0, b1, y + i0 * ldy, ldy); });
    }
}

// gate_up_qgemv over any row count, blocked as linear_qgemm.
template <qdot_isa I, weight_type W>
void gate_up_qgemm(const weight_view<W>& gate, const weight_view<W>& up, const act_q8_cview& xq, std::size_t f0,
    std::size_t f1, float* h, std::size_t ldh) noexcept
{
    using S = typename W::storage;
    if (qdot_use_panels<I, S>(xq.rows))
        return qdot_panels<I, S>(gate, &up, xq, f0, f1, h, ldh);
    const std::size_t fb = qdot_block_cols(storage_cols<W>(gate.cols) * sizeof(S), 2);
    for (std::size_t b0 = f0; b0 < f1; b0 += fb) {
        const std::size_t b1 = std::min(f1, b0 + fb);
        for_row_groups<1, 4>(xq.rows, [&]<int NR>(std::size_t i0) {
            gate_up_qgemv<I, W, NR>(gate, up, xq.sub_rows(i0, NR), b0, b1, h + i0 * ldh, ldh);
        });
    }
}

} // namespace detail

// Y[:, o0:o1] = X . W[o0:o1, :]ᵀ with X given quantised (quantize_act_q8;
// any xq.rows, xq.blocks == ceil(W.cols / 32)); path I (default: the one
// of Arch). Other columns of Y are not touched. Each output's bits depend
// only on its row of X and its row of W (see the header comment).
template <qdot_weight W, class Arch = xsimd::default_arch, qdot_isa I = qdot_isa_for<Arch>()>
void linear_q8act(const weight_view<W>& w /*[O, K]*/, const act_q8_cview& xq /*[n, K]*/, std::size_t o0, std::size_t o1,
    matrix_view<float> y /*[n, O]*/) noexcept
{
    static_assert(qdot_isa_built<I>, "kdial::linear_q8act: this build lacks the instructions of path I");
    switch (xq.rows) {
    case 0:
        return;
    case 1:
        return detail::linear_qgemv<I, W, 1>(w, xq, o0, o1, y.data, y.stride);
    case 2:
        return detail::linear_qgemv<I, W, 2>(w, xq, o0, o1, y.data, y.stride);
    case 3:
        return detail::linear_qgemv<I, W, 3>(w, xq, o0, o1, y.data, y.stride);
    case 4:
        return detail::linear_qgemv<I, W, 4>(w, xq, o0, o1, y.data, y.stride);
    default:
        return detail::linear_qgemm<I, W>(w, xq, o0, o1, y.data, y.stride);
    }
}

// H[:, f0:f1] = silu(X . Wg[f0:f1]ᵀ) * (X . Wu[f0:f1]ᵀ) with X given
// quantised (any xq.rows).
template <qdot_weight W, class Arch = xsimd::default_arch, qdot_isa I = qdot_isa_for<Arch>()>
void swiglu_gate_up_q8act(const weight_view<W>& gate /*[F, d]*/, const weight_view<W>& up /*[F, d]*/,
    const act_q8_cview& xq /*[n, d]*/, std::size_t f0, std::size_t f1, matrix_view<float> h /*[n, F]*/) noexcept
{
    static_assert(qdot_isa_built<I>, "kdial::swiglu_gate_up_q8act: this build lacks the instructions of path I");
    switch (xq.rows) {
    case 0:
        return;
    case 1:
        return detail::gate_up_qgemv<I, W, 1>(gate, up, xq, f0, f1, h.data, h.stride);
    case 2:
        return detail::gate_up_qgemv<I, W, 2>(gate, up, xq, f0, f1, h.data, h.stride);
    case 3:
        return detail::gate_up_qgemv<I, W, 3>(gate, up, xq, f0, f1, h.data, h.stride);
    case 4:
        return detail::gate_up_qgemv<I, W, 4>(gate, up, xq, f0, f1, h.data, h.stride);
    default:
        return detail::gate_up_qgemm<I, W>(gate, up, xq, f0, f1, h.data, h.stride);
    }
}

// The stack buffer linear() / swiglu_gate_up() quantise X into for
// act_mode::int8, a chunk of rows at a time (rows * cols int8 plus scales
// and sums): X with cols <= this runs the int8 path at any row count, wider
// X the exact one (K <= 16384 covers OLMoE, Qwen1.5-MoE and Mixtral).
// Callers that quantise once for many calls (moe::run_experts,
// dense_linear) use the *_q8act entry points with their own memory.
inline constexpr std::size_t act_q8_stack_elems = 16384;

} // namespace kdial
