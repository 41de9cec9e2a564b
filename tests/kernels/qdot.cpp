// kernels/qdot.hpp: the int8 activation quantiser and the integer-dot
// kernels (q8, q4_0, q4_k weights; decode n = 1..4 and prefill at any row
// count) against the scalar reference written from the definition
// (tests/ref/qdot_ref.hpp), bit for bit, on every integer-dot path this build
// has and this CPU runs (generic, AVX2, AVX-VNNI, AVX-512BW, AVX-512 VNNI;
// NEON / NEON dotprod on aarch64), odd shapes, every output split, extreme
// inputs, every row count and position (so a row's bits do not depend on the
// row count, its group or the column blocks); through linear() for every
// arch TU; dense_linear (several outputs, row chunks) with 1 and 2 threads;
// and the extra error of int8 activations against the exact f32 path,
// within a derived bound.
#include <doctest/doctest.h>

#include <kdial/kernels/dense.hpp>
#include <kdial/kernels/linear.hpp>
#include <kdial/kernels/qdot.hpp>

#include "io/io_test_util.hpp"
#include "kernels/arch_kernels.hpp"
#include "ref/kernels_ref.hpp"
#include "ref/qdot_ref.hpp"
#include "test_util.hpp"

#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace kdial;

namespace {

template <weight_type W> struct qfns {
    void (*lin)(
        const weight_view<W>&, const act_q8_cview&, std::size_t, std::size_t, matrix_view<float>) noexcept = nullptr;
    void (*gu)(const weight_view<W>&, const weight_view<W>&, const act_q8_cview&, std::size_t, std::size_t,
        matrix_view<float>) noexcept = nullptr;
};

struct isa_entry {
    const char* name;
    bool runs; // built and this CPU has it
    qfns<q8_t> q8;
    qfns<q4_0_t> q4_0;
    qfns<q4_k_t> q4_k;
    template <weight_type W> const qfns<W>& get() const
    {
        if constexpr (std::is_same_v<W, q8_t>)
            return q8;
        else if constexpr (std::is_same_v<W, q4_0_t>)
            return q4_0;
        else
            return q4_k;
    }
};

template <qdot_isa I, weight_type W> qfns<W> make_qfns()
{
    if constexpr (qdot_isa_built<I>)
        return { &linear_q8act<W, xsimd::default_arch, I>, &swiglu_gate_up_q8act<W, xsimd::default_arch, I> };
    else
        return {};
}

template <qdot_isa I> isa_entry make_entry(const char* name, bool cpu)
{
    return { name, qdot_isa_built<I> && cpu, make_qfns<I, q8_t>(), make_qfns<I, q4_0_t>(), make_qfns<I, q4_k_t>() };
}

bool cpu_has([[maybe_unused]] const char* what)
{
#if defined(__x86_64__) || defined(__i386__)
    const std::string w = what;
    if (w == "avx2")
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (w == "avx512bw")
        return __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    if (w == "avx512vnni")
        return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl");
    if (w == "avxvnni") {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
        return cpu_has("avx512vnni"); // the EVEX form is what this build emits
#else
        return __builtin_cpu_supports("avxvnni");
#endif
    }
#endif
    return true;
}

std::vector<isa_entry> isas()
{
    std::vector<isa_entry> v { make_entry<qdot_isa::generic>("generic", true),
        make_entry<qdot_isa::avx2>("avx2", cpu_has("avx2")),
        make_entry<qdot_isa::avx_vnni>("avx_vnni", cpu_has("avx2") && cpu_has("avxvnni")),
        make_entry<qdot_isa::avx512bw>("avx512bw", cpu_has("avx512bw")),
        make_entry<qdot_isa::avx512_vnni>("avx512_vnni", cpu_has("avx512vnni")),
        make_entry<qdot_isa::neon>("neon", true), make_entry<qdot_isa::neon_dot>("neon_dot", true) };
    std::vector<isa_entry> r;
    for (const auto& e : v)
        if (e.runs)
            r.push_back(e);
    return r;
}

template <weight_type W> std::size_t fit_cols(std::size_t K)
{
    return std::is_same_v<W, q4_k_t> ? (K + qk_k - 1) / qk_k * qk_k : K;
}

struct owned_act {
    std::vector<std::byte> mem;
    act_q8_view v;
};
owned_act quantize(cmatrix_view<float> x)
{
    owned_act a;
    a.mem.resize(act_q8_bytes(x.rows, x.cols) + 64);
    a.v = bind_act_q8(detail::align_up(a.mem.data(), 64), x.rows, x.cols);
    quantize_act_q8(x, a.v);
    return a;
}

bool same_float(float a, float b)
{
    return std::memcmp(&a, &b, sizeof a) == 0 || (std::isnan(a) && std::isnan(b));
}

// Fills rows of x with the hard cases, block by block: zeros, huge, f32
// subnormals, values just above the smallest normal scale, one huge value
// among small ones, exact ties (q = k + 1/2).
void add_extremes(matrix_view<float> x, std::mt19937& rng)
{
    std::uniform_real_distribution<float> U(-1.0f, 1.0f);
    for (std::size_t i = 0; i < x.rows; ++i)
        for (std::size_t k = 0; k < x.cols; ++k) {
            const std::size_t kind = (k / 32 + i) % 7;
            const float u = U(rng);
            float v = x(i, k);
            switch (kind) {
            case 0:
                v = 0.0f;
                break;
            case 1:
                v = u * 3e38f;
                break;
            case 2:
                v = u * 1e-40f;
                break;
            case 3:
                v = u * 2e-36f;
                break;
            case 4:
                v = k % 32 == 5 ? 1e30f : u;
                break;
            case 5:
                v = k % 32 == 0 ? 127.0f : float(int(u * 100)) + 0.5f; // ties at d = 1
                break;
            default:
                break;
            }
            x(i, k) = v;
        }
}

// Path f's linear and gate/up on rows [r0, r0 + n) of a, each split at
// column cut: every output must have the reference's bits (want, wu: all
// rows of a), and nothing past y may be written.
template <weight_type W, class F>
void check_rows_bits(const F& f, const weight_view<W>& w, const weight_view<W>& up, const act_q8_view& a,
    const std::vector<float>& want, const std::vector<float>& wu, std::size_t r0, std::size_t n, std::size_t cut)
{
    const std::size_t O = w.rows;
    const act_q8_cview xq = act_q8_cview(a).sub_rows(r0, n);
    auto y = ref::filled_matrix(n, O, 2), h = ref::filled_matrix(n, O, 1);
    f.lin(w, xq, cut, O, y.view);
    f.lin(w, xq, 0, cut, y.view);
    f.gu(w, up, xq, 0, cut, h.view);
    f.gu(w, up, xq, cut, O, h.view);
    bool same = true, hsame = true;
    for (std::size_t i = 0; i < n; ++i)
        for (std::size_t o = 0; o < O; ++o) {
            const std::size_t j = (r0 + i) * O + o;
            same = same && same_float(y.view(i, o), want[j]);
            hsame = hsame && same_float(h.view(i, o), simd::silu(want[j]) * wu[j]);
        }
    CHECK(same);
    CHECK(hsame);
    CHECK(y.buf.back() == ref::sentinel);
}

} // namespace

