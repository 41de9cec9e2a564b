// Errors at the edge, asserts inside.
// Public entry points validate their input and throw kdial::error with a
// message that names the problem (tensor, field, value) before they write
// anything the caller owns. Inner kernels use KDIAL_ASSERT, which compiles
// out unless KDIAL_ENABLE_ASSERTS is defined (or NDEBUG is not).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace kdial {

// The one exception type kdial throws for bad input.
class error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

namespace detail {

// Concatenates streamable values into one message.
template <class... Args> std::string cat(Args&&... args)
{
    std::ostringstream os;
    (os << ... << std::forward<Args>(args));
    return os.str();
}

// Throws kdial::error with the concatenated message unless `ok`.
template <class... Args> inline void check(bool ok, Args&&... args)
{
    if (!ok) [[unlikely]]
        throw error(cat(std::forward<Args>(args)...));
}

[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line) noexcept
{
    std::fprintf(stderr, "kdial: internal assertion failed: %s (%s:%d)\n", expr, file, line);
    std::abort();
}

} // namespace detail
} // namespace kdial

#if defined(KDIAL_ENABLE_ASSERTS) || !defined(NDEBUG)
#define KDIAL_ASSERT(cond) ((cond) ? void(0) : ::kdial::detail::assert_fail(#cond, __FILE__, __LINE__))
#else
#define KDIAL_ASSERT(cond) void(0)
#endif
