// Integer parsing for the olmoe command line and its input files: one
// strtol wrapper, so each caller only words its own error.
#pragma once

#include <cerrno>
#include <cstdlib>
#include <optional>
#include <string>

namespace olmoe {

// The base-10 integer s, or nothing if s is empty, has trailing characters
// or is out of range for long (strtol's rules: leading spaces and a sign
// are accepted).
inline std::optional<long> parse_long(const std::string& s)
{
    char* end = nullptr;
    errno = 0;
    const long x = std::strtol(s.c_str(), &end, 10);
    if (s.empty() || *end || errno)
        return std::nullopt;
    return x;
}

} // namespace olmoe