TEST_CASE("quantize_act_q8: matches the definition, odd widths and extreme blocks [kernels][qdot]")
{
    std::mt19937 rng(7);
    for (std::size_t K : { 1u, 31u, 32u, 33u, 100u, 256u, 2053u })
        for (std::size_t n : { 1u, 3u }) {
            for (int extremes = 0; extremes < 2; ++extremes) {
                auto x = ref::random_matrix(n, K, rng, 3, 1, 4.0f);
                if (extremes)
                    add_extremes(x.view, rng);
                const auto a = quantize(cmatrix_view<float>(x.view));
                const auto r = ref::quantize_act(x.view.data, n, K, x.view.stride);
                CAPTURE(K);
                CAPTURE(n);
                CHECK(std::memcmp(a.v.q, r.q.data(), r.q.size()) == 0);
                CHECK(std::memcmp(a.v.s, r.s.data(), r.s.size() * sizeof(std::int32_t)) == 0);
                bool dsame = true;
                for (std::size_t j = 0; j < r.d.size(); ++j)
                    dsame = dsame && same_float(a.v.d[j], r.d[j]);
                CHECK(dsame);
                if (extremes && K >= 64)
                    CHECK(r.d[0] == 0.0f); // the zero block (row 0, block 0)
            }
        }
    // Subnormal-only and non-finite blocks.
    std::vector<float> x(64, 1e-40f);
    x[40] = NAN;
    const auto a = quantize(cmatrix_view<float>(x.data(), 1, 64));
    CHECK(a.v.d[0] == 0.0f);
    CHECK(a.v.s[0] == 0);
    CHECK(std::isnan(a.v.d[1]));
}

