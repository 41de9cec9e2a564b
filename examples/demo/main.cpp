// kdial_demo: routes, dispatches and combines a random batch at several k
// and prints what happened (expert load, weight mass, and a check that
// combine with identity experts reproduces sum_j w[t,j] * x[t]).
// Usage: kdial_demo [--tokens T] [--experts E] [--hidden d] [--seed S]
#include <kdial/kdial.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

void usage(std::FILE* f)
{
    std::fputs("usage: kdial_demo [--tokens T] [--experts E] [--hidden d] [--seed S]\n"
               "Routes a random batch of T tokens over E experts at k = 1, 2, 4, 8 and E,\n"
               "dispatches it, combines identity-expert outputs and reports the expert load.\n",
        f);
}

long parse_positive(const char* flag, const char* v)
{
    char* end = nullptr;
    const long x = std::strtol(v, &end, 10);
    if (!*v || *end || x < 1 || x > 1'000'000) {
        std::fprintf(stderr, "kdial_demo: %s expects a positive integer, got '%s'\n", flag, v);
        std::exit(2);
    }
    return x;
}

} // namespace

int main(int argc, char** argv)
{
    std::size_t T = 512, d = 256;
    int E = 64;
    unsigned seed = 1;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--help" || a == "-h") {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "kdial_demo: unknown or incomplete option '%s'\n", a.c_str());
            usage(stderr);
            return 2;
        }
        const char* v = argv[++i];
        if (a == "--tokens")
            T = std::size_t(parse_positive("--tokens", v));
        else if (a == "--experts")
            E = int(parse_positive("--experts", v));
        else if (a == "--hidden")
            d = std::size_t(parse_positive("--hidden", v));
        else if (a == "--seed")
            seed = unsigned(parse_positive("--seed", v));
        else {
            std::fprintf(stderr, "kdial_demo: unknown option '%s'\n", a.c_str());
            usage(stderr);
            return 2;
        }
    }
    try {
        std::mt19937 rng(seed);
        std::normal_distribution<float> g(0.0f, 1.0f);
        std::vector<float> logits(T * E), x(T * d);
        for (auto& v : logits)
            v = 2.0f * g(rng);
        for (auto& v : x)
            v = g(rng);
        std::printf("kdial %d.%d.%d demo: T = %zu tokens, E = %d experts, d = %zu\n", KDIAL_VERSION_MAJOR,
            KDIAL_VERSION_MINOR, KDIAL_VERSION_PATCH, T, E, d);
        std::printf("%4s %12s %12s %12s %14s %12s\n", "k", "slots", "max load", "idle exp.", "mean sum w", "max |err|");
        kdial::dispatch_plan plan(T, E, E);
        std::vector<std::int32_t> ids(T * E);
        std::vector<float> w(T * E), xs(T * E * d), out(T * d);
        for (int k : { 1, 2, 4, 8, E }) {
            if (k > E)
                continue;
            const auto t0 = std::chrono::steady_clock::now();
            kdial::with_k(k, [&](auto kk) {
                kdial::route(kdial::cmatrix_view<float>(logits.data(), T, E), kk, kdial::router_options {},
                    kdial::matrix_view<std::int32_t>(ids.data(), T, k), kdial::matrix_view<float>(w.data(), T, k));
            });
            plan.build(kdial::cmatrix_view<std::int32_t>(ids.data(), T, k));
            kdial::gather(
                plan, kdial::cmatrix_view<float>(x.data(), T, d), kdial::matrix_view<float>(xs.data(), T * k, d));
            kdial::combine(plan, kdial::cmatrix_view<float>(w.data(), T, k),
                kdial::cmatrix_view<float>(xs.data(), T * k, d), kdial::matrix_view<float>(out.data(), T, d));
            const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            const auto counts = plan.counts();
            const int max_load = *std::max_element(counts.begin(), counts.end());
            const long idle = std::count(counts.begin(), counts.end(), 0);
            double mass = 0, err = 0;
            for (std::size_t t = 0; t < T; ++t) {
                float s = 0;
                for (int j = 0; j < k; ++j)
                    s += w[t * k + j];
                mass += s;
                for (std::size_t i = 0; i < d; ++i)
                    err = std::max(err, double(std::abs(out[t * d + i] - s * x[t * d + i])));
            }
            std::printf("%4d %12zu %12d %12ld %14.4f %12.2e   (%.2f ms)\n", k, plan.num_slots(), max_load, idle,
                mass / double(T), err, ms);
        }
        std::puts("max |err| compares combine(identity experts) with (sum_j w[t,j]) * x[t]; it is rounding only.");
    } catch (const kdial::error& e) {
        std::fprintf(stderr, "kdial_demo: %s\n", e.what());
        return 1;
    }
    return 0;
}
