// Routes one token through the installed headers and checks the result.
#include <kdial/kdial.hpp>

#include <array>
#include <cstdio>

int main()
{
    const std::array<float, 4> logits { 0.5f, 2.0f, -1.0f, 1.0f }; // [T=1, E=4]
    std::array<std::int32_t, 2> ids {};
    std::array<float, 2> weights {};
    kdial::route(kdial::cmatrix_view<float>(logits.data(), 1, 4), kdial::fixed_k<2> {}, kdial::router_options {},
        kdial::matrix_view<std::int32_t>(ids.data(), 1, 2), kdial::matrix_view<float>(weights.data(), 1, 2));
    std::printf("kdial %d.%d.%d: experts %d %d\n", KDIAL_VERSION_MAJOR, KDIAL_VERSION_MINOR, KDIAL_VERSION_PATCH,
        ids[0], ids[1]);
    return (ids[0] == 1 && ids[1] == 3) ? 0 : 1;
}