TEST_CASE_TEMPLATE("linear_q8act / swiglu_gate_up_q8act: bit-identical to the reference on every path [kernels][qdot]",
    W, q8_t, q4_0_t, q4_k_t)
{
    const auto list = isas();
    REQUIRE(!list.empty());
    std::mt19937 rng(11);
    const std::size_t Ks[] = { 32, 96, 288, 544, 2080 };
    const std::size_t Os[] = { 1, 3, 7, 33 };
    for (const auto& isa : list) {
        const auto& f = isa.get<W>();
        for (std::size_t K0 : Ks)
            for (std::size_t O : Os)
                for (std::size_t n = 1; n <= 4; ++n)
                    for (int extremes = 0; extremes < 2; ++extremes) {
                        const std::size_t K = fit_cols<W>(K0 + (std::is_same_v<W, q4_k_t> ? 0 : O % 2 * 7));
                        const auto w = ref::random_weights<W>(O, K, rng, 1, 1);
                        const auto up = ref::random_weights<W>(O, K, rng);
                        auto x = ref::random_matrix(n, K, rng, 5, 1, 2.0f);
                        if (extremes)
                            add_extremes(x.view, rng);
                        const auto a = quantize(cmatrix_view<float>(x.view));
                        const auto want = ref::linear_int8(w.view, x.view.data, n, x.view.stride);
                        CAPTURE(isa.name);
                        CAPTURE(K);
                        CAPTURE(O);
                        CAPTURE(n);
                        // Split at an odd cut: outputs do not depend on the split.
                        auto y = ref::filled_matrix(n, O, 2);
                        const std::size_t cut = O / 3;
                        f.lin(w.view, a.v, 0, cut, y.view);
                        f.lin(w.view, a.v, cut, O, y.view);
                        bool same = true;
                        for (std::size_t i = 0; i < n; ++i)
                            for (std::size_t o = 0; o < O; ++o)
                                same = same && same_float(y.view(i, o), want[i * O + o]);
                        CHECK(same);
                        CHECK(y.buf.back() == ref::sentinel);
                        // gate/up: silu(g) * u from the reference dots.
                        const auto wu = ref::linear_int8(up.view, x.view.data, n, x.view.stride);
                        auto h = ref::filled_matrix(n, O, 1);
                        f.gu(w.view, up.view, a.v, 0, cut, h.view);
                        f.gu(w.view, up.view, a.v, cut, O, h.view);
                        bool hsame = true;
                        for (std::size_t i = 0; i < n; ++i)
                            for (std::size_t o = 0; o < O; ++o)
                                hsame = hsame && same_float(h.view(i, o), simd::silu(want[i * O + o]) * wu[i * O + o]);
                        CHECK(hsame);
                    }
    }
}

