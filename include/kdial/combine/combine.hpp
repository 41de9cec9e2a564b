// Combine (stage 4): out[t] = sum_j w[t, j] * Y[slot(t, j)], summed in
// ascending j (top-k rank order, one fused multiply-add per term), then
// + sigmoid(g[t]) * S[t] for an always-on shared expert (Qwen1.5-MoE).
// Dropped assignments (slot -1) add nothing; a token with none gets 0 (plus
// the shared term). With combine_mode::accumulate the sum is added to what
// `out` holds (out += MoE, for a residual stream), giving exactly the bits
// of overwriting a scratch row and adding it. Deterministic and parallel
// over tiles of tokens: each output row has one writer. No allocation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <span>

#include "../core/error.hpp"
#include "../core/views.hpp"
#include "../dispatch/plan.hpp"
#include "../parallel/for_each.hpp"
#include "../simd/vec.hpp"

namespace kdial {

// The optional shared-expert term of combine.
struct shared_expert_term {
    cmatrix_view<float> output {}; // [T, d] the shared expert's output S
    std::span<const float> gate_logits {}; // [T] g; the term is sigmoid(g[t]) * S[t]; empty -> factor 1
    bool present() const noexcept { return output.data != nullptr; }
};

// Whether an MoE output replaces `out` or is added to it.
enum class combine_mode {
    overwrite, // out = MoE(X)
    accumulate, // out += MoE(X), rounded as out + (MoE(X) rounded to f32)
};

// Combines the experts' outputs back into token order.
//   weights [T, k]            routing weights (the plan's T and k)
//   Y       [>= slots, d]     expert outputs in slot order
//   out     [T, d]            out (overwritten, or added to)
template <class Arch = xsimd::default_arch>
void combine(const dispatch_plan& plan, cmatrix_view<float> weights, cmatrix_view<float> Y, matrix_view<float> out,
    const shared_expert_term& shared = {}, combine_mode mode = combine_mode::overwrite,
    executor_ref ex = default_executor {})
{
    constexpr const char* where = "kdial::combine";
    const std::size_t T = plan.tokens(), k = plan.k(), d = out.cols;
    detail::check_shape(weights, T, k, where, "weights");
    detail::check(Y.rows >= plan.num_slots() && Y.cols == d, where, ": Y has shape [", Y.rows, ", ", Y.cols,
        "], needs at least [", plan.num_slots(), ", ", d, "]");
    detail::check_shape(out, T, d, where, "out");
    if (shared.present()) {
        detail::check_shape(shared.output, T, d, where, "shared expert output");
        detail::check(shared.gate_logits.empty() || shared.gate_logits.size() == T, where, ": shared expert gate has ",
            shared.gate_logits.size(), " entries, expected T = ", T);
    }
    if (d == 0)
        return;
    const std::size_t tile = parallel::tile_items((k + 1) * d * sizeof(float));
    // Columns in chunks of 256 (a multiple of every vector width, so each
    // element takes the same vector or scalar-tail path as in one pass over
    // the row): the sum of a chunk is built in a 1 KiB stack buffer, then
    // stored or added.
    constexpr std::size_t chunk = 256;
    parallel::for_each_tile(ex, T, tile, [&](std::size_t t0, std::size_t t1) {
        alignas(64) float acc[chunk];
        for (std::size_t t = t0; t < t1; ++t) {
            float* o = out.row(t);
            const float g = !shared.present() || shared.gate_logits.empty()
                ? 1.0f
                : 1.0f / (1.0f + std::exp(-shared.gate_logits[t]));
            for (std::size_t c0 = 0; c0 < d; c0 += chunk) {
                const std::size_t n = std::min(chunk, d - c0);
                std::memset(acc, 0, n * sizeof(float));
                for (std::size_t j = 0; j < k; ++j) {
                    const std::int32_t s = plan.slot_of(t, j);
                    if (s < 0)
                        continue;
                    simd::axpy<Arch>(weights(t, j), Y.row(static_cast<std::size_t>(s)) + c0, acc, n);
                }
                if (shared.present())
                    simd::axpy<Arch>(g, shared.output.row(t) + c0, acc, n);
                if (mode == combine_mode::accumulate)
                    for (std::size_t i = 0; i < n; ++i)
                        o[c0 + i] += acc[i];
                else
                    std::memcpy(o + c0, acc, n * sizeof(float));
            }
        }
    });
}

} // namespace kdial
