// kdial_npy_compare GOT.npy WANT.npy ATOL [--any-argmax]: compares two
// float32 [T, V] .npy arrays; passes (exit 0) when max |got - want| <= ATOL
// and the argmax of every row agrees (unless --any-argmax). Prints the worst
// element either way.
#include <kdial/io/npy.hpp>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char** argv)
{
    const bool any_argmax = argc == 5 && std::string(argv[4]) == "--any-argmax";
    if (argc != 4 && !any_argmax) {
        std::fprintf(stderr, "usage: kdial_npy_compare GOT.npy WANT.npy ATOL [--any-argmax]\n");
        return 2;
    }
    try {
        const auto got = kdial::io::read_npy(argv[1]);
        const auto want = kdial::io::read_npy(argv[2]);
        const double atol = std::atof(argv[3]);
        if (got.shape != want.shape) {
            std::fprintf(
                stderr, "shape mismatch: [%zu, %zu] vs [%zu, %zu]\n", got.rows(), got.cols(), want.rows(), want.cols());
            return 1;
        }
        double worst = 0;
        std::size_t wr = 0, wc = 0, argmax_diff = 0;
        for (std::size_t r = 0; r < got.rows(); ++r) {
            std::size_t ag = 0, aw = 0;
            for (std::size_t c = 0; c < got.cols(); ++c) {
                const float g = got.data[r * got.cols() + c], w = want.data[r * got.cols() + c];
                const double d = std::fabs(double(g) - double(w));
                if (!(d <= worst)) { // NaN counts as worst
                    worst = std::isnan(d) ? INFINITY : d;
                    wr = r;
                    wc = c;
                }
                if (g > got.data[r * got.cols() + ag])
                    ag = c;
                if (w > want.data[r * got.cols() + aw])
                    aw = c;
            }
            argmax_diff += ag != aw;
        }
        std::printf("max |diff| = %.3g at [%zu, %zu] (atol %.3g); argmax differs at %zu of %zu positions\n", worst, wr,
            wc, atol, argmax_diff, got.rows());
        return worst <= atol && (any_argmax || argmax_diff == 0) ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "kdial_npy_compare: %s\n", e.what());
        return 1;
    }
}