TEST_CASE("linear_q8act: q8 weights at the int8 limits (-128, 127; a GGUF file may hold -128) and activations "
          "at +-127 give the reference's bits on every path, decode and prefill [kernels][qdot]")
{
    const auto list = isas();
    std::mt19937 rng(5);
    const std::size_t O = 13, K = 544;
    auto w = ref::random_weights<q8_t>(O, K, rng, 0, 0);
    // Whole blocks of -128, of 127, alternating, and random limits; the
    // rest as quantised.
    for (std::size_t o = 0; o < O; ++o)
        for (std::size_t b = 0; b < K / 32; ++b) {
            auto& blk = w.buf[o * (K / 32) + b];
            for (std::size_t l = 0; l < 32; ++l) {
                const int kind = int((o + b) % 5);
                blk.q[l] = kind == 0 ? std::int8_t(-128)
                    : kind == 1      ? std::int8_t(127)
                    : kind == 2      ? std::int8_t(l % 2 ? -128 : 127)
                    : kind == 3      ? std::int8_t(rng() % 2 ? -128 : 127)
                                     : blk.q[l];
            }
        }
    for (std::size_t n : { 1, 2, 3, 4, 5, 9, 17 }) {
        auto x = ref::random_matrix(n, K, rng, 0, 0, 1.0f);
        // Blocks of +-1 (q = +-127 after quantisation) with either sign.
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t k = 0; k < K; ++k)
                if ((k / 32 + i) % 2 == 0)
                    x.view(i, k) = (rng() % 2) ? 1.0f : -1.0f;
        const auto a = quantize(cmatrix_view<float>(x.view));
        const auto want = ref::linear_int8(w.view, x.view.data, n, x.view.stride);
        for (const auto& isa : list) {
            CAPTURE(isa.name);
            CAPTURE(n);
            auto y = ref::filled_matrix(n, O, 0);
            isa.q8.lin(w.view, a.v, 0, O, y.view);
            bool same = true;
            for (std::size_t i = 0; i < n; ++i)
                for (std::size_t o = 0; o < O; ++o)
                    same = same && same_float(y.view(i, o), want[i * O + o]);
            CHECK(same);
        }
    }
}

TEST_CASE_TEMPLATE("linear_q8act / swiglu_gate_up_q8act: any row count and position, every path, bit-identical "
                   "to the reference [kernels][qdot]",
    W, q8_t, q4_0_t, q4_k_t)
{
    // 130 rows quantised once; every n in a dense sample of 1..130 at the
    // first, a middle and the last position, split at an odd column: each
    // row must give the reference's bits (which depend on that row alone).
    const auto list = isas();
    std::mt19937 rng(13);
    constexpr bool k4 = std::is_same_v<W, q4_k_t>;
    const std::size_t K = k4 ? 512 : 295, O = 37, N = 130;
    const auto w = ref::random_weights<W>(O, K, rng, 1, 1);
    const auto up = ref::random_weights<W>(O, K, rng);
    auto x = ref::random_matrix(N, K, rng, 3, 1, 2.0f);
    for (std::size_t i = 0; i < N; i += 9) // some rows with the hard blocks
        add_extremes(x.view.sub_rows(i, 1), rng);
    const auto a = quantize(cmatrix_view<float>(x.view));
    const auto want = ref::linear_int8(w.view, x.view.data, N, x.view.stride);
    const auto wu = ref::linear_int8(up.view, x.view.data, N, x.view.stride);
    std::vector<std::size_t> ns;
    for (std::size_t n = 1; n <= 17; ++n)
        ns.push_back(n);
    for (std::size_t n : { 23u, 31u, 32u, 33u, 47u, 63u, 64u, 65u, 100u, 127u, 128u, 129u, 130u })
        ns.push_back(n);
    for (const auto& isa : list) {
        const auto& f = isa.get<W>();
        CAPTURE(isa.name);
        for (std::size_t n : ns)
            for (const std::size_t r0 : { std::size_t { 0 }, (N - n) / 2, N - n }) {
                CAPTURE(n);
                CAPTURE(r0);
                check_rows_bits(f, w.view, up.view, a.v, want, wu, r0, n, 2 * O / 3 + 1);
            }
    }
}

