// Per-arch kernel tables for the tests: the expert kernels (linear,
// swiglu_gate_up) and the widening loads, instantiated for one xsimd arch
// per translation unit in tests/kernels/arch/ (each compiled with that
// arch's -m flags, see tests/CMakeLists.txt), so the SSE4.2, AVX2 and
// AVX-512 paths are all built on x86 and each runs where the CPU has it.
// The tables are constant-initialised data: no code of an arch TU runs
// unless the test picked its arch after asking the CPU.
#pragma once

#include <kdial/kernels/linear.hpp>
#include <kdial/simd/convert.hpp>

#include <cstddef>
#include <vector>

namespace kdial::test {

template <weight_type W> struct arch_fns {
    using S = typename W::storage;
    void (*linear)(const weight_view<W>&, cmatrix_view<float>, std::size_t, std::size_t, matrix_view<float>) noexcept;
    void (*gate_up)(const weight_view<W>&, const weight_view<W>&, cmatrix_view<float>, std::size_t, std::size_t,
        matrix_view<float>) noexcept;
    // out[0:lanes] = simd::load_weights<Arch>(row, k)
    void (*load)(const S* row, std::size_t k, float* out) noexcept;
    // linear / swiglu_gate_up with act_mode::int8 (kernels/qdot.hpp).
    void (*linear_int8)(
        const weight_view<W>&, cmatrix_view<float>, std::size_t, std::size_t, matrix_view<float>) noexcept;
    void (*gate_up_int8)(const weight_view<W>&, const weight_view<W>&, cmatrix_view<float>, std::size_t, std::size_t,
        matrix_view<float>) noexcept;
};

struct arch_kernels {
    const char* name; // Arch::name()
    std::size_t lanes; // f32 lanes
    arch_fns<f32_t> f32;
    arch_fns<bf16_t> bf16;
    arch_fns<f16_t> f16;
    arch_fns<q8_t> q8;
    arch_fns<q4_0_t> q4_0;
    arch_fns<q4_k_t> q4_k;

    template <weight_type W> constexpr const arch_fns<W>& get() const noexcept
    {
        if constexpr (std::is_same_v<W, f32_t>)
            return f32;
        else if constexpr (std::is_same_v<W, bf16_t>)
            return bf16;
        else if constexpr (std::is_same_v<W, f16_t>)
            return f16;
        else if constexpr (std::is_same_v<W, q8_t>)
            return q8;
        else if constexpr (std::is_same_v<W, q4_0_t>)
            return q4_0;
        else
            return q4_k;
    }
};

template <class Arch, class S> void load_into(const S* row, std::size_t k, float* out) noexcept
{
    simd::load_weights<Arch>(row, k).store_unaligned(out);
}

template <class Arch, weight_type W, act_mode A>
void linear_as(
    const weight_view<W>& w, cmatrix_view<float> x, std::size_t o0, std::size_t o1, matrix_view<float> y) noexcept
{
    kdial::linear<W, Arch>(w, x, o0, o1, y, A);
}
template <class Arch, weight_type W, act_mode A>
void gate_up_as(const weight_view<W>& g, const weight_view<W>& u, cmatrix_view<float> x, std::size_t f0, std::size_t f1,
    matrix_view<float> h) noexcept
{
    kdial::swiglu_gate_up<W, Arch>(g, u, x, f0, f1, h, A);
}

template <class Arch, weight_type W> constexpr arch_fns<W> make_arch_fns() noexcept
{
    return { &linear_as<Arch, W, act_mode::exact>, &gate_up_as<Arch, W, act_mode::exact>,
        &load_into<Arch, typename W::storage>, &linear_as<Arch, W, act_mode::int8>,
        &gate_up_as<Arch, W, act_mode::int8> };
}

template <class Arch> constexpr arch_kernels make_arch_kernels() noexcept
{
    return { Arch::name(), xsimd::batch<float, Arch>::size, make_arch_fns<Arch, f32_t>(), make_arch_fns<Arch, bf16_t>(),
        make_arch_fns<Arch, f16_t>(), make_arch_fns<Arch, q8_t>(), make_arch_fns<Arch, q4_0_t>(),
        make_arch_fns<Arch, q4_k_t>() };
}

// The tables of the arch TUs built for this target (defined there).
#if defined(__x86_64__) || defined(__i386__)
extern const arch_kernels kernels_sse4_2, kernels_fma3_avx2, kernels_avx512bw;
#elif defined(__aarch64__)
extern const arch_kernels kernels_neon64;
#endif

// Every arch whose table is built and which this CPU runs (asked at run
// time); on other targets, the default arch alone (defined in linear.cpp).
std::vector<const arch_kernels*> kernel_archs();

} // namespace kdial::test
