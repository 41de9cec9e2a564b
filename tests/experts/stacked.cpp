// Stacked expert tensors: gate / up [E, F, d] and down [E, d, F], and fused
// gate+up [E, 2F, d], with padded row and expert strides, bound without
// copying a weight, give the layer the bits of the per-expert list; bad
// stacked shapes throw.
#include "layer/fixture.hpp"

#include <cstring>
#include <vector>

using namespace kdial;
using kdial::test::layer_fixture;
using kdial::test::run;

namespace {

// Copies matrices [rows, cols] of format W into one stacked buffer: matrix
// m at m * expert_stride + its `first_row`, rows row_stride apart.
template <weight_type W>
void put(std::vector<typename W::storage>& buf, const weight_view<W>& m, std::size_t at, std::size_t row_stride)
{
    const std::size_t n = storage_cols<W>(m.cols);
    for (std::size_t r = 0; r < m.rows; ++r)
        std::memcpy(buf.data() + at + r * row_stride, m.row(r), n * sizeof(typename W::storage));
}

} // namespace

TEST_CASE_TEMPLATE(
    "expert_set::stacked and stacked_fused equal the per-expert list [experts][stacked]", W, f32_t, bf16_t, q8_t)
{
    using S = typename W::storage;
    const std::size_t d = 45, F = 38, T = 23;
    const int E = 6;
    layer_fixture<W> fx(d, F, E, 401);
    const std::size_t rd = storage_cols<W>(d) + 1, rf = storage_cols<W>(F) + 2; // padded rows
    const std::size_t es_g = F * rd + 3, es_d = d * rf + 5; // padded experts
    std::vector<S> gate(E * es_g), up(E * es_g), down(E * es_d), fused(E * (2 * F * rd + 7));
    const std::size_t es_f = 2 * F * rd + 7;
    for (std::size_t e = 0; e < std::size_t(E); ++e) {
        put(gate, fx.gate[e].view, e * es_g, rd);
        put(up, fx.up[e].view, e * es_g, rd);
        put(down, fx.down[e].view, e * es_d, rf);
        put(fused, fx.gate[e].view, e * es_f, rd);
        put(fused, fx.up[e].view, e * es_f + F * rd, rd);
    }
    const cmatrix_view<float> router(fx.router.data(), std::size_t(E), d);
    const moe_weights list = fx.make();
    const moe_weights stacked(router,
        expert_set::stacked(std::size_t(E), stacked_weight<W> { gate.data(), F, d, rd, es_g },
            stacked_weight<W> { up.data(), F, d, rd, es_g }, stacked_weight<W> { down.data(), d, F, rf, es_d }));
    const moe_weights fused_w(router,
        expert_set::stacked_fused(std::size_t(E), stacked_weight<W> { fused.data(), 2 * F, d, rd, es_f },
            stacked_weight<W> { down.data(), d, F, rf, es_d }));
    CHECK(stacked.experts().type() == W::id);
    moe_workspace ws(list.shape(T, 3));
    for (std::size_t t : { std::size_t(1), std::size_t(3), T }) {
        const auto X = test::random_floats(t * d, 402 + t);
        for (int k : { 1, 3 }) {
            const auto want = run(list, ws, X, t, k);
            CHECK(test::same_bytes(run(stacked, ws, X, t, k), want));
            CHECK(test::same_bytes(run(fused_w, ws, X, t, k), want));
        }
    }
    // The views point into the stacked buffers (no copy).
    stacked.experts().visit([&](const auto& v) {
        if constexpr (std::is_same_v<std::decay_t<decltype(v[0].gate)>, weight_view<W>>) {
            CHECK(v[2].gate.data == gate.data() + 2 * es_g);
            CHECK(v[2].down.row(1) == down.data() + 2 * es_d + rf);
        }
    });
    fused_w.experts().visit([&](const auto& v) {
        if constexpr (std::is_same_v<std::decay_t<decltype(v[0].up)>, weight_view<W>>)
            CHECK(v[1].up.data == fused.data() + es_f + F * rd);
    });
    // Dense defaults: strides 0 mean packed.
    CHECK(stacked_weight<W> { gate.data(), F, d }.expert(1).data == gate.data() + F * storage_cols<W>(d));
    CHECK_THROWS_WITH_AS(expert_set::stacked_fused(std::size_t(E), stacked_weight<W> { fused.data(), 2 * F + 1, d },
                             stacked_weight<W> { down.data(), d, F }),
        "kdial::expert_set::stacked_fused: gate_up has 77 rows per expert, expected 2F (an even number)", kdial::error);
    CHECK_THROWS_WITH_AS(expert_set::stacked(std::size_t(E), stacked_weight<W> { gate.data(), F, d },
                             stacked_weight<W> { up.data(), F, d }, stacked_weight<W> { down.data(), d + 1, F }),
        doctest::Contains("down_proj"), kdial::error);
}
