// k as an extent: the concept, fixed and dynamic k, and the with_k bridge.
#include <doctest/doctest.h>
#include <kdial/core/extent.hpp>

#include <type_traits>

using namespace kdial;

static_assert(k_extent<fixed_k<1>>);
static_assert(k_extent<fixed_k<8>>);
static_assert(k_extent<dynamic_k>);
static_assert(!k_extent<int>, "a plain int is not an extent: callers say fixed_k or dynamic_k");
static_assert(!k_extent<float>);
static_assert(fixed_k<8>::value() == 8 && fixed_k<8>::max_value == 8);
static_assert(std::is_empty_v<fixed_k<4>>, "fixed_k carries no state");
static_assert(dynamic_k::max_value == max_experts);

TEST_CASE("with_k: maps 1, 2, 4, 8 to fixed_k and everything else to dynamic_k [core][extent]")
{
    for (int k = 1; k <= 16; ++k) {
        const auto [fixed, value] = with_k(k, [](auto kk) { return std::pair { decltype(kk)::is_fixed, kk.value() }; });
        CHECK(value == k);
        CHECK(fixed == (k == 1 || k == 2 || k == 4 || k == 8));
    }
    // A custom list.
    CHECK(with_k<k_list<3>>(3, [](auto kk) { return decltype(kk)::is_fixed; }));
    CHECK_FALSE(with_k<k_list<3>>(4, [](auto kk) { return decltype(kk)::is_fixed; }));
}

TEST_CASE("check_k: rejects k outside [1, E] with a message naming k and E [core][extent][errors]")
{
    CHECK_NOTHROW(check_k(dynamic_k { 4 }, 4, "here"));
    CHECK_THROWS_WITH_AS(check_k(dynamic_k { 0 }, 4, "here"), "here: k = 0 outside [1, E = 4]", kdial::error);
    CHECK_THROWS_WITH_AS(check_k(dynamic_k { 5 }, 4, "here"), "here: k = 5 outside [1, E = 4]", kdial::error);
    CHECK_THROWS_WITH_AS(check_k(fixed_k<8> {}, 7, "here"), "here: k = 8 outside [1, E = 7]", kdial::error);
    CHECK_THROWS_AS(check_k(dynamic_k { 1 }, 0, "here"), kdial::error);
    CHECK_THROWS_AS(check_k(dynamic_k { 1 }, max_experts + 1, "here"), kdial::error);
}