TEST_CASE_TEMPLATE("linear_q8act / swiglu_gate_up_q8act: rows longer than one panel segment, more rows than a "
                   "chunk, every path, bit-identical to the reference [kernels][qdot]",
    W, q8_t, q4_0_t, q4_k_t)
{
    // K > 32 * qpanel_max_blocks: the panels are packed a segment at a time
    // (the last one partial), once per chunk of qpanel_chunk_rows rows, and
    // the lane sums carry over; n spans two chunks and a partial third.
    const auto list = isas();
    std::mt19937 rng(29);
    constexpr bool k4 = std::is_same_v<W, q4_k_t>;
    const std::size_t K = k4 ? 32 * detail::qpanel_max_blocks + 2 * qk_k : 32 * detail::qpanel_max_blocks + 9 * 32 + 7;
    const std::size_t O = 21, N = 2 * detail::qpanel_chunk_rows + 5;
    const auto w = ref::random_weights<W>(O, K, rng, 1, 1);
    const auto up = ref::random_weights<W>(O, K, rng);
    const auto x = ref::random_matrix(N, K, rng, 3, 1, 2.0f);
    const auto a = quantize(cmatrix_view<float>(x.view));
    const auto want = ref::linear_int8(w.view, x.view.data, N, x.view.stride);
    const auto wu = ref::linear_int8(up.view, x.view.data, N, x.view.stride);
    for (const auto& isa : list) {
        const auto& f = isa.get<W>();
        CAPTURE(isa.name);
        for (const std::size_t n : { std::size_t { 5 }, std::size_t { 33 }, N }) {
            CAPTURE(n);
            check_rows_bits(f, w.view, up.view, a.v, want, wu, N - n, n, O / 2 + 1);
        }
    }
}

TEST_CASE_TEMPLATE("linear_q8act: weights wider than one cache-derived column block give the reference's bits "
                   "[kernels][qdot]",
    W, q8_t, q4_0_t, q4_k_t)
{
    // Long rows make the L2-sized column blocks a few columns wide: O spans
    // several blocks for linear and for gate/up (two rows per column).
    const std::size_t K = 16384;
    const std::size_t row_bytes = storage_cols<W>(K) * sizeof(typename W::storage);
    const std::size_t O = std::min<std::size_t>(2 * detail::qdot_block_cols(row_bytes, 1) + 5, 200);
    std::mt19937 rng(17);
    const auto w = ref::random_weights<W>(O, K, rng);
    const auto up = ref::random_weights<W>(O, K, rng);
    for (std::size_t n : { 5u, 9u }) {
        const auto x = ref::random_matrix(n, K, rng);
        const auto a = quantize(cmatrix_view<float>(x.view));
        const auto want = ref::linear_int8(w.view, x.view.data, n, x.view.stride);
        const auto wu = ref::linear_int8(up.view, x.view.data, n, x.view.stride);
        auto y = ref::filled_matrix(n, O), h = ref::filled_matrix(n, O);
        linear_q8act(w.view, a.v, 0, O, y.view);
        swiglu_gate_up_q8act(w.view, up.view, a.v, 0, O, h.view);
        CAPTURE(n);
        CAPTURE(O);
        bool same = true, hsame = true;
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t o = 0; o < O; ++o) {
                same = same && same_float(y.view(i, o), want[i * O + o]);
                hsame = hsame && same_float(h.view(i, o), simd::silu(want[i * O + o]) * wu[i * O + o]);
            }
        CHECK(same);
        CHECK(hsame);
    }
}

