// NumPy .npy files of float32: write [rows, cols] or [n] arrays, read them back.
// Stage: io (golden data for tests, activations dumped for comparison with HF).
// Invariants: writes format 1.0 with the dict NumPy writes and the data
// 64-byte aligned, atomically (io/file.hpp: .partial, checked writes, fsync,
// rename); the reader accepts only regular files holding '<f4', C order,
// 1-D or 2-D, and checks every header field and the data length before
// returning anything.
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "file.hpp"

namespace kdial::io {

namespace detail {
using ::kdial::detail::cat;
using ::kdial::detail::check;
} // namespace detail

// A float32 array read from a .npy file.
struct npy_array {
    std::vector<std::size_t> shape; // 1 or 2 dims
    std::vector<float> data; // row-major, numel(shape) values

    std::size_t rows() const noexcept { return shape.size() == 2 ? shape[0] : 1; }
    std::size_t cols() const noexcept { return shape.empty() ? 0 : shape.back(); }
    // [rows, cols]; a 1-D array is one row.
    cmatrix_view<float> matrix() const noexcept { return { data.data(), rows(), cols() }; }
};

namespace detail {

inline constexpr char npy_magic[] = "\x93NUMPY"; // 6 bytes + NUL
inline constexpr std::size_t npy_align = 64;

// Magic, version 1.0, header length and the padded header dict, as NumPy's
// _wrap_header writes them (1 to 64 spaces, then '\n').
inline std::string npy_header(std::span<const std::size_t> shape)
{
    std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (";
    for (std::size_t i = 0; i < shape.size(); ++i) {
        if (i)
            dict += ", ";
        dict += std::to_string(shape[i]);
    }
    if (shape.size() == 1)
        dict += ",";
    dict += "), }";
    const std::size_t hlen = dict.size() + 1;
    const std::size_t pad = npy_align - (10 + hlen) % npy_align;
    dict.append(pad, ' ');
    dict += '\n';
    check(dict.size() <= 0xffff, "npy: header of ", dict.size(), " bytes does not fit format 1.0");
    std::string out(npy_magic, 6);
    out += '\x01';
    out += '\x00';
    out += static_cast<char>(dict.size() & 0xff);
    out += static_cast<char>((dict.size() >> 8) & 0xff);
    return out + dict;
}

inline void npy_write(const std::filesystem::path& path, std::span<const std::size_t> shape, const float* data,
    std::size_t rows, std::size_t cols, std::size_t stride)
{
    const std::string header = npy_header(shape);
    atomic_file f(path);
    f.write(header);
    if (stride == cols) // dense: one write
        f.write(std::as_bytes(std::span<const float>(data, rows * cols)));
    else
        for (std::size_t r = 0; r < rows && cols > 0; ++r)
            f.write(std::as_bytes(std::span<const float>(data + r * stride, cols)));
    f.commit();
}

// A tiny reader for the Python literal dict of a .npy header.
struct npy_header_parser {
    std::string_view s;
    std::size_t i = 0;
    std::string_view file;

    [[noreturn]] void fail(std::string_view what) const
    {
        throw error(cat(file, ": .npy header ", what, " at offset ", i, " of \"", s, "\""));
    }
    void ws()
    {
        while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
            ++i;
    }
    bool eat(char c)
    {
        ws();
        if (i < s.size() && s[i] == c) {
            ++i;
            return true;
        }
        return false;
    }
    void expect(char c)
    {
        if (!eat(c))
            fail(cat("expects '", c, "'"));
    }
    std::string str()
    {
        ws();
        if (i >= s.size() || (s[i] != '\'' && s[i] != '"'))
            fail("expects a quoted string");
        const char q = s[i++];
        const std::size_t start = i;
        while (i < s.size() && s[i] != q)
            ++i;
        if (i >= s.size())
            fail("has an unterminated string");
        return std::string(s.substr(start, i++ - start));
    }
    bool boolean()
    {
        ws();
        if (s.substr(i, 4) == "True") {
            i += 4;
            return true;
        }
        if (s.substr(i, 5) == "False") {
            i += 5;
            return false;
        }
        fail("expects True or False");
    }
    std::size_t integer()
    {
        ws();
        if (i >= s.size() || s[i] < '0' || s[i] > '9')
            fail("expects a non-negative integer");
        std::size_t v = 0;
        while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
            const auto d = static_cast<std::size_t>(s[i] - '0');
            if (v > (std::numeric_limits<std::size_t>::max() - d) / 10)
                fail("has a dimension that overflows");
            v = v * 10 + d;
            ++i;
        }
        if (i < s.size() && s[i] == 'L') // Python 2 long
            ++i;
        return v;
    }
    std::vector<std::size_t> tuple()
    {
        expect('(');
        std::vector<std::size_t> dims;
        if (eat(')'))
            return dims;
        for (;;) {
            dims.push_back(integer());
            if (eat(')'))
                return dims;
            expect(',');
            if (eat(')'))
                return dims;
            if (dims.size() > 32)
                fail("has too many dimensions");
        }
    }
};

} // namespace detail

// Parses a .npy image in memory; `file_name` is used in messages.
inline npy_array parse_npy(std::span<const std::byte> bytes, std::string_view file_name)
{
    using detail::check;
    const auto u8 = [&](std::size_t k) { return std::to_integer<std::uint32_t>(bytes[k]); };
    check(bytes.size() >= 10 && std::memcmp(bytes.data(), detail::npy_magic, 6) == 0, file_name,
        ": not a .npy file (no \\x93NUMPY magic)");
    const std::uint32_t major = u8(6), minor = u8(7);
    std::size_t hstart = 0, hlen = 0;
    if (major == 1) {
        hstart = 10;
        hlen = u8(8) | (u8(9) << 8);
    } else if (major == 2 || major == 3) {
        check(bytes.size() >= 12, file_name, ": .npy file too short for a version ", major, " header");
        hstart = 12;
        hlen = u8(8) | (u8(9) << 8) | (u8(10) << 16) | (static_cast<std::size_t>(u8(11)) << 24);
    } else {
        throw error(detail::cat(file_name, ": unsupported .npy format version ", major, ".", minor));
    }
    check(hlen <= bytes.size() - hstart, file_name, ": .npy header length ", hlen, " runs past the end of the file (",
        bytes.size(), " bytes)");

    detail::npy_header_parser p { std::string_view(reinterpret_cast<const char*>(bytes.data() + hstart), hlen), 0,
        file_name };
    std::optional<std::string> descr;
    std::optional<bool> fortran;
    std::optional<std::vector<std::size_t>> shape;
    p.expect('{');
    for (bool open = !p.eat('}'); open;) {
        const std::string key = p.str();
        p.expect(':');
        if (key == "descr" && !descr)
            descr = p.str();
        else if (key == "fortran_order" && !fortran)
            fortran = p.boolean();
        else if (key == "shape" && !shape)
            shape = p.tuple();
        else
            p.fail(detail::cat("has an unexpected or repeated key '", key, "'"));
        if (p.eat(','))
            open = !p.eat('}'); // a trailing comma is allowed, as NumPy writes one
        else {
            p.expect('}');
            open = false;
        }
    }
    p.ws();
    if (p.i != p.s.size())
        p.fail("has trailing characters");
    check(descr && fortran && shape, file_name, ": .npy header lacks ",
        !descr         ? "'descr'"
            : !fortran ? "'fortran_order'"
                       : "'shape'");
    check(*descr == "<f4", file_name, ": .npy descr is '", *descr, "', only '<f4' (little-endian float32) is read");
    check(!*fortran, file_name, ": .npy array is in Fortran order, only C order is read");
    check(shape->size() == 1 || shape->size() == 2, file_name, ": .npy array has ", shape->size(),
        " dims, only 1-D and 2-D arrays are read");

    std::size_t numel = 1;
    for (std::size_t d : *shape) {
        check(d == 0 || numel <= std::numeric_limits<std::size_t>::max() / 4 / d, file_name, ": .npy shape overflows");
        numel *= d;
    }
    const std::size_t data_start = hstart + hlen;
    const std::size_t have = bytes.size() - data_start;
    check(have == numel * 4, file_name, ": .npy data is ", have, " bytes, shape needs ", numel * 4);

    npy_array a;
    a.shape = std::move(*shape);
    a.data.resize(numel);
    if (numel)
        std::memcpy(a.data.data(), bytes.data() + data_start, numel * 4);
    return a;
}

// The largest .npy file read_npy accepts (16 GiB): a guard against reading
// a device or a runaway file, far above any logits dump.
inline constexpr std::size_t npy_max_file_bytes = std::size_t(16) << 30;

// Reads a whole .npy file (a regular file; see parse_npy for what is accepted).
inline npy_array read_npy(const std::filesystem::path& path)
{
    const std::string text = read_file(path, npy_max_file_bytes);
    return parse_npy(std::as_bytes(std::span<const char>(text.data(), text.size())), path.string());
}

// Writes data [rows, cols] (row-major, dense) as a 2-D '<f4' array.
inline void write_npy(
    const std::filesystem::path& path, std::span<const float> data, std::size_t rows, std::size_t cols)
{
    detail::check(cols == 0 || rows <= data.size() / cols, path.string(), ": write_npy of [", rows, ", ", cols,
        "] from ", data.size(), " floats");
    detail::check(data.size() == rows * cols, path.string(), ": write_npy of [", rows, ", ", cols, "] from ",
        data.size(), " floats");
    const std::size_t shape[2] = { rows, cols };
    detail::npy_write(path, shape, data.data(), rows, cols, cols);
}
// Writes a matrix view (any row stride) as a 2-D '<f4' array.
inline void write_npy(const std::filesystem::path& path, cmatrix_view<float> m)
{
    const std::size_t shape[2] = { m.rows, m.cols };
    detail::npy_write(path, shape, m.data, m.rows, m.cols, m.stride);
}
// Writes a 1-D '<f4' array.
inline void write_npy(const std::filesystem::path& path, std::span<const float> data)
{
    const std::size_t shape[1] = { data.size() };
    detail::npy_write(path, shape, data.data(), 1, data.size(), data.size());
}

} // namespace kdial::io
