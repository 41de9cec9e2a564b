// Top-k selection (stage 1, route): the k largest of E keys, for a fixed or
// a dynamic k through one implementation. Output order is specified:
// descending key, ties broken by the lower expert id. Insertion into the
// caller's k-long output, so it allocates nothing; with fixed_k the loops
// have constant trip counts. Keys must not be NaN (the router rejects
// non-finite logits at its edge).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../core/extent.hpp"

namespace kdial {

// ids[0..k) <- the experts with the k largest key[e], e in [0, E); keys[0..k)
// <- their keys. Requires 1 <= k <= E. Cost O(E + k * inserted).
template <k_extent K>
inline void select_topk(const float* key, int num_experts, K k, std::int32_t* ids, float* keys) noexcept
{
    const int kk = k.value();
    KDIAL_ASSERT(kk >= 1 && kk <= num_experts);
    // Seed with the first k experts, sorted (insertion keeps ties by id).
    int filled = 0;
    auto insert = [&](int e, float v, int n) {
        // Insert (e, v) into the sorted prefix of length n (n < kk or the
        // last entry is being evicted); strict > keeps lower ids first.
        int pos = n;
        while (pos > 0 && v > keys[pos - 1]) {
            if (pos < kk) {
                keys[pos] = keys[pos - 1];
                ids[pos] = ids[pos - 1];
            }
            --pos;
        }
        keys[pos] = v;
        ids[pos] = static_cast<std::int32_t>(e);
    };
    for (int e = 0; e < kk; ++e)
        insert(e, key[e], filled++);
    for (int e = kk; e < num_experts; ++e) {
        const float v = key[e];
        if (v > keys[kk - 1])
            insert(e, v, kk);
    }
}

} // namespace kdial
