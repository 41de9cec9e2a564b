// The data cache sizes of the CPU the program runs on, read once at run
// time, for the kernels' blocking (kernels/gemm.hpp, kernels/rows.hpp): block
// sizes follow the machine instead of constants tuned on one CPU (an
// activation block sized for a 2 MiB L2 is twice a Zen 3 core's 512 KiB).
// Sources, in order: sysconf(_SC_LEVEL{1,2,3}_..._SIZE) (glibc, x86), then
// /sys/devices/system/cpu/cpu0/cache/index*/{level,type,size} (Linux, also
// aarch64, where glibc's sysconf often answers 0), then the fallback
// constants below (a modest x86 core: 32 KiB / 512 KiB / 8 MiB). Blocking
// derived from these never changes a result: every kernel that uses it
// keeps each output's FMA chain whole whatever the block sizes.
#pragma once

#include <cstddef>
#include <cstdio>
#include <cstdlib>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace kdial {

struct cache_sizes {
    std::size_t l1d = 0; // bytes of level-1 data cache (one core)
    std::size_t l2 = 0; // bytes of level-2 cache (one core's share, as reported)
    std::size_t l3 = 0; // bytes of level-3 cache (0: none reported)
};

namespace detail {

inline constexpr cache_sizes fallback_caches { std::size_t { 32 } << 10, std::size_t { 512 } << 10,
    std::size_t { 8 } << 20 };

// "48K", "1024K", "32M" or a plain number -> bytes; 0 if unreadable.
inline std::size_t parse_cache_size(const char* s) noexcept
{
    char* end = nullptr;
    const unsigned long long v = std::strtoull(s, &end, 10);
    if (end == s)
        return 0;
    const char u = *end;
    const std::size_t m = u == 'K' || u == 'k' ? 1024
        : u == 'M' || u == 'm'                 ? std::size_t { 1 } << 20
        : u == 'G' || u == 'g'                 ? std::size_t { 1 } << 30
                                               : 1;
    return static_cast<std::size_t>(v) * m;
}

// The first line of a small text file, or false.
inline bool read_line(const char* path, char* buf, int n) noexcept
{
    std::FILE* f = std::fopen(path, "r");
    if (f == nullptr)
        return false;
    const bool ok = std::fgets(buf, n, f) != nullptr;
    std::fclose(f);
    return ok;
}

// Sizes from /sys/devices/system/cpu/cpu0/cache/index*/ (data and unified
// caches only); fields it cannot find stay 0.
inline cache_sizes sysfs_caches() noexcept
{
    cache_sizes c;
    for (int i = 0; i < 8; ++i) {
        char path[96], buf[64];
        const auto field = [&](const char* name) {
            std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/%s", i, name);
            return read_line(path, buf, sizeof buf);
        };
        if (!field("level"))
            continue;
        const int level = std::atoi(buf);
        if (!field("type") || buf[0] == 'I') // Instruction
            continue;
        if (!field("size"))
            continue;
        const std::size_t bytes = parse_cache_size(buf);
        if (level == 1)
            c.l1d = bytes;
        else if (level == 2)
            c.l2 = bytes;
        else if (level == 3)
            c.l3 = bytes;
    }
    return c;
}

inline cache_sizes read_cache_sizes() noexcept
{
    cache_sizes c;
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE) && defined(_SC_LEVEL3_CACHE_SIZE)
    const auto sc = [](int name) {
        const long v = ::sysconf(name);
        return v > 0 ? static_cast<std::size_t>(v) : std::size_t { 0 };
    };
    c = { sc(_SC_LEVEL1_DCACHE_SIZE), sc(_SC_LEVEL2_CACHE_SIZE), sc(_SC_LEVEL3_CACHE_SIZE) };
#endif
    if (c.l1d == 0 || c.l2 == 0) {
        const cache_sizes s = sysfs_caches();
        c.l1d = c.l1d ? c.l1d : s.l1d;
        c.l2 = c.l2 ? c.l2 : s.l2;
        c.l3 = c.l3 ? c.l3 : s.l3;
    }
    // Implausible answers (a virtual machine reporting 0 or a few bytes)
    // fall back to the constants.
    if (c.l1d < (std::size_t { 4 } << 10))
        c.l1d = fallback_caches.l1d;
    if (c.l2 < c.l1d)
        c.l2 = fallback_caches.l2;
    return c;
}

} // namespace detail

// This CPU's cache sizes (read on the first call, then cached; thread-safe).
inline const cache_sizes& cpu_caches() noexcept
{
    static const cache_sizes c = detail::read_cache_sizes();
    return c;
}

} // namespace kdial
