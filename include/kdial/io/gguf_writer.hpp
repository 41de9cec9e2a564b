// GGUF writing: the producer side of gguf.hpp, for synthetic models
// (olmoe make-synthetic --format gguf) and tests.
// Stage: io. Invariants: inputs are validated before a byte is written
// (duplicate keys or tensor names, byte sizes that do not match shape x type,
// ne[0] not a multiple of the type's block, a bad general.alignment); tensors
// are laid out in the order given, each at a multiple of the alignment;
// files are written atomically (io/file.hpp's atomic_file).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "file.hpp"
#include "gguf.hpp"

namespace kdial::io {

// An owned metadata value to write (any GGUF value type, arrays nested).
class gguf_out_value {
public:
    gguf_type type = gguf_type::u8;
    std::uint64_t bits = 0; // scalar bytes, little-endian
    std::string str;
    gguf_type elem = gguf_type::u8; // array element type
    std::uint64_t count = 0;
    std::vector<std::byte> data; // numeric / bool array elements
    std::vector<std::string> strings;
    std::vector<gguf_out_value> arrays;

    template <class T> static gguf_out_value scalar(gguf_type t, T x)
    {
        static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8);
        gguf_out_value v;
        v.type = t;
        std::memcpy(&v.bits, &x, sizeof(T));
        return v;
    }
    static gguf_out_value u8(std::uint8_t x) { return scalar(gguf_type::u8, x); }
    static gguf_out_value i8(std::int8_t x) { return scalar(gguf_type::i8, x); }
    static gguf_out_value u16(std::uint16_t x) { return scalar(gguf_type::u16, x); }
    static gguf_out_value i16(std::int16_t x) { return scalar(gguf_type::i16, x); }
    static gguf_out_value u32(std::uint32_t x) { return scalar(gguf_type::u32, x); }
    static gguf_out_value i32(std::int32_t x) { return scalar(gguf_type::i32, x); }
    static gguf_out_value u64(std::uint64_t x) { return scalar(gguf_type::u64, x); }
    static gguf_out_value i64(std::int64_t x) { return scalar(gguf_type::i64, x); }
    static gguf_out_value f32(float x) { return scalar(gguf_type::f32, x); }
    static gguf_out_value f64(double x) { return scalar(gguf_type::f64, x); }
    static gguf_out_value boolean(bool x) { return scalar(gguf_type::boolean, std::uint8_t(x ? 1 : 0)); }
    static gguf_out_value string(std::string s)
    {
        gguf_out_value v;
        v.type = gguf_type::string;
        v.str = std::move(s);
        return v;
    }
    // A numeric (or bool) array of element type t from raw little-endian values.
    template <class T> static gguf_out_value array(gguf_type t, std::span<const T> xs)
    {
        detail::check(gguf_scalar_size(t) == sizeof(T), "gguf_out_value::array: element type ", gguf_type_name(t),
            " is not ", sizeof(T), " bytes");
        gguf_out_value v;
        v.type = gguf_type::array;
        v.elem = t;
        v.count = xs.size();
        const auto b = std::as_bytes(xs);
        v.data.assign(b.begin(), b.end());
        return v;
    }
    static gguf_out_value string_array(std::vector<std::string> xs)
    {
        gguf_out_value v;
        v.type = gguf_type::array;
        v.elem = gguf_type::string;
        v.count = xs.size();
        v.strings = std::move(xs);
        return v;
    }
    static gguf_out_value array_of_arrays(std::vector<gguf_out_value> xs)
    {
        for (const auto& x : xs)
            detail::check(x.type == gguf_type::array, "gguf_out_value::array_of_arrays: an element is not an array");
        gguf_out_value v;
        v.type = gguf_type::array;
        v.elem = gguf_type::array;
        v.count = xs.size();
        v.arrays = std::move(xs);
        return v;
    }
};

