// kernels/rows.hpp (the small-row path, 5 <= n <= small_max_rows) through
// linear and swiglu_gate_up: every row count 1..130 around the GEMV / small /
// GEMM thresholds against the scalar reference, every weight format, every
// SIMD arch this CPU runs; a row's bits do not depend on the row count in
// [5, small_max_rows] nor on its place in the call (and equal the GEMV's at
// n = 3, 4 when K fits one chunk, detail::rows_kc); a weight matrix
// wider than one cache-derived column block; and the cache sizes themselves. With
// act_mode::int8 (q8, q4_0, q4_k): every row count 1..130 gives the int8
// reference's bits (tests/ref/qdot_ref.hpp) on every arch.
#include <doctest/doctest.h>

#include <kdial/core/cache.hpp>
#include <kdial/kernels/linear.hpp>

#include "kernels/arch_kernels.hpp"
#include "ref/kernels_ref.hpp"
#include "ref/qdot_ref.hpp"

#include <cstring>
#include <random>
#include <vector>

using namespace kdial;

namespace {

using test::arch_fns;
using test::kernel_archs;

template <weight_type W> std::size_t fit_k(std::size_t K)
{
    return std::is_same_v<W, q4_k_t> ? (K + qk_k - 1) / qk_k * qk_k : K;
}

bool same_rows(cmatrix_view<float> a, cmatrix_view<float> b)
{
    for (std::size_t i = 0; i < a.rows; ++i)
        if (std::memcmp(a.row(i), b.row(i), a.cols * sizeof(float)) != 0)
            return false;
    return true;
}

// y = linear(w, x) against the double reference, bound gamma_K * sum |w x|
// (the derivation is in tests/kernels/linear.cpp; the small-row path runs
// the GEMV's sums).
template <weight_type W>
double linear_ratio(const arch_fns<W>& kf, const weight_view<W>& w, const std::vector<float>& wf,
    const ref::owned_matrix& x, std::size_t& wi, std::size_t& wj)
{
    const std::size_t n = x.view.rows, O = w.rows, K = w.cols;
    auto y = ref::filled_matrix(n, O, 1, 1);
    kf.linear(w, x.view, 0, O, y.view);
    std::vector<double> want, abs;
    ref::linear(wf, O, K, x.view.data, n, x.view.stride, want, abs);
    std::vector<double> tol(abs.size());
    for (std::size_t i = 0; i < abs.size(); ++i)
        tol[i] = ref::gamma(K) * abs[i] + 1e-30;
    const ref::worst wo = ref::compare(y.view, want, tol);
    wi = wo.i;
    wj = wo.j;
    return wo.ratio;
}

} // namespace

#define KDIAL_WEIGHT_TYPES f32_t, bf16_t, f16_t, q8_t, q4_0_t, q4_k_t

TEST_CASE("cache sizes: read once, plausible, sizes parsed [kernels][cache]")
{
    const cache_sizes& c = cpu_caches();
    CHECK(&c == &cpu_caches());
    CHECK(c.l1d >= (std::size_t { 4 } << 10));
    CHECK(c.l2 >= c.l1d);
    MESSAGE("caches: L1d ", c.l1d, " L2 ", c.l2, " L3 ", c.l3, " bytes");
    CHECK(detail::parse_cache_size("48K") == 48 * 1024);
    CHECK(detail::parse_cache_size("1024K\n") == 1024 * 1024);
    CHECK(detail::parse_cache_size("32M") == std::size_t { 32 } << 20);
    CHECK(detail::parse_cache_size("4096") == 4096);
    CHECK(detail::parse_cache_size("x") == 0);
    CHECK(detail::rows_block_bytes() >= c.l2 / 2);
}

