// GGUF reading (llama.cpp's model file format) without ggml: mmap a file,
// validate its header, metadata and tensor infos, hand out tensor bytes and
// metadata values as views of the mapping.
// Stage: io (the edge before the layer, like safetensors.hpp).
// Invariants: nothing is trusted before it is checked, to the safetensors
// reader's standard: every count is checked against the bytes left before
// anything is sized from it, string lengths, dims products and byte sizes
// cannot overflow, tensor data lie inside the data section, aligned to
// general.alignment, without overlaps; duplicate keys and tensor names and
// unknown value or tensor types are errors. Every failure is a kdial::error
// naming the file and, where relevant, the metadata key or tensor.
//
// Format (GGUF v3; v2 has the same little-endian layout): "GGUF", u32
// version, u64 tensor count, u64 metadata count; metadata entries (string
// key, u32 value type, value; strings are u64 length + bytes, arrays u32
// element type + u64 count + elements); tensor infos (string name, u32 n_dims,
// u64 ne[n_dims] with ne[0] the contiguous dimension, u32 ggml type, u64
// offset into the data section); padding to the alignment; the data section.
// Type ids, block sizes and block bytes follow ggml's public type table.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/blocks.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/ggml_types.hpp"
#include "safetensors.hpp" // mapped_file, half_to_float

namespace kdial::io {

static_assert(
    std::endian::native == std::endian::little, "GGUF data are little-endian; views reinterpret them in place");

// ---------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------

// Metadata value types (GGUF spec).
enum class gguf_type : std::uint32_t {
    u8 = 0,
    i8 = 1,
    u16 = 2,
    i16 = 3,
    u32 = 4,
    i32 = 5,
    f32 = 6,
    boolean = 7,
    string = 8,
    array = 9,
    u64 = 10,
    i64 = 11,
    f64 = 12,
};
inline constexpr std::uint32_t gguf_type_count = 13;

inline constexpr std::string_view gguf_type_name(gguf_type t) noexcept
{
    constexpr std::array<std::string_view, gguf_type_count> names = { "uint8", "int8", "uint16", "int16", "uint32",
        "int32", "float32", "bool", "string", "array", "uint64", "int64", "float64" };
    const auto i = static_cast<std::uint32_t>(t);
    return i < gguf_type_count ? names[i] : std::string_view("?");
}

// Bytes of one scalar of type t (0 for string and array).
inline constexpr std::size_t gguf_scalar_size(gguf_type t) noexcept
{
    switch (t) {
    case gguf_type::u8:
    case gguf_type::i8:
    case gguf_type::boolean:
        return 1;
    case gguf_type::u16:
    case gguf_type::i16:
        return 2;
    case gguf_type::u32:
    case gguf_type::i32:
    case gguf_type::f32:
        return 4;
    case gguf_type::u64:
    case gguf_type::i64:
    case gguf_type::f64:
        return 8;
    default:
        return 0;
    }
}

// Tensor types: kdial::ggml_type and its table (core/ggml_types.hpp).
using kdial::ggml_type;
using kdial::ggml_type_info;
using kdial::ggml_type_name;
using kdial::ggml_type_traits;

// ---------------------------------------------------------------------------
// Parsed contents
// ---------------------------------------------------------------------------

// One metadata value. Strings and numeric arrays are views of the mapping
// (numeric array elements may be unaligned: read them with the accessors).
struct gguf_value {
    gguf_type type = gguf_type::u8;
    std::uint64_t bits = 0; // scalars: the little-endian bytes, zero-extended
    std::string_view str; // string
    gguf_type elem = gguf_type::u8; // array: element type
    std::uint64_t count = 0; // array: element count
    std::span<const std::byte> data; // numeric / bool array: count x element size bytes
    std::vector<std::string_view> strings; // array of strings
    std::vector<gguf_value> arrays; // array of arrays

