// safetensors writing: the layout of the reference writer, for synthetic checkpoints and tests.
// Stage: io (the producer side of safetensors.hpp; make-synthetic and tests use it).
// Invariants: header keys sorted, JSON padded with spaces so the data area
// starts 8-byte aligned, tensors laid out by descending dtype size then name
// (each tensor aligned to its element size); inputs are validated before a
// byte is written; files are written atomically (io/file.hpp).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "file.hpp"
#include "safetensors.hpp"

namespace kdial::io {

// One tensor to write: bytes must be numel(shape) x st_dtype_size(dtype) long,
// little-endian, row-major. The bytes are referenced, not copied.
struct tensor_data {
    std::string name;
    st_dtype dtype = st_dtype::f32;
    std::vector<std::size_t> shape;
    std::span<const std::byte> bytes;
};

// Typed shorthands: F32 from floats, BF16 from bf16 values.
inline tensor_data make_tensor(std::string name, std::vector<std::size_t> shape, std::span<const float> values)
{
    return { std::move(name), st_dtype::f32, std::move(shape), std::as_bytes(values) };
}
inline tensor_data make_tensor(std::string name, std::vector<std::size_t> shape, std::span<const bf16> values)
{
    return { std::move(name), st_dtype::bf16, std::move(shape), std::as_bytes(values) };
}

namespace detail {

// Validates the tensors and returns the header bytes (8-byte length + padded
// JSON) and the write order of the tensors (indices into `tensors`).
inline std::vector<std::byte> st_build_header(std::span<const tensor_data> tensors,
    const std::map<std::string, std::string>& metadata, std::vector<std::size_t>& order, std::string_view file_name)
{
    order.resize(tensors.size());
    for (std::size_t i = 0; i < order.size(); ++i)
        order[i] = i;
    std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
        const std::size_t sa = st_dtype_size(tensors[a].dtype), sb = st_dtype_size(tensors[b].dtype);
        return sa != sb ? sa > sb : tensors[a].name < tensors[b].name;
    });

    nlohmann::json header = nlohmann::json::object();
    if (!metadata.empty())
        header["__metadata__"] = metadata;
    std::size_t offset = 0;
    for (std::size_t i : order) {
        const tensor_data& t = tensors[i];
        check(t.name != "__metadata__", file_name, ": a tensor cannot be named __metadata__");
        check(!header.contains(t.name), file_name, ": tensor '", t.name, "' given twice");
        std::size_t numel = 1;
        for (std::size_t d : t.shape) {
            check(d == 0 || numel <= std::numeric_limits<std::size_t>::max() / d, file_name, ": tensor '", t.name,
                "': shape overflows the element count");
            numel *= d;
        }
        const std::size_t esize = st_dtype_size(t.dtype);
        check(esize != 0 && numel <= std::numeric_limits<std::size_t>::max() / esize, file_name, ": tensor '", t.name,
            "': bad dtype or byte count overflow");
        if (t.bytes.size() != numel * esize)
            throw error(cat(file_name, ": tensor '", t.name, "': ", t.bytes.size(), " bytes given, shape ",
                shape_str(t.shape), " x ", st_dtype_name(t.dtype), " needs ", numel * esize));
        header[t.name] = { { "dtype", std::string(st_dtype_name(t.dtype)) }, { "shape", t.shape },
            { "data_offsets", { offset, offset + t.bytes.size() } } };
        offset += t.bytes.size();
    }
    std::string text;
    try {
        text = header.dump();
    } catch (const nlohmann::json::exception& e) { // a name or metadata string that is not UTF-8
        throw error(cat(file_name, ": cannot encode the header: ", e.what()));
    }
    text.append((8 - text.size() % 8) % 8, ' ');
    std::vector<std::byte> out(8 + text.size());
    const std::uint64_t n = text.size();
    for (int i = 0; i < 8; ++i)
        out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xffu);
    std::memcpy(out.data() + 8, text.data(), text.size());
    return out;
}

} // namespace detail

// The whole file image in memory (tests, fuzz seeds, small files).
inline std::vector<std::byte> encode_safetensors(
    std::span<const tensor_data> tensors, const std::map<std::string, std::string>& metadata = {})
{
    std::vector<std::size_t> order;
    std::vector<std::byte> out = detail::st_build_header(tensors, metadata, order, "encode_safetensors");
    for (std::size_t i : order)
        out.insert(out.end(), tensors[i].bytes.begin(), tensors[i].bytes.end());
    return out;
}

// Writes a safetensors file, streaming the tensor bytes (no full copy in
// memory), atomically: "<path>.partial", checked writes, fsync, rename.
inline void write_safetensors(const std::filesystem::path& path, std::span<const tensor_data> tensors,
    const std::map<std::string, std::string>& metadata = {})
{
    const std::string name = path.string();
    std::vector<std::size_t> order;
    const std::vector<std::byte> header = detail::st_build_header(tensors, metadata, order, name);

    atomic_file f(path);
    f.write(header);
    for (std::size_t i : order)
        f.write(tensors[i].bytes);
    f.commit();
}

} // namespace kdial::io
