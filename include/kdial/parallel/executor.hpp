// Executors: how kdial runs a list of independent tiles. An executor is any
// type with
//     void parallel_for(std::size_t n, kdial::parallel::tile_fn f) const;
// that calls f(i) exactly once for every i in [0, n), from any threads, in
// any order, and returns when all calls have returned. That is the whole
// contract (the `executor` concept): an engine hands its own thread pool by
// writing that one member. kdial never derives a tile from the thread count,
// and every tile writes its own outputs, so results are bit-identical for
// any executor and any number of threads. Tile functions do not throw.
// This header needs no threading library: serial_executor is here; the
// oneTBB executor (the default) is in for_each.hpp.
#pragma once

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <type_traits>

namespace kdial::parallel {

// A non-owning reference to a callable void(std::size_t) (a tile body).
// Cheap to copy; valid while the callable it refers to is alive.
class tile_fn {
public:
    template <class F>
    requires(!std::same_as<std::remove_cvref_t<F>, tile_fn> && std::invocable<const F&, std::size_t>)
        tile_fn(const F& f)
    noexcept // NOLINT: implicit on purpose
        : obj_(static_cast<const void*>(&f))
        , call_([](const void* o, std::size_t i) { (*static_cast<const F*>(o))(i); })
    {
    }
    void operator()(std::size_t i) const { call_(obj_, i); }

private:
    const void* obj_;
    void (*call_)(const void*, std::size_t);
};

// What kdial asks of an executor (see the header comment).
template <class E>
concept executor = requires(const E& e, std::size_t n, tile_fn f)
{
    e.parallel_for(n, f);
};

// Runs the tiles one after another on the calling thread.
struct serial_executor {
    void parallel_for(std::size_t n, tile_fn f) const
    {
        for (std::size_t i = 0; i < n; ++i)
            f(i);
    }
};

// A type-erased reference to any executor, so the layer's code is compiled
// once, not once per executor type. Refers to the executor it was made
// from: pass it down a call, do not store it past the executor's life.
class executor_ref {
public:
    template <executor E>
    requires(!std::same_as<std::remove_cvref_t<E>, executor_ref>) executor_ref(const E& e)
    noexcept // NOLINT: implicit on purpose
        : obj_(static_cast<const void*>(&e))
        , run_([](const void* o, std::size_t n, tile_fn f) { static_cast<const E*>(o)->parallel_for(n, f); })
    {
    }
    void parallel_for(std::size_t n, tile_fn f) const
    {
        if (n == 1)
            f(0);
        else if (n > 1)
            run_(obj_, n, f);
    }

private:
    const void* obj_;
    void (*run_)(const void*, std::size_t, tile_fn);
};
static_assert(executor<serial_executor> && executor<executor_ref>);

// Calls f(begin, end) for the tiles [i*tile, min(n, (i+1)*tile)) of [0, n)
// on the executor. Tiles must write disjoint outputs.
template <class F> void for_each_tile(executor_ref ex, std::size_t n, std::size_t tile, const F& f)
{
    if (n == 0)
        return;
    tile = std::max<std::size_t>(1, tile);
    const std::size_t tiles = (n + tile - 1) / tile;
    const auto body = [&](std::size_t i) { f(i * tile, std::min(n, (i + 1) * tile)); };
    ex.parallel_for(tiles, body);
}

} // namespace kdial::parallel

namespace kdial {
using parallel::executor_ref;
using parallel::serial_executor;
} // namespace kdial
