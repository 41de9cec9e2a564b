// The tensor type ids of GGUF files (ggml_type) with their names and block
// sizes: one table for the GGUF reader (io/gguf.hpp) and the weight binder
// (kernels/gguf_weight.hpp). Sizes as ggml defines them.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace kdial {

// Tensor types (ggml_type ids). Ids 4, 5 and 31-33, 36-38 were removed from
// ggml and are unknown here.
enum class ggml_type : std::uint32_t {
    f32 = 0,
    f16 = 1,
    q4_0 = 2,
    q4_1 = 3,
    q5_0 = 6,
    q5_1 = 7,
    q8_0 = 8,
    q8_1 = 9,
    q2_k = 10,
    q3_k = 11,
    q4_k = 12,
    q5_k = 13,
    q6_k = 14,
    q8_k = 15,
    iq2_xxs = 16,
    iq2_xs = 17,
    iq3_xxs = 18,
    iq1_s = 19,
    iq4_nl = 20,
    iq3_s = 21,
    iq2_s = 22,
    iq4_xs = 23,
    i8 = 24,
    i16 = 25,
    i32 = 26,
    i64 = 27,
    f64 = 28,
    iq1_m = 29,
    bf16 = 30,
    tq1_0 = 34,
    tq2_0 = 35,
    mxfp4 = 39,
};

// A tensor type's name, elements per block and bytes per block.
struct ggml_type_traits {
    std::string_view name;
    std::uint32_t block = 0; // elements per block (along ne[0])
    std::uint32_t bytes = 0; // bytes per block
};

// The traits of type id `id`, or nothing for an unknown id. Sizes: ggml's
// type table (K-quants: 256-element super-blocks).
inline constexpr std::optional<ggml_type_traits> ggml_type_info(std::uint32_t id) noexcept
{
    switch (id) {
    case 0:
        return ggml_type_traits { "F32", 1, 4 };
    case 1:
        return ggml_type_traits { "F16", 1, 2 };
    case 2:
        return ggml_type_traits { "Q4_0", 32, 18 };
    case 3:
        return ggml_type_traits { "Q4_1", 32, 20 };
    case 6:
        return ggml_type_traits { "Q5_0", 32, 22 };
    case 7:
        return ggml_type_traits { "Q5_1", 32, 24 };
    case 8:
        return ggml_type_traits { "Q8_0", 32, 34 };
    case 9:
        return ggml_type_traits { "Q8_1", 32, 36 };
    case 10:
        return ggml_type_traits { "Q2_K", 256, 84 };
    case 11:
        return ggml_type_traits { "Q3_K", 256, 110 };
    case 12:
        return ggml_type_traits { "Q4_K", 256, 144 };
    case 13:
        return ggml_type_traits { "Q5_K", 256, 176 };
    case 14:
        return ggml_type_traits { "Q6_K", 256, 210 };
    case 15:
        return ggml_type_traits { "Q8_K", 256, 292 };
    case 16:
        return ggml_type_traits { "IQ2_XXS", 256, 66 };
    case 17:
        return ggml_type_traits { "IQ2_XS", 256, 74 };
    case 18:
        return ggml_type_traits { "IQ3_XXS", 256, 98 };
    case 19:
        return ggml_type_traits { "IQ1_S", 256, 50 };
    case 20:
        return ggml_type_traits { "IQ4_NL", 32, 18 };
    case 21:
        return ggml_type_traits { "IQ3_S", 256, 110 };
    case 22:
        return ggml_type_traits { "IQ2_S", 256, 82 };
    case 23:
        return ggml_type_traits { "IQ4_XS", 256, 136 };
    case 24:
        return ggml_type_traits { "I8", 1, 1 };
    case 25:
        return ggml_type_traits { "I16", 1, 2 };
    case 26:
        return ggml_type_traits { "I32", 1, 4 };
    case 27:
        return ggml_type_traits { "I64", 1, 8 };
    case 28:
        return ggml_type_traits { "F64", 1, 8 };
    case 29:
        return ggml_type_traits { "IQ1_M", 256, 56 };
    case 30:
        return ggml_type_traits { "BF16", 1, 2 };
    case 34:
        return ggml_type_traits { "TQ1_0", 256, 54 };
    case 35:
        return ggml_type_traits { "TQ2_0", 256, 66 };
    case 39:
        return ggml_type_traits { "MXFP4", 32, 17 };
    default:
        return std::nullopt;
    }
}
inline constexpr std::string_view ggml_type_name(ggml_type t) noexcept
{
    const auto i = ggml_type_info(static_cast<std::uint32_t>(t));
    return i ? i->name : std::string_view("?");
}

} // namespace kdial