TEST_CASE_TEMPLATE("linear with act_mode::int8: every arch TU equals the reference at any row count [kernels][qdot]", W,
    q8_t, q4_0_t, q4_k_t)
{
    std::mt19937 rng(5);
    for (const auto* k : test::kernel_archs()) {
        const auto& f = k->get<W>();
        for (std::size_t n : { 1u, 2u, 3u, 4u, 5u, 8u, 13u, 64u, 65u }) {
            const std::size_t K = fit_cols<W>(std::is_same_v<W, q4_k_t> ? 512 : 320), O = 37;
            const auto w = ref::random_weights<W>(O, K, rng);
            const auto up = ref::random_weights<W>(O, K, rng);
            const auto x = ref::random_matrix(n, K, rng, 1, 1);
            auto y = ref::filled_matrix(n, O), h = ref::filled_matrix(n, O);
            f.linear_int8(w.view, cmatrix_view<float>(x.view), 0, O, y.view);
            f.gate_up_int8(w.view, up.view, cmatrix_view<float>(x.view), 0, O, h.view);
            const auto want = ref::linear_int8(w.view, x.view.data, n, x.view.stride);
            const auto wu = ref::linear_int8(up.view, x.view.data, n, x.view.stride);
            CAPTURE(k->name);
            CAPTURE(n);
            bool same = true, hsame = true;
            for (std::size_t i = 0; i < n; ++i)
                for (std::size_t o = 0; o < O; ++o) {
                    same = same && same_float(y.view(i, o), want[i * O + o]);
                    hsame = hsame && same_float(h.view(i, o), simd::silu(want[i * O + o]) * wu[i * O + o]);
                }
            CHECK(same);
            CHECK(hsame);
        }
    }
}

TEST_CASE_TEMPLATE("linear act_mode::int8: error vs the exact path within the quantisation bound [kernels][qdot]", W,
    q8_t, q4_0_t, q4_k_t)
{
    // |int8 - exact dot| <= sum_b (dx_b / 2) sum_l |w| (activation rounding,
    // plus 2^-17 dx for the rounding of x / d) + the f32 roundings of both
    // paths, gamma_{K/32 + 8} and gamma_K times the magnitudes they sum.
    std::mt19937 rng(3);
    for (std::size_t n = 1; n <= 4; ++n) {
        const std::size_t K = 1024, O = 64;
        const auto w = ref::random_weights<W>(O, K, rng);
        const auto x = ref::random_matrix(n, K, rng, 0, 0, 3.0f);
        auto yi = ref::filled_matrix(n, O), ye = ref::filled_matrix(n, O);
        linear(w.view, cmatrix_view<float>(x.view), 0, O, yi.view, act_mode::int8);
        linear(w.view, cmatrix_view<float>(x.view), 0, O, ye.view);
        const auto wf = ref::dequantize(w.view);
        const auto a = ref::quantize_act(x.view.data, n, K, x.view.stride);
        double worst = 0, rel_sum = 0;
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t o = 0; o < O; ++o) {
                double eq = 0, mag = 0;
                for (std::size_t k = 0; k < K; ++k) {
                    const double dx = a.d[i * a.blocks + k / 32];
                    eq += (dx / 2) * (1 + 0x1p-16) * std::fabs(wf[o * K + k]);
                    mag += std::fabs(wf[o * K + k]) * (std::fabs(x.view(i, k)) + dx);
                }
                const double bound = eq + (ref::gamma(K / 32 + 8) + ref::gamma(K)) * mag;
                const double err = std::fabs(double(yi.view(i, o)) - double(ye.view(i, o)));
                worst = std::max(worst, err / bound);
                rel_sum += err / std::max(1e-30, mag);
            }
        CAPTURE(n);
        CHECK(worst <= 1.0);
        CHECK(worst > 0.0); // int8 activations do change the result
    }
}

