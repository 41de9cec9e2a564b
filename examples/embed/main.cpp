// embed: kdial inside a foreign engine (engine.hpp). Two request streams run
// concurrently on one set of stacked weights through the engine's own
// thread pool, adding the MoE output into their residuals; then the same
// streams run one after the other, and on the per-expert-list layer with
// oneTBB. Prints the checks and exits non-zero unless all give the same bits.
#include "engine.hpp"

#include <cstdio>
#include <cstring>
#include <thread>

int main()
{
    try {
        const embed::layer_buffers buf(16, 128, 96, 7);
        const kdial::moe_weights w = buf.stacked(); // one set of weights for every stream
        embed::thread_pool pool(3);

        embed::stream a1(w, 5, 1), b1(w, 12, 2); // concurrently
        std::thread ta([&] { a1.run(w, 8, pool); }), tb([&] { b1.run(w, 8, pool); });
        ta.join();
        tb.join();

        embed::stream a2(w, 5, 1), b2(w, 12, 2); // one after the other
        a2.run(w, 8, pool);
        b2.run(w, 8, pool);

        const kdial::moe_weights list = buf.per_expert(); // the per-expert layer on oneTBB
        embed::stream a3(list, 5, 1), b3(list, 12, 2);
        a3.run(list, 8, kdial::tbb_executor {});
        b3.run(list, 8, kdial::tbb_executor {});

        auto same = [](const std::vector<float>& x, const std::vector<float>& y) {
            return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
        };
        const bool concurrent = same(a1.residual, a2.residual) && same(b1.residual, b2.residual);
        const bool layer = same(a2.residual, a3.residual) && same(b2.residual, b3.residual);
        std::printf("stream a: T=%zu, residual[0..3] = %.6f %.6f %.6f\n", a1.T, double(a1.residual[0]),
            double(a1.residual[1]), double(a1.residual[2]));
        std::printf("stream b: T=%zu, residual[0..3] = %.6f %.6f %.6f\n", b1.T, double(b1.residual[0]),
            double(b1.residual[1]), double(b1.residual[2]));
        std::printf("concurrent streams == one after the other: %s\n", concurrent ? "yes" : "NO");
        std::printf("engine pool + stacked weights == per-expert layer on oneTBB: %s\n", layer ? "yes" : "NO");
        return concurrent && layer ? 0 : 1;
    } catch (const kdial::error& e) {
        std::fprintf(stderr, "embed: %s\n", e.what());
        return 1;
    }
}