    bool is_integer() const noexcept
    {
        return type == gguf_type::u8 || type == gguf_type::i8 || type == gguf_type::u16 || type == gguf_type::i16
            || type == gguf_type::u32 || type == gguf_type::i32 || type == gguf_type::u64 || type == gguf_type::i64;
    }
    // An integer scalar as int64 (nothing for non-integers and for uint64
    // values above INT64_MAX; as_uint() reads those).
    std::optional<std::int64_t> as_int() const noexcept { return scalar_int(type, bits); }
    std::optional<std::uint64_t> as_uint() const noexcept
    {
        if (type == gguf_type::u64)
            return bits;
        const auto v = as_int();
        return v && *v >= 0 ? std::optional<std::uint64_t>(std::uint64_t(*v)) : std::nullopt;
    }
    // f32 / f64 scalars (integers are not converted silently).
    std::optional<double> as_float() const noexcept
    {
        if (type == gguf_type::f32)
            return double(std::bit_cast<float>(std::uint32_t(bits)));
        if (type == gguf_type::f64)
            return std::bit_cast<double>(bits);
        return std::nullopt;
    }
    std::optional<bool> as_bool() const noexcept
    {
        return type == gguf_type::boolean ? std::optional<bool>(bits != 0) : std::nullopt;
    }
    // Element i of a numeric array as an integer (nothing for non-integers
    // or an out-of-range i).
    std::optional<std::int64_t> int_at(std::uint64_t i) const noexcept
    {
        const std::size_t s = gguf_scalar_size(elem);
        if (type != gguf_type::array || s == 0 || i >= count || elem == gguf_type::f32 || elem == gguf_type::f64)
            return std::nullopt;
        std::uint64_t b = 0;
        std::memcpy(&b, data.data() + i * s, s);
        return scalar_int(elem, b);
    }
    std::optional<double> float_at(std::uint64_t i) const noexcept
    {
        if (type != gguf_type::array || i >= count)
            return std::nullopt;
        if (elem == gguf_type::f32) {
            float f;
            std::memcpy(&f, data.data() + i * 4, 4);
            return double(f);
        }
        if (elem == gguf_type::f64) {
            double f;
            std::memcpy(&f, data.data() + i * 8, 8);
            return f;
        }
        return std::nullopt;
    }

    // The value in words for messages: its type and, for scalars, the value.
    std::string describe() const
    {
        using ::kdial::detail::cat;
        if (type == gguf_type::array)
            return cat("array of ", count, " ", gguf_type_name(elem));
        if (type == gguf_type::string)
            return cat("string \"", str.substr(0, 80), str.size() > 80 ? "...\"" : "\"");
        if (const auto v = as_int())
            return cat(gguf_type_name(type), " ", *v);
        if (type == gguf_type::u64)
            return cat("uint64 ", bits);
        if (const auto f = as_float())
            return cat(gguf_type_name(type), " ", *f);
        if (type == gguf_type::boolean)
            return bits ? "bool true" : "bool false";
        return std::string(gguf_type_name(type));
    }

private:
    static std::optional<std::int64_t> scalar_int(gguf_type t, std::uint64_t b) noexcept
    {
        switch (t) {
        case gguf_type::u8:
        case gguf_type::u16:
        case gguf_type::u32:
            return std::int64_t(b);
        case gguf_type::i8:
            return std::int64_t(std::int8_t(std::uint8_t(b)));
        case gguf_type::i16:
            return std::int64_t(std::int16_t(std::uint16_t(b)));
        case gguf_type::i32:
            return std::int64_t(std::int32_t(std::uint32_t(b)));
        case gguf_type::i64:
            return std::int64_t(b);
        case gguf_type::u64:
            return b <= std::uint64_t(std::numeric_limits<std::int64_t>::max()) ? std::optional(std::int64_t(b))
                                                                                : std::nullopt;
        default:
            return std::nullopt;
        }
    }
};

struct gguf_tensor_info {
    std::string name;
    std::vector<std::uint64_t> ne; // GGUF order: ne[0] is the contiguous dimension
    std::vector<std::size_t> shape; // row-major (ne reversed), as safetensors and PyTorch list it
    ggml_type type = ggml_type::f32;
    ggml_type_traits traits;
    std::uint64_t offset = 0; // from the start of the data section
    std::span<const std::byte> bytes; // the tensor's data in the file image

