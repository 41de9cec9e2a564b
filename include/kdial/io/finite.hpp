// Checks a checkpoint's floating-point tensors for non-finite values (NaN,
// +-inf) before they are used: the error names the shard, the tensor, the
// element (flat index and index per dimension) and the value, where a NaN
// found later in the forward pass could only name a layer.
// Stage: io (olmoe --check-weights). Reads every float tensor once, in name
// order (the first bad tensor reported is the same on every run); integer
// and 8-bit float tensors are skipped.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../kernels/finite.hpp"
#include "safetensors.hpp"

namespace kdial::io {

namespace detail {

inline std::optional<float_format> float_format_of(st_dtype t) noexcept
{
    switch (t) {
    case st_dtype::f16:
        return float_format::f16;
    case st_dtype::bf16:
        return float_format::bf16;
    case st_dtype::f32:
        return float_format::f32;
    case st_dtype::f64:
        return float_format::f64;
    default:
        return std::nullopt;
    }
}

// The value of element i of t as a double (t holds a float format).
inline double element_value(const tensor_info& t, std::size_t i)
{
    const std::byte* p = t.bytes.data() + i * st_dtype_size(t.dtype);
    std::uint16_t h = 0;
    std::uint32_t u = 0;
    std::uint64_t w = 0;
    switch (t.dtype) {
    case st_dtype::f16:
        std::memcpy(&h, p, 2);
        return half_to_float(h);
    case st_dtype::bf16:
        std::memcpy(&h, p, 2);
        return std::bit_cast<float>(std::uint32_t(h) << 16);
    case st_dtype::f32:
        std::memcpy(&u, p, 4);
        return std::bit_cast<float>(u);
    default:
        std::memcpy(&w, p, 8);
        return std::bit_cast<double>(w);
    }
}

inline std::string index_str(const std::vector<std::size_t>& shape, std::size_t flat)
{
    std::vector<std::size_t> idx(shape.size());
    for (std::size_t d = shape.size(); d-- > 0;) {
        idx[d] = shape[d] ? flat % shape[d] : 0;
        flat = shape[d] ? flat / shape[d] : 0;
    }
    std::string s = "[";
    for (std::size_t d = 0; d < idx.size(); ++d)
        s += (d ? ", " : "") + std::to_string(idx[d]);
    return s + "]";
}

} // namespace detail

// Index of the first non-finite element of a float tensor (F16, BF16, F32,
// F64), or nothing when all are finite or the dtype is not a float format.
inline std::optional<std::size_t> find_non_finite(const tensor_info& t) noexcept
{
    const auto fmt = detail::float_format_of(t.dtype);
    if (!fmt)
        return std::nullopt;
    const std::size_t n = t.numel();
    const std::size_t i = first_non_finite(t.bytes.data(), n, *fmt);
    return i < n ? std::optional<std::size_t>(i) : std::nullopt;
}

// Throws kdial::error at the first non-finite element of the checkpoint's
// tensors (name order), e.g. "dir/model.safetensors: tensor 'lm_head.weight'
// element 1234 [9, 82] is nan". progress(done, total) counts tensors.
inline void check_finite(
    const safetensors_checkpoint& ck, const std::function<void(std::size_t, std::size_t)>& progress = {})
{
    const auto names = ck.names();
    for (std::size_t k = 0; k < names.size(); ++k) {
        const tensor_ref r = ck.find(names[k]);
        if (const auto i = find_non_finite(*r.info))
            throw error(::kdial::detail::cat(r.file->name(), ": tensor '", r.info->name, "' element ", *i, " ",
                detail::index_str(r.info->shape, *i), " is ", detail::element_value(*r.info, *i),
                " (non-finite weight)"));
        if (progress)
            progress(k + 1, names.size());
    }
}

} // namespace kdial::io
