// No allocation per call: this translation unit replaces the global
// operator new (for the whole test program) with one that counts while
// counting is on, and checks that moe::forward — and the stages one by
// one — allocate nothing once the workspace exists, on the oneTBB and the
// serial executors, for every routing policy.
#include "layer/fixture.hpp"

#include <atomic>
#include <cstdlib>
#include <new>

namespace {
std::atomic<bool> counting { false };
std::atomic<long> allocations { 0 };

void* counted_alloc(std::size_t n, std::size_t align)
{
    if (counting.load(std::memory_order_relaxed))
        allocations.fetch_add(1, std::memory_order_relaxed);
    if (n == 0)
        n = 1;
    void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align)
                                                : std::malloc(n);
    if (!p)
        throw std::bad_alloc();
    return p;
}
} // namespace

void* operator new(std::size_t n)
{
    return counted_alloc(n, 0);
}
void* operator new[](std::size_t n)
{
    return counted_alloc(n, 0);
}
void* operator new(std::size_t n, std::align_val_t a)
{
    return counted_alloc(n, std::size_t(a));
}
void* operator new[](std::size_t n, std::align_val_t a)
{
    return counted_alloc(n, std::size_t(a));
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept
{
    try {
        return counted_alloc(n, 0);
    } catch (...) {
        return nullptr;
    }
}
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept
{
    try {
        return counted_alloc(n, 0);
    } catch (...) {
        return nullptr;
    }
}
void operator delete(void* p) noexcept
{
    std::free(p);
}
void operator delete[](void* p) noexcept
{
    std::free(p);
}
void operator delete(void* p, std::size_t) noexcept
{
    std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept
{
    std::free(p);
}
void operator delete(void* p, std::align_val_t) noexcept
{
    std::free(p);
}
void operator delete[](void* p, std::align_val_t) noexcept
{
    std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept
{
    std::free(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept
{
    std::free(p);
}

using namespace kdial;
using kdial::test::layer_fixture;

namespace {
// Allocations made by f (on any thread) while counting.
template <class F> long count_allocations(F&& f)
{
    allocations = 0;
    counting = true;
    f();
    counting = false;
    return allocations.load();
}
} // namespace

TEST_CASE("moe: forward and the stages allocate nothing, on oneTBB and serial executors [layer][alloc]")
{
    const std::size_t d = 64, F = 48, Fs = 32, T = 40;
    layer_fixture<bf16_t> fx(d, F, 8, 301, Fs);
    const auto w = fx.make();
    moe_workspace ws(w.shape(T, 4));
    const auto X = test::random_floats(T * d, 302);
    std::vector<float> out(T * d);
    const cmatrix_view<float> xv(X.data(), T, d);
    const matrix_view<float> ov(out.data(), T, d);
    const std::vector<int> ks(T, 3);
    const std::vector<token_k> rules(T, token_k { 1, 4, 0.5f });
    std::vector<std::int32_t> ids(T * 2, 1);
    std::vector<float> wts(T * 2, 0.5f);
    const given_routing given { cmatrix_view<std::int32_t>(ids.data(), T, 2), cmatrix_view<float>(wts.data(), T, 2) };
    auto all = [&](executor_ref ex) {
        moe::forward(w, ws, xv, fixed_k<2> {}, ov, combine_mode::overwrite, ex);
        moe::forward(w, ws, xv, 4, ov, combine_mode::accumulate, ex);
        moe::forward(w, ws, xv, per_token_k { ks }, ov, combine_mode::overwrite, ex);
        moe::forward(w, ws, xv, per_token_rules { rules }, ov, combine_mode::overwrite, ex);
        moe::forward(w, ws, xv, threshold_options { 0.5f, 1, 4 }, ov, combine_mode::overwrite, ex);
        moe::forward(w, ws, xv, given, ov, combine_mode::overwrite, ex);
        moe::forward(w, ws, xv.sub_rows(0, 1), 2, ov.sub_rows(0, 1), combine_mode::overwrite, ex); // decode
        moe::route(w, ws, xv, dynamic_k { 3 }, ex);
        moe::dispatch(w, ws, xv, ex);
        moe::run_experts(w, ws, xv, ex);
        moe::combine(w, ws, ov, combine_mode::overwrite, ex);
    };
    for (int threads : { 1, 2 }) {
        test::with_threads(threads, [&] {
            all(tbb_executor {}); // warm up: the arena's workers start
            CHECK(count_allocations([&] { all(tbb_executor {}); }) == 0);
        });
    }
    all(serial_executor {});
    CHECK(count_allocations([&] { all(serial_executor {}); }) == 0);
    // The counter counts: making a workspace allocates.
    CHECK(count_allocations([&] { moe_workspace other(w.shape(T, 4)); }) > 0);
}