TEST_CASE_TEMPLATE("linear, swiglu_gate_up: every row count 1..130 matches reference, every arch [kernels][rows]", W,
    KDIAL_WEIGHT_TYPES)
{
    for (const auto* arch : kernel_archs()) {
        CAPTURE(arch->name);
        const arch_fns<W>& kf = arch->get<W>();
        std::mt19937 rng(21);
        const std::size_t O = 19, K = fit_k<W>(75);
        const auto w = ref::random_weights<W>(O, K, rng, 3, 1);
        const auto g = ref::random_weights<W>(O, K, rng, 1, 0);
        const std::vector<float> wf = ref::dequantize(w.view), gf = ref::dequantize(g.view);
        for (std::size_t n = 1; n <= 130; ++n) {
            CAPTURE(n);
            const auto x = ref::random_matrix(n, K, rng, 5, 1, 0.5f);
            std::size_t wi = 0, wj = 0;
            const double r = linear_ratio<W>(kf, w.view, wf, x, wi, wj);
            INFO("worst element [", wi, ", ", wj, "] at ", r, " x tol");
            CHECK(r <= 1.0);

            // gate_up: h = silu(x g) * (x w); tolerance as in linear.cpp.
            auto h = ref::filled_matrix(n, O, 2, 0);
            kf.gate_up(g.view, w.view, x.view, 0, O, h.view);
            std::vector<double> gw, ga, uw, ua;
            ref::linear(gf, O, K, x.view.data, n, x.view.stride, gw, ga);
            ref::linear(wf, O, K, x.view.data, n, x.view.stride, uw, ua);
            std::vector<double> want(n * O), tol(n * O);
            const double gam = ref::gamma(K), ulp = std::ldexp(1.0, -24);
            for (std::size_t i = 0; i < n * O; ++i) {
                want[i] = ref::silu(gw[i]) * uw[i];
                const double eg = gam * ga[i], eu = gam * ua[i];
                tol[i] = 1.1 * eg * (std::fabs(uw[i]) + eu) + (std::fabs(gw[i]) + eg) * eu
                    + 16 * ulp * std::fabs(want[i]) + 1e-30;
            }
            const ref::worst wo = ref::compare(h.view, want, tol);
            INFO("gate_up worst element [", wo.i, ", ", wo.j, "]: got ", wo.got, " want ", wo.want);
            CHECK(wo.ratio <= 1.0);
        }
    }
}

TEST_CASE_TEMPLATE("linear, swiglu_gate_up: a row's bits do not depend on the row count in [5, small_max_rows_of], "
                   "every arch [kernels][rows][determinism]",
    W, KDIAL_WEIGHT_TYPES)
{
    for (const auto* arch : kernel_archs()) {
        CAPTURE(arch->name);
        const arch_fns<W>& kf = arch->get<W>();
        std::mt19937 rng(22);
        // K = kc + 76 crosses a chunk boundary (q4_k: rounded up to whole
        // super-blocks); K = 133 fits one chunk.
        constexpr std::size_t kc = detail::rows_kc;
        for (const std::size_t K0 : { std::size_t { 133 }, kc + 76 }) {
            const std::size_t O = 23, K = fit_k<W>(K0), N = small_max_rows_of(W::id);
            CAPTURE(K);
            const auto w = ref::random_weights<W>(O, K, rng);
            const auto u = ref::random_weights<W>(O, K, rng);
            const auto x = ref::random_matrix(N, K, rng, 2, 1);
            auto full = ref::filled_matrix(N, O), hfull = ref::filled_matrix(N, O);
            kf.linear(w.view, x.view, 0, O, full.view);
            kf.gate_up(w.view, u.view, x.view, 0, O, hfull.view);
            const std::size_t lo = K <= kc ? 3 : 5; // one chunk: the GEMV's n = 3, 4 too
            for (std::size_t n = lo; n <= N; ++n) {
                CAPTURE(n);
                for (const std::size_t r0 : { std::size_t { 0 }, (N - n) / 2, N - n }) {
                    CAPTURE(r0);
                    auto y = ref::filled_matrix(n, O), h = ref::filled_matrix(n, O);
                    kf.linear(w.view, x.view.sub_rows(r0, n), 0, O, y.view);
                    kf.gate_up(w.view, u.view, x.view.sub_rows(r0, n), 0, O, h.view);
                    CHECK(same_rows(y.view, cmatrix_view<float>(full.view.sub_rows(r0, n))));
                    CHECK(same_rows(h.view, cmatrix_view<float>(hfull.view.sub_rows(r0, n))));
                }
            }
        }
    }
}