    std::size_t numel() const noexcept
    {
        std::size_t n = 1;
        for (auto d : ne)
            n *= std::size_t(d);
        return n;
    }
    std::size_t rank() const noexcept { return ne.size(); }
    // ne[0], and the product of the other dims: the tensor as a [rows, cols] matrix.
    std::size_t cols() const noexcept { return ne.empty() ? 1 : std::size_t(ne[0]); }
    std::size_t rows() const noexcept { return cols() ? numel() / cols() : 0; }
};

namespace detail {

using ::kdial::detail::cat;
using ::kdial::detail::check;

// A printable, cut version of a key or name for messages (bytes outside
// printable ASCII are escaped).
inline std::string gguf_printable(std::string_view s, std::size_t max = 120)
{
    std::string out;
    for (std::size_t i = 0; i < s.size() && i < max; ++i) {
        const unsigned char c = static_cast<unsigned char>(s[i]);
        if (c >= 0x20 && c < 0x7f)
            out += char(c);
        else {
            static constexpr char hex[] = "0123456789abcdef";
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        }
    }
    if (s.size() > max)
        out += "...";
    return out;
}

inline std::string gguf_shape_str(std::span<const std::uint64_t> ne)
{
    std::string s = "[";
    for (std::size_t i = 0; i < ne.size(); ++i)
        s += cat(i ? ", " : "", ne[i]);
    return s + "]";
}

// Most dims of a tensor (ggml's GGML_MAX_DIMS) and deepest nesting of arrays.
inline constexpr std::uint32_t gguf_max_dims = 4;
inline constexpr int gguf_max_array_depth = 8;

// A bounds-checked little-endian reader over the file image. Every read
// checks the bytes left first; `where` names what is being read.
class gguf_cursor {
public:
    gguf_cursor(std::span<const std::byte> bytes, std::string_view file)
        : b_(bytes)
        , file_(file)
    {
    }
    std::size_t pos() const noexcept { return pos_; }
    std::size_t left() const noexcept { return b_.size() - pos_; }
    std::string_view file() const noexcept { return file_; }

    template <class... A> [[noreturn]] void fail(const A&... a) const { throw error(cat(file_, ": ", a...)); }

