// kernels/linear.hpp: linear and swiglu_gate_up against the scalar reference
// on odd shapes (q4_k: rows of whole 256-blocks), every dtype, every path (GEMV n <= 4, small-row
// n <= small_max_rows, GEMM above; tests/kernels/rows.cpp sweeps every n), every
// column split bit-identical, strided and misaligned views; for every SIMD
// arch this CPU runs (SSE4.2, AVX2 + FMA, AVX-512 on x86; NEON on aarch64),
// each from its own TU (tests/kernels/arch/).
#include <doctest/doctest.h>

#include <kdial/kernels/linear.hpp>

#include "kernels/arch_kernels.hpp"
#include "ref/kernels_ref.hpp"

#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace kdial;

namespace kdial::test {
std::vector<const arch_kernels*> kernel_archs()
{
    std::vector<const arch_kernels*> v;
#if defined(__x86_64__) || defined(__i386__)
    const auto cpu = xsimd::available_architectures();
    if (cpu.sse4_2)
        v.push_back(&kernels_sse4_2);
    if (cpu.fma3_avx2)
        v.push_back(&kernels_fma3_avx2);
    if (cpu.avx512f && cpu.avx512cd && cpu.avx512dq && cpu.avx512bw)
        v.push_back(&kernels_avx512bw);
#elif defined(__aarch64__)
    v.push_back(&kernels_neon64);
#else
    static constexpr arch_kernels native = make_arch_kernels<xsimd::default_arch>();
    v.push_back(&native);
#endif
    return v;
}
} // namespace kdial::test

namespace {

using test::arch_fns;
using test::kernel_archs;

// 13: the GEMM for q8, q4_0 and q4_k, the small-row path for the rest; 17:
// the GEMM for f32 too; small_max_rows: the small-row path for bf16 and f16
// (small_max_rows_of); small_max_rows + 1: the GEMM for all.
const std::size_t row_counts[] = { 0, 1, 2, 3, 4, 5, 13, 17, small_max_rows, small_max_rows + 1, 64, 300 };

// Runs linear over [0, O) split at the given cut points, into y.
template <weight_type W>
void linear_split(const arch_fns<W>& k, const weight_view<W>& w, cmatrix_view<float> x, matrix_view<float> y,
    const std::vector<std::size_t>& cuts)
{
    std::size_t o0 = 0;
    for (std::size_t c : cuts) {
        k.linear(w, x, o0, c, y);
        o0 = c;
    }
    k.linear(w, x, o0, w.rows, y);
}

// The row length to test for format W: K itself, or for q4_k (whose rows
// are whole super-blocks) K rounded up to a multiple of 256.
template <weight_type W> std::size_t fit_cols(std::size_t K)
{
    return std::is_same_v<W, q4_k_t> ? (K + qk_k - 1) / qk_k * qk_k : K;
}

bool same_bytes(cmatrix_view<float> a, cmatrix_view<float> b)
{
    for (std::size_t i = 0; i < a.rows; ++i)
        if (std::memcmp(a.row(i), b.row(i), a.cols * sizeof(float)) != 0)
            return false;
    return true;
}

bool padding_intact(const ref::owned_matrix& m)
{
    for (std::size_t i = 0; i < m.view.rows; ++i)
        for (std::size_t j = m.view.cols; j < m.view.stride; ++j)
            if (m.view(i, j) != ref::sentinel)
                return false;
    return m.buf.back() == ref::sentinel && (m.view.data == m.buf.data() || m.buf.front() == ref::sentinel);
}

} // namespace

#define KDIAL_WEIGHT_TYPES f32_t, bf16_t, f16_t, q8_t, q4_0_t, q4_k_t

TEST_CASE("kernel archs: the native arch is among those tested [kernels][arch]")
{
    const auto archs = kernel_archs();
    REQUIRE(!archs.empty());
    std::string names;
    bool native = false;
    for (const auto* a : archs) {
        names += std::string(" ") + a->name;
        native = native || std::string(a->name) == xsimd::default_arch::name();
        CHECK(32 % a->lanes == 0); // a q8 block holds whole vectors
    }
    MESSAGE("kernel archs run on this CPU:", names, " (native: ", std::string(xsimd::default_arch::name()), ")");
#if defined(__x86_64__) || defined(__i386__)
    // (A build below SSE4.2, e.g. KDIAL_NATIVE=OFF, has no table of its own.)
    if (std::is_same_v<xsimd::default_arch,
            xsimd::
                sse4_2> || std::is_same_v<xsimd::default_arch, xsimd::avx512bw> || std::is_same_v<xsimd::default_arch, xsimd::fma3<xsimd::avx2>>)
        CHECK(native);
#else
    CHECK(native);
#endif
}

