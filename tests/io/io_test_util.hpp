// Helpers for the io tests: a temporary directory removed on scope exit,
// writing raw bytes, and checking that a call throws kdial::error with a
// message containing given pieces (file name, tensor, value).
#pragma once

#include <doctest/doctest.h>
#include <kdial/core/error.hpp>

#include <stdlib.h>

#include <cstddef>
#include <filesystem>
#include <iterator>
#include <fstream>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>

namespace kdial::test {

struct temp_dir {
    std::filesystem::path path;
    temp_dir()
    {
        char tmpl[] = "/tmp/kdial-io-test-XXXXXX";
        const char* p = ::mkdtemp(tmpl);
        REQUIRE(p != nullptr);
        path = p;
    }
    ~temp_dir()
    {
        std::error_code ec;
        std::filesystem::remove_all(path, ec);
    }
    temp_dir(const temp_dir&) = delete;
    temp_dir& operator=(const temp_dir&) = delete;
    std::filesystem::path operator/(std::string_view name) const { return path / name; }
};

// The whole content of a file ("" when it cannot be read).
inline std::string slurp(const std::filesystem::path& p)
{
    std::ifstream in(p, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

inline void write_file(const std::filesystem::path& p, std::span<const std::byte> bytes)
{
    std::ofstream out(p, std::ios::binary);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
    REQUIRE(out.good());
}
inline void write_file(const std::filesystem::path& p, std::string_view text)
{
    write_file(p, std::as_bytes(std::span<const char>(text.data(), text.size())));
}

// The kdial::error message of f(), or a marker when f() throws something
// else or nothing.
template <class F> std::string error_of(F&& f)
{
    try {
        f();
    } catch (const kdial::error& e) {
        return e.what();
    } catch (const std::exception& e) {
        return std::string("<not a kdial::error: ") + e.what() + ">";
    }
    return "<no exception>";
}

// Checks that f() throws kdial::error whose message contains every piece.
template <class F> void check_error(F&& f, std::initializer_list<std::string_view> pieces)
{
    const std::string msg = error_of(std::forward<F>(f));
    for (std::string_view piece : pieces)
        CHECK_MESSAGE(msg.find(piece) != std::string::npos, "message \"" << msg << "\" lacks \"" << piece << "\"");
}

} // namespace kdial::test
