// GGUF tensor data -> a kdial weight (load time, before stage 3): the one
// entry point a GGUF loader calls for every weight matrix. F32, F16, BF16,
// Q8_0, Q4_0 and Q4_K run in place (a view into the mapped file, no copy);
// Q5_K and Q6_K are repacked once into q8 (GGUF Q8_0 blocks of 32, owned by
// the result). Any other type is a clear error naming the tensor and type.
//
// Why Q4_K in place rather than repacked to q8: in place it streams
// 0.5625 B/weight against q8's 1.0625 (1.9x fewer bytes) and keeps the
// file's exact values (a repack adds the q8 rounding below). Measured
// (bench/bench_experts.cpp, one OLMoE expert d = 2048, F = 1024, decode
// n = 1, one thread, CPU time per expert on a loaded 2.1 GHz Zen 4 VM where
// even q8 decode is compute-bound): AVX-512 q4_k 0.50 ms vs q8 0.53 ms;
// AVX2 q4_k 0.69 ms vs q8 0.58 ms (the 4-bit unpacking costs more
// instructions than the 8-bit widening). Where decode is bandwidth-bound
// (several threads sharing the memory bus) the byte count decides, so in
// place is the default; repack_q4_k = true gives the q8 option.
//
// Repack error bound (Q5_K, Q6_K -> q8): each block of 32 values v (the
// file's exact values, core/blocks.hpp) becomes q8 with
// |v - q8| <= max|v_block| / 225 (+ 2^-18 when the q8 scale is an f16
// subnormal, max|v_block| < 0.0078), the bound of kernels/quantize.hpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "../core/blocks.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/ggml_types.hpp"
#include "dense.hpp"
#include "quantize.hpp"
#include "weights.hpp"