TEST_CASE_TEMPLATE("linear, swiglu_gate_up: weights wider than one cache-derived column block, every arch "
                   "[kernels][rows]",
    W, f32_t, bf16_t, q8_t, q4_k_t)
{
    // Enough output rows for three column blocks of the small-row path.
    const std::size_t K = fit_k<W>(1100);
    const std::size_t row_bytes = storage_cols<W>(K) * sizeof(typename W::storage);
    const std::size_t O = 2 * detail::rows_block_cols(row_bytes, 1) + 13;
    for (const auto* arch : kernel_archs()) {
        CAPTURE(arch->name);
        const arch_fns<W>& kf = arch->get<W>();
        std::mt19937 rng(23);
        const auto w = ref::random_weights<W>(O, K, rng);
        const std::vector<float> wf = ref::dequantize(w.view);
        for (std::size_t n : { std::size_t { 5 }, std::size_t { 9 }, small_max_rows_of(W::id) }) {
            CAPTURE(n);
            const auto x = ref::random_matrix(n, K, rng);
            std::size_t wi = 0, wj = 0;
            CHECK(linear_ratio<W>(kf, w.view, wf, x, wi, wj) <= 1.0);
            // Calls of 5 rows each (one row group, every column block) give
            // the same bits as the whole call.
            auto y = ref::filled_matrix(n, O), z = ref::filled_matrix(n, O);
            kf.linear(w.view, x.view, 0, O, y.view);
            for (std::size_t i = 0; i < n; i += 5) {
                const std::size_t i0 = n - i < 5 ? n - 5 : i;
                kf.linear(w.view, x.view.sub_rows(i0, 5), 0, O, z.view.sub_rows(i0, 5));
            }
            CHECK(same_rows(y.view, z.view));
            auto h = ref::filled_matrix(n, O / 2), hz = ref::filled_matrix(n, O / 2);
            const weight_view<W> g(w.view.data, O / 2, K, w.view.row_stride),
                uu(w.view.row(O / 2), O / 2, K, w.view.row_stride);
            kf.gate_up(g, uu, x.view, 0, O / 2, h.view);
            for (std::size_t i = 0; i < n; i += 5) {
                const std::size_t i0 = n - i < 5 ? n - 5 : i;
                kf.gate_up(g, uu, x.view.sub_rows(i0, 5), 0, O / 2, hz.view.sub_rows(i0, 5));
            }
            CHECK(same_rows(h.view, hz.view));
        }
    }
}

TEST_CASE_TEMPLATE("linear, swiglu_gate_up act_mode::int8: every row count 1..130 gives the int8 reference's bits, "
                   "every arch [kernels][rows][qdot]",
    W, q8_t, q4_0_t, q4_k_t)
{
    for (const auto* arch : kernel_archs()) {
        CAPTURE(arch->name);
        const arch_fns<W>& kf = arch->get<W>();
        std::mt19937 rng(24);
        // Odd O; K: 9 blocks of 32 plus a partial one (q4_k: 2 super-blocks).
        const std::size_t O = 19, K = std::is_same_v<W, q4_k_t> ? 512 : 301;
        const auto w = ref::random_weights<W>(O, K, rng, 3, 1);
        const auto g = ref::random_weights<W>(O, K, rng, 1, 0);
        for (std::size_t n = 1; n <= 130; ++n) {
            CAPTURE(n);
            const auto x = ref::random_matrix(n, K, rng, 5, 1, 0.5f);
            auto y = ref::filled_matrix(n, O, 1, 1), h = ref::filled_matrix(n, O, 2, 0);
            kf.linear_int8(w.view, x.view, 0, O, y.view);
            kf.gate_up_int8(g.view, w.view, x.view, 0, O, h.view);
            const auto want = ref::linear_int8(w.view, x.view.data, n, x.view.stride);
            const auto wg = ref::linear_int8(g.view, x.view.data, n, x.view.stride);
            bool same = true, hsame = true;
            for (std::size_t i = 0; i < n; ++i)
                for (std::size_t o = 0; o < O; ++o) {
                    const float hw = simd::silu(wg[i * O + o]) * want[i * O + o];
                    same = same && std::memcmp(&y.view(i, o), &want[i * O + o], sizeof(float)) == 0;
                    hsame = hsame && std::memcmp(&h.view(i, o), &hw, sizeof(float)) == 0;
                }
            CHECK(same);
            CHECK(hsame);
        }
    }
}