    void need(std::uint64_t n, std::string_view what) const
    {
        if (n > left())
            fail(what, ": needs ", n, " bytes at offset ", pos_, ", but the file has only ", left(),
                " left (truncated file?)");
    }
    template <class T> T get(std::string_view what)
    {
        need(sizeof(T), what);
        T v;
        std::memcpy(&v, b_.data() + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::span<const std::byte> take(std::uint64_t n, std::string_view what)
    {
        need(n, what);
        const auto s = b_.subspan(pos_, std::size_t(n));
        pos_ += std::size_t(n);
        return s;
    }
    std::string_view string(std::string_view what)
    {
        const auto n = get<std::uint64_t>(what);
        if (n > left())
            fail(what, ": string length ", n, " at offset ", pos_ - 8, " is longer than the ", left(),
                " bytes left in the file");
        const auto s = take(n, what);
        return { reinterpret_cast<const char*>(s.data()), s.size() };
    }

private:
    std::span<const std::byte> b_;
    std::string_view file_;
    std::size_t pos_ = 0;
};

inline gguf_value gguf_read_value(gguf_cursor& c, gguf_type t, const std::string& where, int depth)
{
    gguf_value v;
    v.type = t;
    if (const std::size_t s = gguf_scalar_size(t)) {
        const auto b = c.take(s, where);
        std::memcpy(&v.bits, b.data(), s);
        if (t == gguf_type::boolean && v.bits > 1)
            c.fail(where, ": bool value ", v.bits, ", expected 0 or 1");
        return v;
    }
    if (t == gguf_type::string) {
        v.str = c.string(where);
        return v;
    }
    // Array.
    if (depth >= gguf_max_array_depth)
        c.fail(where, ": arrays nested deeper than ", gguf_max_array_depth, " levels");
    const auto et = c.get<std::uint32_t>(where);
    if (et >= gguf_type_count)
        c.fail(where, ": unknown array element type ", et);
    v.elem = static_cast<gguf_type>(et);
    v.count = c.get<std::uint64_t>(where);
    // Every element needs at least this many bytes: the count is checked
    // against the bytes left before anything is sized from it.
    const std::size_t min_size = v.elem == gguf_type::string ? 8
        : v.elem == gguf_type::array                         ? 12
                                                             : gguf_scalar_size(v.elem);
    if (v.count > c.left() / min_size)
        c.fail(where, ": array of ", v.count, " ", gguf_type_name(v.elem), " needs at least ",
            v.count > std::numeric_limits<std::uint64_t>::max() / min_size ? std::string("2^64")
                                                                           : cat(v.count * min_size),
            " bytes, but the file has only ", c.left(), " left");
    if (const std::size_t s = gguf_scalar_size(v.elem)) {
        v.data = c.take(v.count * s, where);
        if (v.elem == gguf_type::boolean)
            for (std::size_t i = 0; i < v.count; ++i)
                if (std::to_integer<unsigned>(v.data[i]) > 1)
                    c.fail(
                        where, ": bool element ", i, " is ", std::to_integer<unsigned>(v.data[i]), ", expected 0 or 1");
    } else if (v.elem == gguf_type::string) {
        v.strings.reserve(std::size_t(v.count));
        for (std::uint64_t i = 0; i < v.count; ++i)
            v.strings.push_back(c.string(where));
    } else {
        v.arrays.reserve(std::size_t(v.count));
        for (std::uint64_t i = 0; i < v.count; ++i)
            v.arrays.push_back(gguf_read_value(c, gguf_type::array, cat(where, "[", i, "]"), depth + 1));
    }
    return v;
}

} // namespace detail

// The parsed header of a GGUF file: version, metadata (by key), tensor infos
// (in file order; found by name through an index), alignment and the data
// section's place in the file.
struct gguf_header {
    std::uint32_t version = 3;
    std::map<std::string, gguf_value, std::less<>> metadata;
    std::vector<std::string> key_order; // metadata keys in file order
    std::vector<gguf_tensor_info> tensors; // file order
    std::map<std::string, std::size_t, std::less<>> tensor_index; // name -> position in tensors
    std::uint64_t alignment = 32;
    std::uint64_t data_offset = 0; // file offset of the data section
};

// Parses and validates a whole GGUF file image. `file_name` names the file in
// messages. The returned views point into `bytes`.
inline gguf_header parse_gguf(std::span<const std::byte> bytes, std::string_view file_name)
{
    using detail::cat;
    detail::gguf_cursor c(bytes, file_name);
    gguf_header h;
    if (bytes.size() < 4 || std::memcmp(bytes.data(), "GGUF", 4) != 0) {
        std::string got;
        for (std::size_t i = 0; i < 4 && i < bytes.size(); ++i)
            got += char(std::to_integer<char>(bytes[i]));
        c.fail("not a GGUF file: the magic is \"", detail::gguf_printable(got), "\", expected \"GGUF\"",
            bytes.size() < 4 ? " (file shorter than 4 bytes)" : "");
    }
    (void)c.take(4, "GGUF magic");
    h.version = c.get<std::uint32_t>("GGUF header (version)");
    if (h.version == 1)
        c.fail("GGUF version 1 is not supported (32-bit counts; convert the model again with a current llama.cpp)");
    if (h.version == 0x03000000u || h.version == 0x02000000u)
        c.fail("big-endian GGUF (version ", h.version >> 24, " byte-swapped) is not supported");
    if (h.version != 2 && h.version != 3)
        c.fail("unsupported GGUF version ", h.version, " (2 and 3 are read)");
    const auto n_tensors = c.get<std::uint64_t>("GGUF header (tensor count)");
    const auto n_kv = c.get<std::uint64_t>("GGUF header (metadata count)");
    // Smallest encodings: a metadata entry 8 (key length) + 4 (type) + 1 bytes,
    // a tensor info 8 + 4 + 8 + 4 + 8 bytes.
    if (n_kv > c.left() / 13)
        c.fail("GGUF header: metadata count ", n_kv, " cannot fit in the ", c.left(), " bytes after the header");
    if (n_tensors > c.left() / 32)
        c.fail("GGUF header: tensor count ", n_tensors, " cannot fit in the ", c.left(), " bytes after the header");

    h.key_order.reserve(std::size_t(n_kv));
    for (std::uint64_t i = 0; i < n_kv; ++i) {
        const std::string where_key = cat("metadata entry ", i, " (key)");
        const std::string key(c.string(where_key));
        const std::string where = cat("metadata key '", detail::gguf_printable(key), "'");
        const auto t = c.get<std::uint32_t>(where + " (type)");
        if (t >= gguf_type_count)
            c.fail(where, ": unknown value type ", t);
        gguf_value v = detail::gguf_read_value(c, static_cast<gguf_type>(t), where, 0);
        if (h.metadata.count(key))
            c.fail(where, ": duplicate key (entry ", i, ")");
        h.key_order.push_back(key);
        h.metadata.emplace(key, std::move(v));
    }
    if (const auto it = h.metadata.find("general.alignment"); it != h.metadata.end()) {
        const gguf_value& a = it->second;
        if (a.type != gguf_type::u32)
            c.fail("metadata key 'general.alignment' is ", a.describe(), ", expected uint32");
        if (a.bits == 0 || (a.bits & (a.bits - 1)) != 0)
            c.fail("metadata key 'general.alignment' = ", a.bits, " is not a power of two");
        h.alignment = a.bits;
    }

    h.tensors.reserve(std::size_t(n_tensors));
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
        gguf_tensor_info t;
        t.name = std::string(c.string(cat("tensor info ", i, " (name)")));
        const std::string where = cat("tensor '", detail::gguf_printable(t.name), "'");
        const auto n_dims = c.get<std::uint32_t>(where + " (n_dims)");
        if (n_dims == 0 || n_dims > detail::gguf_max_dims)
            c.fail(where, ": ", n_dims, " dims, expected 1 to ", detail::gguf_max_dims);
        t.ne.resize(n_dims);
        std::uint64_t numel = 1;
        for (std::uint32_t d = 0; d < n_dims; ++d) {
            const auto n = c.get<std::uint64_t>(where + " (dims)");
            if (n > std::uint64_t(std::numeric_limits<std::int64_t>::max()))
                c.fail(where, ": ne[", d, "] = ", std::int64_t(n), " is negative");
            if (n != 0 && numel > std::numeric_limits<std::uint64_t>::max() / n)
                c.fail(where, ": dims overflow the element count");
            numel *= n;
            t.ne[d] = n;
        }
        const auto type_id = c.get<std::uint32_t>(where + " (type)");
        const auto traits = ggml_type_info(type_id);
        if (!traits)
            c.fail(where, ": unknown tensor type id ", type_id);
        t.type = static_cast<ggml_type>(type_id);
        t.traits = *traits;
        t.offset = c.get<std::uint64_t>(where + " (offset)");
        if (t.ne[0] % t.traits.block != 0)
            c.fail(where, ": ne[0] = ", t.ne[0], " (shape ", detail::gguf_shape_str(t.ne), ") is not a multiple of ",
                t.traits.name, "'s block of ", t.traits.block, " elements");
        if (numel / t.traits.block > std::numeric_limits<std::uint64_t>::max() / t.traits.bytes)
            c.fail(where, ": shape ", detail::gguf_shape_str(t.ne), " x ", t.traits.name, " overflows the byte count");
        if (h.tensor_index.count(t.name))
            c.fail(where, ": duplicate tensor name (tensor info ", i, ")");
        for (std::size_t d = t.ne.size(); d-- > 0;)
            t.shape.push_back(std::size_t(t.ne[d]));
        h.tensor_index.emplace(t.name, h.tensors.size());
        h.tensors.push_back(std::move(t));
    }