TEST_CASE("dense_linear act_mode::int8: 1 and 2 threads give identical bytes, several outputs, any row count "
          "[kernels][qdot][threads]")
{
    std::mt19937 rng(9);
    const std::size_t K = 2048, O = 3000, Ok = 200;
    const auto w = ref::random_weights<q4_0_t>(O, K, rng);
    const auto wk = ref::random_weights<q8_t>(Ok, K, rng);
    const auto wb = ref::random_weights<bf16_t>(Ok, K, rng);
    const any_weight_view wv = w.view, wkv = wk.view, wbv = wb.view;
    const std::vector<float> bias = test::random_floats(Ok, 3);
    for (std::size_t n : { 1u, 2u, 3u, 4u, 5u, 37u, 300u }) {
        CAPTURE(n);
        const auto x = ref::random_matrix(n, K, rng);
        std::vector<float> y1(n * O), y2(n * O);
        test::with_threads(1, [&] {
            dense_linear(wv, cmatrix_view<float>(x.view), matrix_view<float>(y1.data(), n, O), nullptr, act_mode::int8);
        });
        test::with_threads(2, [&] {
            dense_linear(wv, cmatrix_view<float>(x.view), matrix_view<float>(y2.data(), n, O), nullptr, act_mode::int8);
        });
        CHECK(test::same_bytes(y1, y2));
        const auto want = ref::linear_int8(w.view, x.view.data, n, x.view.stride);
        CHECK(test::same_bytes(y1, want));
        // Three outputs in one launch (q8 with a bias, bf16 exact): each as alone.
        std::vector<float> a(n * O), b(n * Ok), c(n * Ok), b1(n * Ok), c1(n * Ok);
        const dense_output outs[] = { { &wv, matrix_view<float>(a.data(), n, O) },
            { &wkv, matrix_view<float>(b.data(), n, Ok), bias.data() }, { &wbv, matrix_view<float>(c.data(), n, Ok) } };
        test::with_threads(2, [&] { dense_linear(cmatrix_view<float>(x.view), outs, act_mode::int8); });
        dense_linear(
            wkv, cmatrix_view<float>(x.view), matrix_view<float>(b1.data(), n, Ok), bias.data(), act_mode::int8);
        dense_linear(wbv, cmatrix_view<float>(x.view), matrix_view<float>(c1.data(), n, Ok));
        CHECK(test::same_bytes(a, y1));
        CHECK(test::same_bytes(b, b1));
        CHECK(test::same_bytes(c, c1));
        auto wantk = ref::linear_int8(wk.view, x.view.data, n, x.view.stride);
        for (std::size_t i = 0; i < n; ++i)
            for (std::size_t o = 0; o < Ok; ++o)
                wantk[i * Ok + o] += bias[o];
        CHECK(test::same_bytes(b, wantk));
        // A caller's workspace (at an odd address): the same bytes, with 2 threads.
        const std::size_t need = dense_workspace_bytes(n, K, act_mode::int8);
        CHECK((need > 0) == (n > gemv_max_rows));
        std::vector<std::byte> ws(need + 1, std::byte { 0xAB });
        std::vector<float> y3(n * O);
        test::with_threads(2, [&] {
            dense_linear(wv, cmatrix_view<float>(x.view), matrix_view<float>(y3.data(), n, O), nullptr, act_mode::int8,
                std::span<std::byte>(ws).subspan(1));
        });
        CHECK(test::same_bytes(y3, y1));
        if (need > 0)
            test::check_error(
                [&] {
                    dense_linear(wv, cmatrix_view<float>(x.view), matrix_view<float>(y3.data(), n, O), nullptr,
                        act_mode::int8, std::span<std::byte>(ws).first(need - 1));
                },
                { "kdial::dense_linear", "workspace of " + std::to_string(need - 1) + " bytes",
                    "needs " + std::to_string(need) });
    }
}
