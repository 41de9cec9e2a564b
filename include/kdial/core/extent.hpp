// k, the number of experts per token, as an extent (in the spirit of
// std::span's extent): fixed_k<N> bakes k into the code, dynamic_k carries it
// at run time. Every primitive takes a k_extent and runs one implementation
// for both; with_k() is the one deliberate bridge from a runtime k to a fixed
// specialisation for a short list of common values.
#pragma once

#include <concepts>
#include <cstddef>
#include <type_traits>

#include "error.hpp"

namespace kdial {

// Largest expert count the library accepts (sizes small stack scratch in the
// router). Real models use 8..256.
inline constexpr int max_experts = 1024;

// k known at compile time. value() is constexpr and max_value == N, so loops
// to value() unroll and scratch sized by max_value lives in registers.
template <int N> struct fixed_k {
    static_assert(N >= 1 && N <= max_experts, "fixed_k<N>: N must be in [1, max_experts]");
    static constexpr int max_value = N;
    static constexpr bool is_fixed = true;
    constexpr fixed_k() = default;
    static constexpr int value() noexcept { return N; }
};

// k known at run time; its static bound is the largest expert count.
struct dynamic_k {
    static constexpr int max_value = max_experts;
    static constexpr bool is_fixed = false;
    constexpr explicit dynamic_k(int k) noexcept
        : k_(k)
    {
    }
    constexpr int value() const noexcept { return k_; }

private:
    int k_;
};

// What the primitives ask of a k: a value usable as a size and a static bound.
template <class K>
concept k_extent = requires(const K k)
{
    {
        k.value()
        } -> std::convertible_to<int>;
    {
        K::max_value
        } -> std::convertible_to<int>;
    {
        K::is_fixed
        } -> std::convertible_to<bool>;
}
&&(K::max_value >= 1);

// Validates k against the expert count at the edge.
template <k_extent K> inline void check_k(K k, int num_experts, const char* where)
{
    detail::check(num_experts >= 1 && num_experts <= max_experts, where, ": expert count E = ", num_experts,
        " outside [1, ", max_experts, "]");
    detail::check(
        k.value() >= 1 && k.value() <= num_experts, where, ": k = ", k.value(), " outside [1, E = ", num_experts, "]");
}

// The k values with_k() specialises at compile time. Everything else runs
// through dynamic_k. Kept short on purpose: each entry instantiates every
// kernel the visitor reaches.
template <int... Ks> struct k_list {
};
using default_fixed_ks = k_list<1, 2, 4, 8>;

namespace detail {
template <class F, int K0, int... Ks> decltype(auto) with_k_impl(int k, F&& f, k_list<K0, Ks...>)
{
    if (k == K0)
        return std::forward<F>(f)(fixed_k<K0> {});
    if constexpr (sizeof...(Ks) > 0)
        return with_k_impl(k, std::forward<F>(f), k_list<Ks...> {});
    else
        return std::forward<F>(f)(dynamic_k { k });
}
} // namespace detail

// Calls f(fixed_k<k>{}) when k is in List, else f(dynamic_k{k}).
// Both branches must return the same type.
template <class List = default_fixed_ks, class F> decltype(auto) with_k(int k, F&& f)
{
    return detail::with_k_impl(k, std::forward<F>(f), List {});
}

} // namespace kdial
