// Plain references for routing, dispatch and combine: simple loops and a
// std::stable_sort, no SIMD, no threads. Scores come from kdial's scoring
// (tested on its own against a double-precision softmax), so selection,
// bias, renormalisation and ordering can be compared bit for bit.
#pragma once

#include <kdial/routing/router.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace kdial::ref {

struct routing {
    std::vector<std::int32_t> ids; // [T, k]
    std::vector<float> weights; // [T, k]
};

// One token's scores [E] and the experts ranked by score + selection bias
// (a stable sort: ties keep the lower id first).
struct ranking {
    std::vector<float> scores;
    std::vector<int> order;
};

inline ranking rank(const float* logits_row, int E, const router_options& opt)
{
    ranking r { std::vector<float>(logits_row, logits_row + E), std::vector<int>(std::size_t(E)) };
    score_inplace(opt.score, r.scores.data(), r.scores.size());
    std::vector<float> key = r.scores;
    if (!opt.selection_bias.empty())
        for (int e = 0; e < E; ++e)
            key[e] = r.scores[e] + opt.selection_bias[e];
    std::iota(r.order.begin(), r.order.end(), 0);
    std::stable_sort(r.order.begin(), r.order.end(), [&](int a, int b) { return key[a] > key[b]; });
    return r;
}

inline routing route(const std::vector<float>& logits, std::size_t T, int E, int k, const router_options& opt)
{
    routing r;
    r.ids.resize(T * std::size_t(k));
    r.weights.resize(T * std::size_t(k));
    for (std::size_t t = 0; t < T; ++t) {
        const auto [s, order] = rank(logits.data() + t * E, E, opt);
        float sum = 0.0f;
        for (int j = 0; j < k; ++j) {
            r.ids[t * k + j] = order[j];
            r.weights[t * k + j] = s[order[j]];
            sum += s[order[j]];
        }
        for (int j = 0; j < k; ++j) {
            float& w = r.weights[t * k + j];
            if (opt.renormalize)
                w *= 1.0f / (sum + 1e-20f);
            if (opt.scale != 1.0f)
                w *= opt.scale;
        }
    }
    return r;
}

// Double-precision softmax of one row.
inline std::vector<double> softmax(const float* x, std::size_t n)
{
    double m = x[0];
    for (std::size_t i = 1; i < n; ++i)
        m = std::max<double>(m, x[i]);
    std::vector<double> p(n);
    double s = 0;
    for (std::size_t i = 0; i < n; ++i)
        s += p[i] = std::exp(double(x[i]) - m);
    for (auto& v : p)
        v /= s;
    return p;
}

// out[t] = sum_j w[t,j] * y_j (fused multiply-adds in j order) + sigmoid(g[t]) * S[t].
// y_j for token t is ys(t, j) (a callable returning a row pointer or nullptr if dropped).
template <class RowOf>
std::vector<float> combine(std::size_t T, std::size_t k, std::size_t d, const std::vector<float>& w, RowOf ys,
    const float* shared, const float* gate)
{
    std::vector<float> out(T * d, 0.0f);
    for (std::size_t t = 0; t < T; ++t) {
        for (std::size_t j = 0; j < k; ++j) {
            const float* y = ys(t, j);
            if (!y)
                continue;
            for (std::size_t i = 0; i < d; ++i)
                out[t * d + i] = std::fma(w[t * k + j], y[i], out[t * d + i]);
        }
        if (shared) {
            const float g = gate ? 1.0f / (1.0f + std::exp(-gate[t])) : 1.0f;
            for (std::size_t i = 0; i < d; ++i)
                out[t * d + i] = std::fma(g, shared[t * d + i], out[t * d + i]);
        }
    }
    return out;
}

} // namespace kdial::ref
