// The Eigen adaptor (built when Eigen is found): row-major Eigen matrices,
// maps and blocks go straight into moe::forward and the stages and give
// the bits of the kdial-view calls; views see Eigen's strides.
#include "layer/fixture.hpp"

#if KDIAL_TEST_EIGEN
#include <kdial/interop/eigen.hpp>

using namespace kdial;
using kdial::test::layer_fixture;
using kdial::test::run;

TEST_CASE("eigen: row-major Matrix, Map and blocks into moe::forward and the stages [interop][eigen]")
{
    const std::size_t d = 40, F = 32, T = 11;
    layer_fixture<bf16_t> fx(d, F, 8, 501, 16);
    const auto w = fx.make();
    moe_workspace ws(w.shape(T, 3));
    const auto X = test::random_floats(T * d, 502);
    const auto want = run(w, ws, X, T, 3);

    Eigen::Map<const eigen::row_matrix> xm(X.data(), Eigen::Index(T), Eigen::Index(d));
    eigen::row_matrix out(T, d);
    moe::forward(w, ws, xm, 3, out);
    CHECK(std::memcmp(out.data(), want.data(), want.size() * sizeof(float)) == 0);

    // Accumulate into a block of a wider residual (outer stride d + 5).
    eigen::row_matrix residual = eigen::row_matrix::Ones(Eigen::Index(T), Eigen::Index(d + 5));
    moe::forward(w, ws, xm, dynamic_k { 3 }, residual.leftCols(Eigen::Index(d)), combine_mode::accumulate);
    const auto v = eigen::view(residual.leftCols(Eigen::Index(d)));
    CHECK(v.stride == d + 5);
    for (std::size_t t = 0; t < T; ++t)
        for (std::size_t i = 0; i < d; ++i)
            REQUIRE(residual(Eigen::Index(t), Eigen::Index(i)) == 1.0f + want[t * d + i]);

    // The stages with Eigen arguments.
    eigen::row_matrix xcopy = xm;
    moe::route(w, ws, xcopy, fixed_k<3> {});
    moe::dispatch(w, ws, xcopy);
    moe::run_experts(w, ws, xcopy);
    eigen::row_matrix out2(T, d);
    moe::combine(w, ws, out2);
    CHECK(std::memcmp(out2.data(), want.data(), want.size() * sizeof(float)) == 0);
}
#endif
