// Top-k selection against a stable sort, ties, fixed vs dynamic k.
#include <doctest/doctest.h>
#include <kdial/routing/topk.hpp>

#include "test_util.hpp"

#include <algorithm>
#include <numeric>
#include <vector>

using namespace kdial;

namespace {
std::vector<int> sorted_ids(const std::vector<float>& key)
{
    std::vector<int> order(key.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key[a] > key[b]; });
    return order;
}
} // namespace

TEST_CASE("select_topk: every k matches a stable descending sort [routing][topk]")
{
    for (int E : { 1, 2, 7, 8, 60, 64, 128, 256 }) {
        for (int trial = 0; trial < 3; ++trial) {
            auto key = test::random_normal(std::size_t(E), 1000u * E + trial);
            if (trial == 2) // quantise to force many ties
                for (auto& v : key)
                    v = std::round(v * 2.0f) / 2.0f;
            const auto order = sorted_ids(key);
            for (int k = 1; k <= E; ++k) {
                std::vector<std::int32_t> ids(k);
                std::vector<float> vals(k);
                select_topk(key.data(), E, dynamic_k { k }, ids.data(), vals.data());
                for (int j = 0; j < k; ++j) {
                    REQUIRE_MESSAGE(ids[j] == order[j], "E=", E, " k=", k, " j=", j);
                    REQUIRE(vals[j] == key[order[j]]);
                }
            }
        }
    }
}

TEST_CASE("select_topk: fixed_k and dynamic_k give the same ids [routing][topk]")
{
    const auto key = test::random_normal(64, 7);
    auto run = [&](auto k) {
        std::vector<std::int32_t> ids(k.value());
        std::vector<float> v(k.value());
        select_topk(key.data(), 64, k, ids.data(), v.data());
        return ids;
    };
    CHECK(run(fixed_k<1> {}) == run(dynamic_k { 1 }));
    CHECK(run(fixed_k<2> {}) == run(dynamic_k { 2 }));
    CHECK(run(fixed_k<4> {}) == run(dynamic_k { 4 }));
    CHECK(run(fixed_k<8> {}) == run(dynamic_k { 8 }));
}

TEST_CASE("select_topk: ties go to the lower expert id, negatives and equal keys [routing][topk]")
{
    const std::vector<float> key { -1.0f, -0.5f, -0.5f, -2.0f, -0.5f, -0.25f };
    std::vector<std::int32_t> ids(4);
    std::vector<float> v(4);
    select_topk(key.data(), 6, fixed_k<4> {}, ids.data(), v.data());
    CHECK(ids == std::vector<std::int32_t> { 5, 1, 2, 4 });
    const std::vector<float> flat(9, 3.0f);
    std::vector<std::int32_t> ids9(9);
    std::vector<float> v9(9);
    select_topk(flat.data(), 9, dynamic_k { 9 }, ids9.data(), v9.data());
    CHECK(ids9 == std::vector<std::int32_t> { 0, 1, 2, 3, 4, 5, 6, 7, 8 });
}
