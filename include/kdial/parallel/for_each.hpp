// Deterministic tiling over oneTBB.
// Work is split into tiles whose size comes from the problem shape, never
// from the thread count; each tile writes its own outputs, so the result is
// bit-identical whatever the number of threads or the schedule. The caller
// owns the tbb::task_arena (and so the thread count): these helpers run in
// whatever arena they are called from.
#pragma once

#include <algorithm>
#include <cstddef>

#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

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

// Calls f(begin, end) for the tiles [i*tile, min(n, (i+1)*tile)) of [0, n),
// in parallel. Tiles must write disjoint outputs.
template <class F> void for_each_tile(std::size_t n, std::size_t tile, F&& f)
{
    if (n == 0)
        return;
    tile = std::max<std::size_t>(1, tile);
    const std::size_t tiles = (n + tile - 1) / tile;
    if (tiles == 1) {
        f(std::size_t { 0 }, n);
        return;
    }
    tbb::parallel_for(
        tbb::blocked_range<std::size_t>(0, tiles, 1),
        [&](const tbb::blocked_range<std::size_t>& r) {
            for (std::size_t i = r.begin(); i != r.end(); ++i)
                f(i * tile, std::min(n, (i + 1) * tile));
        },
        tbb::simple_partitioner {});
}

// Calls f(i) for every i in [0, n) in parallel, one task per index
// (for coarse items such as one expert's tile list).
template <class F> void for_each_index(std::size_t n, F&& f)
{
    for_each_tile(n, 1, [&](std::size_t b, std::size_t e) {
        for (std::size_t i = b; i < e; ++i)
            f(i);
    });
}

} // namespace kdial::parallel