// One tensor to write: bytes must be (numel / block) x block bytes of `type`
// long, in GGUF order (ne[0] fastest). The bytes are referenced, not copied;
// or, when `produce` is set (write_gguf only), made when the tensor is
// written, so a large model never sits in memory whole (its size is checked
// then, and a mismatch abandons the file).
struct gguf_out_tensor {
    std::string name;
    ggml_type type = ggml_type::f32;
    std::vector<std::uint64_t> ne; // ne[0] first (the contiguous dimension)
    std::span<const std::byte> bytes;
    std::function<std::vector<std::byte>()> produce;
};

using gguf_metadata_list = std::vector<std::pair<std::string, gguf_out_value>>;

namespace detail {

inline void gguf_put(std::vector<std::byte>& out, const void* p, std::size_t n)
{
    const auto* b = static_cast<const std::byte*>(p);
    out.insert(out.end(), b, b + n);
}
template <class T> void gguf_put(std::vector<std::byte>& out, T x)
{
    gguf_put(out, &x, sizeof(T));
}
inline void gguf_put_string(std::vector<std::byte>& out, std::string_view s)
{
    gguf_put<std::uint64_t>(out, s.size());
    gguf_put(out, s.data(), s.size());
}

inline void gguf_put_value(std::vector<std::byte>& out, const gguf_out_value& v, bool with_type)
{
    if (with_type)
        gguf_put<std::uint32_t>(out, static_cast<std::uint32_t>(v.type));
    if (const std::size_t s = gguf_scalar_size(v.type)) {
        gguf_put(out, &v.bits, s);
        return;
    }
    if (v.type == gguf_type::string) {
        gguf_put_string(out, v.str);
        return;
    }
    check(v.type == gguf_type::array, "gguf writer: bad value type ", static_cast<std::uint32_t>(v.type));
    gguf_put<std::uint32_t>(out, static_cast<std::uint32_t>(v.elem));
    gguf_put<std::uint64_t>(out, v.count);
    if (gguf_scalar_size(v.elem)) {
        check(v.data.size() == v.count * gguf_scalar_size(v.elem), "gguf writer: array data size mismatch");
        gguf_put(out, v.data.data(), v.data.size());
    } else if (v.elem == gguf_type::string) {
        check(v.strings.size() == v.count, "gguf writer: string array count mismatch");
        for (const auto& s : v.strings)
            gguf_put_string(out, s);
    } else {
        check(v.arrays.size() == v.count, "gguf writer: nested array count mismatch");
        for (const auto& a : v.arrays)
            gguf_put_value(out, a, false);
    }
}

// Validates the inputs, returns the header bytes (padded to the alignment)
// and each tensor's offset in the data section.
inline std::vector<std::byte> gguf_build_header(const gguf_metadata_list& metadata,
    std::span<const gguf_out_tensor> tensors, std::vector<std::uint64_t>& offsets, std::uint64_t& alignment,
    std::string_view file_name)
{
    alignment = 32;
    std::set<std::string_view> keys;
    for (const auto& [k, v] : metadata) {
        check(keys.insert(k).second, file_name, ": metadata key '", k, "' given twice");
        if (k == "general.alignment") {
            check(v.type == gguf_type::u32 && v.bits != 0 && (v.bits & (v.bits - 1)) == 0, file_name,
                ": general.alignment must be a uint32 power of two");
            alignment = v.bits;
        }
    }
    std::set<std::string_view> names;
    offsets.clear();
    std::uint64_t off = 0;
    for (const auto& t : tensors) {
        check(names.insert(t.name).second, file_name, ": tensor '", t.name, "' given twice");
        const auto tr = ggml_type_info(static_cast<std::uint32_t>(t.type));
        check(tr.has_value(), file_name, ": tensor '", t.name, "': unknown type ", static_cast<std::uint32_t>(t.type));
        check(!t.ne.empty() && t.ne.size() <= gguf_max_dims, file_name, ": tensor '", t.name, "': ", t.ne.size(),
            " dims");
        check(t.ne[0] % tr->block == 0, file_name, ": tensor '", t.name, "': ne[0] = ", t.ne[0],
            " is not a multiple of ", tr->name, "'s block ", tr->block);
        std::uint64_t n = 1;
        for (auto d : t.ne)
            n *= d;
        const std::uint64_t nbytes = n / tr->block * tr->bytes;
        check(t.produce || t.bytes.size() == nbytes, file_name, ": tensor '", t.name, "': ", t.bytes.size(),
            " bytes given, shape ", gguf_shape_str(t.ne), " x ", tr->name, " needs ", nbytes);
        offsets.push_back(off);
        off += (nbytes + alignment - 1) / alignment * alignment;
    }

    std::vector<std::byte> out;
    gguf_put(out, "GGUF", 4);
    gguf_put<std::uint32_t>(out, 3);
    gguf_put<std::uint64_t>(out, tensors.size());
    gguf_put<std::uint64_t>(out, metadata.size());
    for (const auto& [k, v] : metadata) {
        gguf_put_string(out, k);
        gguf_put_value(out, v, true);
    }
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        const auto& t = tensors[i];
        gguf_put_string(out, t.name);
        gguf_put<std::uint32_t>(out, std::uint32_t(t.ne.size()));
        for (auto d : t.ne)
            gguf_put<std::uint64_t>(out, d);
        gguf_put<std::uint32_t>(out, static_cast<std::uint32_t>(t.type));
        gguf_put<std::uint64_t>(out, offsets[i]);
    }
    out.resize((out.size() + alignment - 1) / alignment * alignment, std::byte { 0 });
    return out;
}

} // namespace detail