    // The data section starts at the next multiple of the alignment.
    const std::uint64_t pos = c.pos();
    h.data_offset = (pos + h.alignment - 1) / h.alignment * h.alignment;
    if (h.data_offset > bytes.size()) {
        if (!h.tensors.empty())
            c.fail("the data section would start at offset ", h.data_offset, " (after padding to ", h.alignment,
                "), past the end of the ", bytes.size(), "-byte file");
        h.data_offset = bytes.size();
    }
    const std::uint64_t data_size = bytes.size() - h.data_offset;
    for (auto& t : h.tensors) {
        const std::string where = cat("tensor '", detail::gguf_printable(t.name), "'");
        const std::uint64_t nbytes = t.numel() / t.traits.block * t.traits.bytes;
        if (t.offset % h.alignment != 0)
            c.fail(where, ": data offset ", t.offset, " is not a multiple of the alignment ", h.alignment);
        if (t.offset > data_size || nbytes > data_size - t.offset)
            c.fail(where, ": data [", t.offset, ", ", t.offset + std::min(nbytes, ~std::uint64_t(0) - t.offset),
                ") (shape ", detail::gguf_shape_str(t.ne), " x ", t.traits.name, " = ", nbytes,
                " bytes) runs past the data section of ", data_size, " bytes");
        t.bytes = bytes.subspan(std::size_t(h.data_offset + t.offset), std::size_t(nbytes));
    }
    std::vector<const gguf_tensor_info*> by_offset;
    by_offset.reserve(h.tensors.size());
    for (const auto& t : h.tensors)
        by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const gguf_tensor_info* a, const gguf_tensor_info* b) {
        return a->offset != b->offset ? a->offset < b->offset : a->bytes.size() < b->bytes.size();
    });
    // Empty tensors occupy nothing; every other tensor must begin at or
    // after the furthest end seen so far.
    const gguf_tensor_info* furthest = nullptr;
    for (const auto* b : by_offset) {
        if (b->bytes.empty())
            continue;
        if (furthest && b->offset < furthest->offset + furthest->bytes.size()) {
            const auto* a = furthest;
            c.fail("tensor '", detail::gguf_printable(b->name), "' [", b->offset, ", ", b->offset + b->bytes.size(),
                ") overlaps tensor '", detail::gguf_printable(a->name), "' [", a->offset, ", ",
                a->offset + a->bytes.size(), ") in the data section");
        }
        if (!furthest || b->offset + b->bytes.size() > furthest->offset + furthest->bytes.size())
            furthest = b;
    }
    return h;
}

