// Next-token sampling for `olmoe serve`: greedy (temperature 0), or
// temperature with top-k and top-p (nucleus) filtering, drawn from a seeded
// generator so a request with a seed gets the same tokens every time it
// meets the same logits. Scratch buffers are sized once per slot (vocab),
// so sampling does not allocate per token.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <span>
#include <vector>

namespace olmoe::serve {

struct sampling_params {
    double temperature = 1.0; // 0: greedy
    double top_p = 1.0; // keep the smallest set of tokens whose probability reaches top_p
    int top_k = 0; // keep the top_k most likely tokens (0: all)
    std::uint64_t seed = 0;
};

class sampler {
public:
    sampler() = default;
    explicit sampler(std::size_t vocab)
        : idx_(vocab)
        , prob_(vocab)
    {
    }

    void reset(const sampling_params& p)
    {
        p_ = p;
        rng_.seed(p.seed);
    }

    // The next token for one row of logits. Ties go to the lowest id (as
    // olmoe::argmax). Deterministic: the same logits and seed give the same
    // token on every platform (a 53-bit uniform from mt19937_64, sums in
    // double in a fixed order).
    std::int32_t operator()(std::span<const float> logits)
    {
        if (p_.temperature <= 0.0)
            return std::int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
        const std::size_t V = logits.size();
        idx_.resize(V);
        prob_.resize(V);
        std::iota(idx_.begin(), idx_.end(), 0);
        // Candidates ordered by logit, descending, ties by id; only the
        // first n are kept (top-k), the rest are never sorted.
        auto by_logit = [&](std::int32_t a, std::int32_t b) {
            return logits[std::size_t(a)] > logits[std::size_t(b)]
                || (logits[std::size_t(a)] == logits[std::size_t(b)] && a < b);
        };
        std::size_t n = V;
        if (p_.top_k > 0 && std::size_t(p_.top_k) < V) {
            n = std::size_t(p_.top_k);
            std::partial_sort(idx_.begin(), idx_.begin() + std::ptrdiff_t(n), idx_.end(), by_logit);
        } else if (p_.top_p < 1.0)
            std::sort(idx_.begin(), idx_.end(), by_logit);
        else {
            // Plain temperature sampling: no order needed beyond the max.
            n = V;
        }
        double mx = -INFINITY;
        for (std::size_t i = 0; i < n; ++i)
            mx = std::max(mx, double(logits[std::size_t(idx_[i])]));
        double sum = 0;
        for (std::size_t i = 0; i < n; ++i) {
            prob_[i] = std::exp((double(logits[std::size_t(idx_[i])]) - mx) / p_.temperature);
            sum += prob_[i];
        }
        if (p_.top_p < 1.0) { // idx_ is sorted over [0, n) here
            double c = 0;
            std::size_t keep = 0;
            while (keep < n) {
                c += prob_[keep++] / sum;
                if (c >= p_.top_p)
                    break;
            }
            n = keep;
            sum = 0;
            for (std::size_t i = 0; i < n; ++i)
                sum += prob_[i];
        }
        const double u = double(rng_() >> 11) * 0x1.0p-53 * sum;
        double c = 0;
        for (std::size_t i = 0; i < n; ++i) {
            c += prob_[i];
            if (u < c)
                return idx_[i];
        }
        return idx_[n - 1]; // u rounded up to the total
    }

private:
    sampling_params p_;
    std::mt19937_64 rng_;
    std::vector<std::int32_t> idx_;
    std::vector<double> prob_;
};

} // namespace olmoe::serve