// The whole file image in memory (tests, fuzz seeds, small files).
inline std::vector<std::byte> encode_gguf(const gguf_metadata_list& metadata, std::span<const gguf_out_tensor> tensors)
{
    std::vector<std::uint64_t> offsets;
    std::uint64_t alignment = 32;
    std::vector<std::byte> out = detail::gguf_build_header(metadata, tensors, offsets, alignment, "encode_gguf");
    for (const auto& t : tensors) {
        detail::check(!t.produce, "encode_gguf: tensor '", t.name, "' is produced lazily; use write_gguf");
        out.insert(out.end(), t.bytes.begin(), t.bytes.end());
        out.resize((out.size() + alignment - 1) / alignment * alignment, std::byte { 0 });
    }
    return out;
}

// Writes a GGUF file, streaming the tensor bytes, atomically.
inline void write_gguf(
    const std::filesystem::path& path, const gguf_metadata_list& metadata, std::span<const gguf_out_tensor> tensors)
{
    std::vector<std::uint64_t> offsets;
    std::uint64_t alignment = 32;
    const std::vector<std::byte> header
        = detail::gguf_build_header(metadata, tensors, offsets, alignment, path.string());
    atomic_file f(path);
    f.write(header);
    static constexpr std::byte zeros[256] = {};
    for (std::size_t i = 0; i < tensors.size(); ++i) {
        const auto& t = tensors[i];
        std::vector<std::byte> made;
        std::span<const std::byte> b = t.bytes;
        if (t.produce) {
            made = t.produce();
            const std::uint64_t want = (i + 1 < tensors.size() ? offsets[i + 1] : ~std::uint64_t(0)) - offsets[i];
            const auto tr = *ggml_type_info(static_cast<std::uint32_t>(t.type));
            std::uint64_t n = 1;
            for (auto d : t.ne)
                n *= d;
            detail::check(made.size() == n / tr.block * tr.bytes && made.size() <= want, path.string(), ": tensor '",
                t.name, "': produced ", made.size(), " bytes, needs ", n / tr.block * tr.bytes);
            b = made;
        }
        f.write(b);
        for (std::uint64_t pad = (alignment - b.size() % alignment) % alignment; pad > 0;) {
            const std::size_t n = std::size_t(std::min<std::uint64_t>(pad, sizeof zeros));
            f.write(std::span<const std::byte>(zeros, n));
            pad -= n;
        }
    }
    f.commit();
}

} // namespace kdial::io