// One validated GGUF file, memory-mapped (or a file image in memory).
// Movable, not copyable; views stay valid while the object lives.
class gguf_file {
public:
    static gguf_file open(const std::filesystem::path& path)
    {
        gguf_file f;
        f.name_ = path.string();
        f.map_ = mapped_file(path);
        f.bytes_ = f.map_.bytes();
        f.header_ = parse_gguf(f.bytes_, f.name_);
        return f;
    }
    // Validates a file image in memory; `bytes` must outlive the object.
    static gguf_file from_memory(std::span<const std::byte> bytes, std::string name)
    {
        gguf_file f;
        f.name_ = std::move(name);
        f.bytes_ = bytes;
        f.header_ = parse_gguf(f.bytes_, f.name_);
        return f;
    }

    const std::string& name() const noexcept { return name_; }
    std::span<const std::byte> bytes() const noexcept { return bytes_; }
    const gguf_header& header() const noexcept { return header_; }
    std::uint32_t version() const noexcept { return header_.version; }
    std::uint64_t alignment() const noexcept { return header_.alignment; }

    // Metadata.
    const std::map<std::string, gguf_value, std::less<>>& metadata() const noexcept { return header_.metadata; }
    const gguf_value* find_key(std::string_view key) const noexcept
    {
        const auto it = header_.metadata.find(key);
        return it == header_.metadata.end() ? nullptr : &it->second;
    }
    bool has_key(std::string_view key) const noexcept { return find_key(key) != nullptr; }
    const gguf_value& value(std::string_view key) const
    {
        const gguf_value* v = find_key(key);
        detail::check(v != nullptr, name_, ": no metadata key '", key, "'");
        return *v;
    }
    // Typed getters: throw naming the file, key, the value found and the
    // type wanted. Integers of any integer type are accepted when the value
    // fits; floats accept float32 / float64.
    std::string_view get_string(std::string_view key) const
    {
        const gguf_value& v = value(key);
        detail::check(
            v.type == gguf_type::string, name_, ": metadata key '", key, "' is ", v.describe(), ", expected a string");
        return v.str;
    }
    std::int64_t get_int(std::string_view key, std::int64_t lo, std::int64_t hi) const
    {
        const gguf_value& v = value(key);
        const auto i = v.as_int();
        detail::check(i.has_value(), name_, ": metadata key '", key, "' is ", v.describe(), ", expected an integer");
        detail::check(
            *i >= lo && *i <= hi, name_, ": metadata key '", key, "' = ", *i, " is outside [", lo, ", ", hi, "]");
        return *i;
    }
    double get_float(std::string_view key) const
    {
        const gguf_value& v = value(key);
        const auto f = v.as_float();
        detail::check(f.has_value(), name_, ": metadata key '", key, "' is ", v.describe(), ", expected a float");
        return *f;
    }
    bool get_bool(std::string_view key) const
    {
        const gguf_value& v = value(key);
        const auto b = v.as_bool();
        detail::check(b.has_value(), name_, ": metadata key '", key, "' is ", v.describe(), ", expected a bool");
        return *b;
    }
    // An array of strings.
    std::span<const std::string_view> get_strings(std::string_view key) const
    {
        const gguf_value& v = value(key);
        detail::check(v.type == gguf_type::array && v.elem == gguf_type::string, name_, ": metadata key '", key,
            "' is ", v.describe(), ", expected an array of strings");
        return v.strings;
    }