namespace kdial {

// A type id's name ("Q4_K"), or "type N" for an id ggml does not define.
inline std::string ggml_type_name(std::uint32_t t)
{
    if (const auto i = ggml_type_info(t))
        return std::string(i->name);
    return detail::cat("type ", t);
}

// Elements per block and bytes per block of the types to_weight accepts
// (block_elems = 0: a type kdial does not read).
struct ggml_block_size {
    std::size_t elems = 0, bytes = 0;
};
inline ggml_block_size ggml_block_of(std::uint32_t t) noexcept
{
    switch (static_cast<ggml_type>(t)) {
    case ggml_type::f32:
        return { 1, 4 };
    case ggml_type::f16:
    case ggml_type::bf16:
        return { 1, 2 };
    case ggml_type::q8_0:
        return { 32, sizeof(q8_block) };
    case ggml_type::q4_0:
        return { 32, sizeof(q4_0_block) };
    case ggml_type::q4_k:
        return { qk_k, sizeof(q4_k_block) };
    case ggml_type::q5_k:
        return { qk_k, sizeof(q5_k_block) };
    case ggml_type::q6_k:
        return { qk_k, sizeof(q6_k_block) };
    default:
        return {};
    }
}

// A weight as the kernels take it: a view into the file's bytes, or (when
// repacked) into `owned`, which the result keeps alive. Move-only: the view
// points into `owned`.
struct gguf_weight {
    any_weight_view view;
    std::unique_ptr<q8_block[]> owned; // null when in place
    bool repacked() const noexcept { return owned != nullptr; }
};

namespace detail {
// rows x cols values of block format Block (cols % 256 == 0) into q8 rows.
template <class Block>
inline std::unique_ptr<q8_block[]> repack_q8(
    const Block* src, std::size_t rows, std::size_t cols, std::string_view name)
{
    const std::size_t nb = cols / q8_block_size, sb = cols / qk_k;
    auto out = std::make_unique<q8_block[]>(rows * nb);
    float buf[q8_block_size];
    for (std::size_t r = 0; r < rows; ++r)
        for (std::size_t b = 0; b < nb; ++b) {
            const Block& blk = src[r * sb + b * q8_block_size / qk_k];
            for (std::size_t i = 0; i < q8_block_size; ++i)
                buf[i] = block_value(blk, (b * q8_block_size) % qk_k + i);
            check(quantize_block(buf, q8_block_size, out[r * nb + b]), "tensor '", name, "': row ", r, " columns [",
                b * q8_block_size, ", ", (b + 1) * q8_block_size,
                ") hold a non-finite value or one beyond the q8 range");
        }
    return out;
}
} // namespace detail

// The kdial weight [rows, cols] for a GGUF tensor of ggml type `type` whose
// data is `bytes` (cols = the tensor's innermost dimension ne[0], rows = the
// product of the others; a stacked expert tensor [E, F, d] is rows = E F).
// In place for F32, F16, BF16, Q8_0, Q4_0, Q4_K; repacked to q8 for Q5_K
// and Q6_K. Throws kdial::error naming the tensor for an unsupported type,
// a row length that is not a multiple of the type's block, a byte count
// that does not match, or data misaligned for its element type. With
// repack_q4_k, Q4_K is repacked to q8 as well (to compare the two options).
inline gguf_weight to_weight(std::uint32_t type, std::span<const std::byte> bytes, std::size_t rows, std::size_t cols,
    std::string_view name, bool repack_q4_k = false)
{
    const ggml_block_size bs = ggml_block_of(type);
    detail::check(bs.elems != 0, "tensor '", name, "' has GGUF type ", ggml_type_name(type),
        ", which kdial does not read (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K)");
    detail::check(cols % bs.elems == 0, "tensor '", name, "' (", ggml_type_name(type), ") has rows of ", cols,
        " values, not a multiple of its block of ", bs.elems);
    const std::size_t per_row = cols / bs.elems;
    detail::check(per_row == 0 || rows <= bytes.size() / bs.bytes / per_row, "tensor '", name, "' (",
        ggml_type_name(type), ") [", rows, ", ", cols, "] needs more than the ", bytes.size(), " bytes given");
    detail::check(rows * per_row * bs.bytes == bytes.size(), "tensor '", name, "' (", ggml_type_name(type), ") [", rows,
        ", ", cols, "] needs ", rows * per_row * bs.bytes, " bytes, ", bytes.size(), " given");
    const auto* p = bytes.data();
    const auto align = reinterpret_cast<std::uintptr_t>(p) % (bs.elems == 1 ? bs.bytes : 1);
    detail::check(
        align == 0, "tensor '", name, "' (", ggml_type_name(type), ") data is not aligned to ", bs.bytes, " bytes");
    gguf_weight w;
    switch (static_cast<ggml_type>(type)) {
    case ggml_type::f32:
        w.view = weight_view<f32_t>(reinterpret_cast<const float*>(p), rows, cols);
        break;
    case ggml_type::f16:
        w.view = weight_view<f16_t>(reinterpret_cast<const f16*>(p), rows, cols);
        break;
    case ggml_type::bf16:
        w.view = weight_view<bf16_t>(reinterpret_cast<const bf16*>(p), rows, cols);
        break;
    case ggml_type::q8_0:
        w.view = weight_view<q8_t>(reinterpret_cast<const q8_block*>(p), rows, cols);
        break;
    case ggml_type::q4_0:
        w.view = weight_view<q4_0_t>(reinterpret_cast<const q4_0_block*>(p), rows, cols);
        break;
    case ggml_type::q4_k:
        if (repack_q4_k)
            w.owned = detail::repack_q8(reinterpret_cast<const q4_k_block*>(p), rows, cols, name);
        else
            w.view = weight_view<q4_k_t>(reinterpret_cast<const q4_k_block*>(p), rows, cols);
        break;
    case ggml_type::q5_k:
        w.owned = detail::repack_q8(reinterpret_cast<const q5_k_block*>(p), rows, cols, name);
        break;
    case ggml_type::q6_k:
        w.owned = detail::repack_q8(reinterpret_cast<const q6_k_block*>(p), rows, cols, name);
        break;
    default:
        break;
    }
    if (w.owned)
        w.view = weight_view<q8_t>(w.owned.get(), rows, cols);
    return w;
}

} // namespace kdial