TEST_CASE_TEMPLATE(
    "linear: matches reference within gamma_K bound, odd shapes, every arch [kernels][linear]", W, KDIAL_WEIGHT_TYPES)
{
    for (const auto* arch : kernel_archs()) {
        CAPTURE(arch->name);
        const arch_fns<W>& kf = arch->get<W>();
        std::mt19937 rng(11);
        struct shape {
            std::size_t O, K;
        };
        // K = 1..531: not multiples of 8 or 32; 257 and 531 cross the GEMM K block.
        for (shape s : { shape { 1, 1 }, shape { 7, 3 }, shape { 13, 31 }, shape { 37, 33 }, shape { 45, 67 },
                 shape { 33, 257 }, shape { 19, 531 } }) {
            s.K = fit_cols<W>(s.K);
            const auto w = ref::random_weights<W>(s.O, s.K, rng, /*pad*/ 3, /*offset*/ 1);
            const std::vector<float> wf = ref::dequantize(w.view);
            for (std::size_t n : row_counts) {
                CAPTURE(s.O);
                CAPTURE(s.K);
                CAPTURE(n);
                const auto x = ref::random_matrix(n, s.K, rng, /*pad*/ 5, /*offset*/ 1);
                auto y = ref::filled_matrix(n, s.O, /*pad*/ 2, /*offset*/ 1);
                kf.linear(w.view, x.view, 0, s.O, y.view);

                std::vector<double> want, abs;
                ref::linear(wf, s.O, s.K, x.view.data, n, x.view.stride, want, abs);
                // Bound: gamma_K * sum |w x| (w the dequantised f32 weight). For
                // f32/bf16/q4_k every path only reorders an FMA sum of the
                // exact products (q4_k: of the loaded values fma(q, D, -M),
                // which ref::dequantize gives too). The q8 and q4_0 GEMV
                // paths sum the integers (q, or q - 8) times x per 32-block first and
                // scales once (fma(block sum, scale, acc)), i.e. it uses the exact
                // scale * q instead of w = fl(scale * q) = scale * q (1 + d),
                // |d| <= u. Each term then carries at most m + 1 factors
                // (1 + e)^(+-1), |e| <= u: m roundings (32 / L in the block, one
                // for the scale FMA, its chain of ceil(nb / C), C - 1 chain adds,
                // log2 L for hsum, the tail) plus the one for d. m + 1 <= K for
                // every K >= 32 (blocks only exist there), so gamma_K still holds
                // (Higham, Lemma 3.1).
                std::vector<double> tol(abs.size());
                for (std::size_t i = 0; i < abs.size(); ++i)
                    tol[i] = ref::gamma(s.K) * abs[i] + 1e-30;
                const ref::worst wo = ref::compare(y.view, want, tol);
                INFO("worst element [", wo.i, ", ", wo.j, "]: got ", wo.got, " want ", wo.want, " tol ", wo.tol, " (",
                    wo.ratio, " x tol)");
                CHECK(wo.ratio <= 1.0);
                CHECK(padding_intact(y));
            }
        }
    }
}

TEST_CASE_TEMPLATE("linear: every column split gives identical bytes, every arch [kernels][linear][determinism]", W,
    KDIAL_WEIGHT_TYPES)
{
    for (const auto* arch : kernel_archs()) {
        CAPTURE(arch->name);
        const arch_fns<W>& kf = arch->get<W>();
        std::mt19937 rng(12);
        const std::size_t O = 53, K = fit_cols<W>(291);
        const auto w = ref::random_weights<W>(O, K, rng);
        for (std::size_t n : row_counts) {
            CAPTURE(n);
            const auto x = ref::random_matrix(n, K, rng, 1, 1);
            auto full = ref::filled_matrix(n, O);
            kf.linear(w.view, x.view, 0, O, full.view);

            // Every column alone, fixed odd tiles, and random cut points.
            std::vector<std::vector<std::size_t>> splits;
            std::vector<std::size_t> each;
            for (std::size_t o = 1; o < O; ++o)
                each.push_back(o);
            splits.push_back(each);
            for (std::size_t t : { 3u, 5u, 16u, 17u, 33u }) {
                std::vector<std::size_t> cuts;
                for (std::size_t o = t; o < O; o += t)
                    cuts.push_back(o);
                splits.push_back(cuts);
            }
            for (int r = 0; r < 4; ++r) {
                std::vector<std::size_t> cuts;
                for (std::size_t o = 1 + rng() % 9; o < O; o += 1 + rng() % 19)
                    cuts.push_back(o);
                splits.push_back(cuts);
            }
            for (const auto& cuts : splits) {
                auto y = ref::filled_matrix(n, O);
                linear_split<W>(kf, w.view, x.view, y.view, cuts);
                CHECK(same_bytes(y.view, full.view));
            }
        }
    }
}