    // Tensors, in file order.
    std::span<const gguf_tensor_info> tensors() const noexcept { return header_.tensors; }
    std::size_t size() const noexcept { return header_.tensors.size(); }
    const gguf_tensor_info* find(std::string_view name) const noexcept
    {
        const auto it = header_.tensor_index.find(name);
        return it == header_.tensor_index.end() ? nullptr : &header_.tensors[it->second];
    }
    bool has(std::string_view name) const noexcept { return find(name) != nullptr; }
    const gguf_tensor_info& info(std::string_view name) const
    {
        const gguf_tensor_info* t = find(name);
        detail::check(t != nullptr, name_, ": no tensor '", name, "'");
        return *t;
    }

    // Elements [first, first + out.size()) of an F32 / F16 / BF16 / Q8_0 /
    // Q4_0 / Q4_K / Q5_K / Q6_K tensor (in its flat ne[0]-fastest order) as
    // floats, for any alignment: the exact values the kernels use (the
    // dequantisers of core/blocks.hpp). Block-type ranges must start and end
    // on block boundaries.
    void read_floats(const gguf_tensor_info& t, std::size_t first, std::span<float> out) const
    {
        const std::size_t n = t.numel();
        detail::check(first <= n && out.size() <= n - first, name_, ": tensor '", t.name, "' has ", n,
            " elements, elements [", first, ", ", first + out.size(), ") were asked for");
        const std::byte* p = t.bytes.data();
        switch (t.type) {
        case ggml_type::f32:
            if (!out.empty())
                std::memcpy(out.data(), p + 4 * first, out.size() * 4);
            return;
        case ggml_type::f16:
        case ggml_type::bf16:
            for (std::size_t i = 0; i < out.size(); ++i) {
                std::uint16_t b;
                std::memcpy(&b, p + 2 * (first + i), 2);
                out[i] = t.type == ggml_type::bf16 ? std::bit_cast<float>(std::uint32_t(b) << 16)
                                                   : f16::from_bits(b).to_float();
            }
            return;
        case ggml_type::q8_0:
            return read_blocks<q8_block>(t, p, first, out);
        case ggml_type::q4_0:
            return read_blocks<q4_0_block>(t, p, first, out);
        case ggml_type::q4_k:
            return read_blocks<q4_k_block>(t, p, first, out);
        case ggml_type::q5_k:
            return read_blocks<q5_k_block>(t, p, first, out);
        case ggml_type::q6_k:
            return read_blocks<q6_k_block>(t, p, first, out);
        default:
            throw error(detail::cat(name_, ": tensor '", t.name, "' has type ", t.traits.name,
                "; only F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K and Q6_K are read as floats"));
        }
    }
    std::vector<float> read_floats(std::string_view name) const
    {
        const gguf_tensor_info& t = info(name);
        std::vector<float> out(t.numel());
        read_floats(t, 0, out);
        return out;
    }

private:
    template <class Block>
    void read_blocks(const gguf_tensor_info& t, const std::byte* p, std::size_t first, std::span<float> out) const
    {
        constexpr std::size_t G = block_elems<Block>;
        detail::check(first % G == 0 && out.size() % G == 0, name_, ": tensor '", t.name, "': ", t.traits.name,
            " elements are read in whole blocks of ", G);
        dequantize_row(reinterpret_cast<const Block*>(p) + first / G, out.size(), out.data());
    }

    gguf_file() = default;
    std::string name_;
    mapped_file map_;
    std::span<const std::byte> bytes_;
    gguf_header header_;
};

// True when `path` is a regular file that starts with the GGUF magic.
inline bool looks_like_gguf(const std::filesystem::path& path)
{
    std::error_code ec;
    if (!std::filesystem::is_regular_file(path, ec))
        return false;
    std::ifstream in(path, std::ios::binary);
    char m[4] = {};
    in.read(m, 4);
    return in.gcount() == 4 && std::memcmp(m, "GGUF", 4) == 0;
}

} // namespace kdial::io
