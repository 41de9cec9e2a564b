// Executors: every index runs exactly once on the oneTBB, serial and a
// user-written executor; tiles cover [0, n) with the problem's tile size
// whatever the executor; the concept rejects what is not an executor.
#include <doctest/doctest.h>
#include <kdial/parallel/for_each.hpp>

#include "test_util.hpp"

#include <atomic>
#include <thread>
#include <vector>

using namespace kdial;

namespace {
// Runs the indices in reverse on the calling thread (an order no other
// executor uses), counting its calls.
struct reverse_executor {
    int* calls;
    void parallel_for(std::size_t n, parallel::tile_fn f) const
    {
        ++*calls;
        for (std::size_t i = n; i-- > 0;)
            f(i);
    }
};
struct not_an_executor {
    void parallel_for(std::size_t) const { }
};
static_assert(parallel::executor<reverse_executor>);
static_assert(parallel::executor<tbb_executor> && parallel::executor<serial_executor>);
static_assert(!parallel::executor<not_an_executor> && !parallel::executor<int>);
} // namespace

TEST_CASE("executors: every tile exactly once, tiles from the problem only [parallel][executor]")
{
    int calls = 0;
    const reverse_executor rev { &calls };
    for (std::size_t n : { std::size_t(0), std::size_t(1), std::size_t(7), std::size_t(1000) })
        for (std::size_t tile : { std::size_t(1), std::size_t(3), std::size_t(64) }) {
            auto cover = [&](executor_ref ex) {
                std::vector<std::atomic<int>> hits(n);
                std::vector<std::size_t> begins(n, std::size_t(-1));
                parallel::for_each_tile(ex, n, tile, [&](std::size_t b, std::size_t e) {
                    begins[b] = e;
                    for (std::size_t i = b; i < e; ++i)
                        hits[i].fetch_add(1);
                });
                for (std::size_t i = 0; i < n; ++i)
                    REQUIRE(hits[i].load() == 1);
                return begins;
            };
            const auto want = cover(serial_executor {});
            for (std::size_t b = 0; b < n; b += tile)
                REQUIRE(want[b] == std::min(n, b + tile));
            CHECK(cover(rev) == want);
            std::vector<std::size_t> one, two;
            test::with_threads(1, [&] { one = cover(tbb_executor {}); });
            test::with_threads(2, [&] { two = cover(tbb_executor {}); });
            CHECK(one == want);
            CHECK(two == want);
        }
    // One tile runs inline; none runs nothing.
    calls = 0;
    executor_ref(rev).parallel_for(1, [](std::size_t) {});
    executor_ref(rev).parallel_for(0, [](std::size_t) {});
    CHECK(calls == 0);
    executor_ref(rev).parallel_for(2, [](std::size_t) {});
    CHECK(calls == 1);
}