TEST_CASE_TEMPLATE("linear: GEMM rows do not depend on the row count, every arch [kernels][linear][determinism]", W,
    KDIAL_WEIGHT_TYPES)
{
    for (const auto* arch : kernel_archs()) {
        CAPTURE(arch->name);
        const arch_fns<W>& kf = arch->get<W>();
        std::mt19937 rng(13);
        const std::size_t O = 29, K = fit_cols<W>(300), n = 600; // n > the GEMM row block
        const auto w = ref::random_weights<W>(O, K, rng);
        const auto x = ref::random_matrix(n, K, rng);
        auto full = ref::filled_matrix(n, O);
        kf.linear(w.view, x.view, 0, O, full.view);
        const std::size_t s = small_max_rows_of(W::id);
        for (std::size_t m : { s + 1, s + 2, s + 7, std::size_t { 299 } }) {
            for (std::size_t r0 : { std::size_t { 0 }, std::size_t { 1 }, n - m }) {
                auto part = ref::filled_matrix(m, O);
                kf.linear(w.view, x.view.sub_rows(r0, m), 0, O, part.view);
                CHECK(same_bytes(part.view, cmatrix_view<float>(full.view.sub_rows(r0, m))));
            }
        }
    }
}

TEST_CASE_TEMPLATE("swiglu_gate_up: matches reference and splits are bit-identical, every arch [kernels][swiglu]", W,
    KDIAL_WEIGHT_TYPES)
{
    for (const auto* arch : kernel_archs()) {
        CAPTURE(arch->name);
        const arch_fns<W>& kf = arch->get<W>();
        std::mt19937 rng(14);
        const std::size_t F = 45, d = fit_cols<W>(67 + 256);
        const auto g = ref::random_weights<W>(F, d, rng, 1, 1);
        const auto u = ref::random_weights<W>(F, d, rng, 2, 0);
        const std::vector<float> gf = ref::dequantize(g.view), uf = ref::dequantize(u.view);
        for (std::size_t n : row_counts) {
            CAPTURE(n);
            const auto x = ref::random_matrix(n, d, rng, 3, 1, 0.2f);
            auto h = ref::filled_matrix(n, F, 1, 1);
            kf.gate_up(g.view, u.view, x.view, 0, F, h.view);
            CHECK(padding_intact(h));

            // Reference and bound: with |eg| <= gamma_d Sg, |eu| <= gamma_d Su,
            // |h - h*| <= max|silu'| |eg| |u| + |silu(g)| |eu| + silu's own
            // rounding (exp, divide, multiply: 16 ulp of |h| is generous);
            // max|silu'| < 1.1 and |silu(g)| <= |g|.
            std::vector<double> gw, ga, uw, ua;
            ref::linear(gf, F, d, x.view.data, n, x.view.stride, gw, ga);
            ref::linear(uf, F, d, x.view.data, n, x.view.stride, uw, ua);
            std::vector<double> want(n * F), tol(n * F);
            const double gam = ref::gamma(d), ulp = std::ldexp(1.0, -24);
            for (std::size_t i = 0; i < n * F; ++i) {
                want[i] = ref::silu(gw[i]) * uw[i];
                const double eg = gam * ga[i], eu = gam * ua[i];
                tol[i] = 1.1 * eg * (std::fabs(uw[i]) + eu) + (std::fabs(gw[i]) + eg) * eu
                    + 16 * ulp * std::fabs(want[i]) + 1e-30;
            }
            const ref::worst wo = ref::compare(h.view, want, tol);
            INFO("worst element [", wo.i, ", ", wo.j, "]: got ", wo.got, " want ", wo.want, " tol ", wo.tol, " (",
                wo.ratio, " x tol)");
            CHECK(wo.ratio <= 1.0);

            for (std::size_t t : { 1u, 4u, 7u, 8u, 16u, 20u }) {
                auto hs = ref::filled_matrix(n, F, 1, 1);
                for (std::size_t f = 0; f < F; f += t)
                    kf.gate_up(g.view, u.view, x.view, f, std::min(F, f + t), hs.view);
                CHECK(same_bytes(hs.view, h.view));
            }
        }
    }
}
