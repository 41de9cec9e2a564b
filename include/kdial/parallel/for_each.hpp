// Deterministic tiling over oneTBB: the default executor, and the
// thread-count-free tiling helpers the kernels use.
// Work is split into tiles whose size comes from the problem shape, never
// from the thread count; each tile writes its own outputs, so the result is
// bit-identical whatever the number of threads or the schedule. The caller
// owns the tbb::task_arena (and so the thread count): tbb_executor runs in
// whatever arena it is called from. This is the only header that names
// oneTBB; executor.hpp has the executor concept and the serial executor.
#pragma once

#include <algorithm>
#include <cstddef>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

#include "executor.hpp"

namespace kdial::parallel {

// Default amount of work per tile (in caller-defined units, e.g. bytes or
// multiply-adds): about 64K, large enough to amortise TBB's ~1 us task
// overhead and small enough to balance two to sixteen cores.
inline constexpr std::size_t default_tile_work = std::size_t { 1 } << 16;

// Items per tile so that a tile does about `target` work when one item costs
// `item_work`. Depends only on the problem, never on the thread count.
constexpr std::size_t tile_items(std::size_t item_work, std::size_t target = default_tile_work) noexcept
{
    return std::max<std::size_t>(1, target / std::max<std::size_t>(1, item_work));
}

// oneTBB: one task per tile (simple_partitioner), in the caller's arena.
struct tbb_executor {
    void parallel_for(std::size_t n, tile_fn f) const
    {
        tbb::parallel_for(
            tbb::blocked_range<std::size_t>(0, n, 1),
            [f](const tbb::blocked_range<std::size_t>& r) {
                for (std::size_t i = r.begin(); i != r.end(); ++i)
                    f(i);
            },
            tbb::simple_partitioner {});
    }
};
static_assert(executor<tbb_executor>);

// The executor entry points use when the caller names none.
using default_executor = tbb_executor;

// Calls f(begin, end) for the tiles [i*tile, min(n, (i+1)*tile)) of [0, n),
// in parallel on the default executor. Tiles must write disjoint outputs.
template <class F> void for_each_tile(std::size_t n, std::size_t tile, F&& f)
{
    for_each_tile(executor_ref(default_executor {}), n, tile, f);
}

// Calls f(i) for every i in [0, n) in parallel, one task per index
// (for coarse items such as one expert's tile list).
template <class F> void for_each_index(std::size_t n, F&& f)
{
    executor_ref(default_executor {}).parallel_for(n, f);
}

} // namespace kdial::parallel

namespace kdial {
using parallel::default_executor;
using parallel::tbb_executor;
} // namespace kdial
