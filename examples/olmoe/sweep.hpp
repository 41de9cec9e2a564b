// `olmoe sweep`: teacher-forced evaluation of several operating points (a
// global k, a per-layer schedule, threshold routing) over one token stream,
// the numbers a user reads to pick k (MoE-PHDS): perplexity and mean
// next-token log-likelihood; cross-sparsity agreement with a reference k
// (share of positions whose argmax matches, mean KL(ref || point)); active
// parameters per token; prefill and decode tokens/s measured in the same run.
// The text is cut into windows that fit the context; every window starts
// from an empty cache. All statistics are accumulated in double.
#pragma once

#include "model.hpp"
#include "runner.hpp"
#include "schedule.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <optional>
#include <string>
#include <vector>

namespace olmoe {

// One operating point: a k per layer, or threshold routing.
struct operating_point {
    std::string label; // "k=4", "4@0-7,2@8-15", "p=0.5"
    std::vector<int> k_per_layer; // [layers] (ignored with a threshold)
    std::optional<kdial::threshold_options> threshold; // per-token threshold routing

    route_spec spec() const { return route_spec { k_per_layer, threshold }; }
    int max_k() const
    {
        return threshold ? threshold->k_max : *std::max_element(k_per_layer.begin(), k_per_layer.end());
    }
};

struct sweep_options {
    std::size_t context = 1024; // window length (tokens per fresh cache)
    std::size_t decode_prompt = 16; // tokens prefilled before the timed decode
    std::size_t decode_tokens = 32; // teacher-forced single-token steps timed (the first is a warm-up)
};

struct point_result {
    operating_point point;
    std::size_t predicted = 0; // next-token predictions scored
    double mean_loglik = 0; // mean log p(next token), nats
    double perplexity = 0; // exp(-mean_loglik)
    double agreement = 0; // share of positions with argmax == the reference's
    double mean_kl = 0; // mean KL(ref || point), nats
    double experts_per_token = 0; // mean over tokens and MoE layers of experts used
    double active_expert_params = 0; // per token: sum over layers of experts used x params per expert
    double active_params = 0; // active_expert_params + the always-on parameters
    std::size_t prefill_tokens = 0;
    double prefill_s = 0; // teacher-forced prefill (logits at every position)
    std::size_t decode_steps = 0; // timed steps
    double decode_s = 0;
    double prefill_tok_s() const { return prefill_s > 0 ? double(prefill_tokens) / prefill_s : 0; }
    double decode_tok_s() const { return decode_s > 0 ? double(decode_steps) / decode_s : 0; }
    double decode_ms() const { return decode_steps ? 1e3 * decode_s / double(decode_steps) : 0; }
};

// log-softmax of one row in double.
inline void log_softmax(const float* x, std::size_t n, std::vector<double>& out)
{
    out.resize(n);
    double m = x[0];
    for (std::size_t i = 1; i < n; ++i)
        m = std::max(m, double(x[i]));
    double s = 0;
    for (std::size_t i = 0; i < n; ++i)
        s += std::exp(double(x[i]) - m);
    const double lse = m + std::log(s);
    for (std::size_t i = 0; i < n; ++i)
        out[i] = double(x[i]) - lse;
}

// KL(p || q) from log-probabilities.
inline double kl_divergence(const std::vector<double>& logp, const std::vector<double>& logq)
{
    double kl = 0;
    for (std::size_t i = 0; i < logp.size(); ++i)
        if (logp[i] > -745.0) // exp underflows to 0 below: the term is 0
            kl += std::exp(logp[i]) * (logp[i] - logq[i]);
    return std::max(0.0, kl);
}

inline std::size_t argmax_of(const std::vector<double>& v)
{
    return std::size_t(std::max_element(v.begin(), v.end()) - v.begin());
}

// Evaluates every point over tokens; `ref` is the reference point of the
// agreement columns (evaluated as its own pass, so a point equal to it
// checks determinism: agreement 1, KL 0). progress(fraction, what).
inline std::vector<point_result> run_sweep(model& m, const std::vector<std::int32_t>& tokens,
    const std::vector<operating_point>& points, const operating_point& ref, const sweep_options& o,
    const std::function<void(double, const std::string&)>& progress = {})
{
    using kdial::detail::check;
    const auto& c = m.config();
    const std::size_t V = std::size_t(c.vocab);
    check(tokens.size() >= 2, "sweep: the text has ", tokens.size(), " tokens, at least 2 are needed");
    check(o.context >= 2, "sweep: context ", o.context, " must be at least 2 tokens");
    const std::size_t W = std::min(o.context, tokens.size());
    std::vector<point_result> res(points.size());
    for (std::size_t i = 0; i < points.size(); ++i)
        res[i].point = points[i];
    std::vector<std::size_t> assignments(points.size(), 0), moe_tokens(points.size(), 0);
    int moe_layers = 0;
    for (int l = 0; l < c.layers; ++l)
        moe_layers += c.is_moe_layer(l);

    kv_cache cache(c, W);
    const std::size_t max_chunk = m.max_chunk();
    std::vector<float> logits(max_chunk * V);
    std::vector<float> ref_logits; // [W, V] the reference's logits in this window
    std::vector<std::int32_t> ref_arg;
    std::vector<double> lp, lq;
    std::vector<double> agree(points.size(), 0), kl(points.size(), 0), ll(points.size(), 0);

    const std::size_t windows = (tokens.size() + W - 1) / W;
    const std::size_t steps = windows * (points.size() + 1) + points.size();
    std::size_t step = 0;
    auto tick = [&](const std::string& what) {
        if (progress)
            progress(double(++step) / double(steps), what);
    };

    // Runs one point over a window; calls row(t, logits row) for every position.
    auto run_window = [&](const operating_point& p, std::size_t w0, std::size_t n, auto&& row, double& seconds,
                          std::size_t* assign, std::size_t* ntok) {
        cache.reset();
        const int kmax = p.max_k();
        const std::size_t chunk = std::min(max_chunk, chunk_for(m, std::span<const int>(&kmax, 1)));
        const auto spec = p.spec();
        for (std::size_t t0 = 0; t0 < n; t0 += chunk) {
            const std::size_t len = std::min(chunk, n - t0);
            const auto t_start = std::chrono::steady_clock::now();
            m.forward(std::span<const std::int32_t>(tokens.data() + w0 + t0, len), cache, spec,
                kdial::matrix_view<float>(logits.data(), len, V), true);
            seconds += seconds_since(t_start);
            if (assign) {
                *assign += m.last_assignments();
                *ntok += len;
            }
            for (std::size_t t = 0; t < len; ++t)
                row(t0 + t, logits.data() + t * V);
        }
    };

    for (std::size_t w = 0; w < windows; ++w) {
        const std::size_t w0 = w * W, n = std::min(W, tokens.size() - w0);
        // Reference pass.
        ref_logits.resize(n * V);
        ref_arg.resize(n);
        double ignore = 0;
        run_window(
            ref, w0, n,
            [&](std::size_t t, const float* x) {
                log_softmax(x, V, lp);
                ref_arg[t] = std::int32_t(argmax_of(lp));
                std::copy(x, x + V, ref_logits.begin() + std::ptrdiff_t(t * V));
            },
            ignore, nullptr, nullptr);
        tick("reference " + ref.label);
        for (std::size_t i = 0; i < points.size(); ++i) {
            auto& r = res[i];
            run_window(
                points[i], w0, n,
                [&](std::size_t t, const float* x) {
                    if (t + 1 >= n)
                        return; // the window's last token predicts nothing in it
                    log_softmax(x, V, lq);
                    ll[i] += lq[std::size_t(tokens[w0 + t + 1])];
                    agree[i] += argmax_of(lq) == std::size_t(ref_arg[t]);
                    // Recomputed from the stored logits, the same way as lq: a
                    // point whose logits equal the reference's has KL exactly 0.
                    log_softmax(ref_logits.data() + t * V, V, lp);
                    kl[i] += kl_divergence(lp, lq);
                    ++r.predicted;
                },
                r.prefill_s, &assignments[i], &moe_tokens[i]);
            r.prefill_tokens += n;
            tick(points[i].label);
        }
    }

    // Decode speed: prefill a short prompt (untimed), then teacher-forced
    // single-token steps, the first one a warm-up.
    const std::size_t P = std::min(o.decode_prompt, tokens.size() - 1);
    const std::size_t D = std::min(o.decode_tokens, tokens.size() - P);
    kv_cache dcache(c, P + D + 1);
    for (std::size_t i = 0; i < points.size(); ++i) {
        auto& r = res[i];
        const auto spec = points[i].spec();
        dcache.reset();
        const int kmax = points[i].max_k();
        const std::size_t chunk = std::min(max_chunk, chunk_for(m, std::span<const int>(&kmax, 1)));
        for (std::size_t t0 = 0; t0 < P; t0 += chunk) {
            const std::size_t len = std::min(chunk, P - t0);
            m.forward(std::span<const std::int32_t>(tokens.data() + t0, len), dcache, spec,
                kdial::matrix_view<float>(logits.data(), 1, V), false);
        }
        for (std::size_t s = 0; s < D; ++s) {
            const auto t_start = std::chrono::steady_clock::now();
            m.forward(std::span<const std::int32_t>(tokens.data() + P + s, 1), dcache, spec,
                kdial::matrix_view<float>(logits.data(), 1, V), false);
            const double dt = seconds_since(t_start);
            if (s > 0 || D == 1) {
                r.decode_s += dt;
                ++r.decode_steps;
            }
        }
        tick("decode " + points[i].label);
    }

    for (std::size_t i = 0; i < points.size(); ++i) {
        auto& r = res[i];
        const double n = double(std::max<std::size_t>(1, r.predicted));
        r.mean_loglik = ll[i] / n;
        r.perplexity = std::exp(-r.mean_loglik);
        r.agreement = agree[i] / n;
        r.mean_kl = kl[i] / n;
        const double per_tok = moe_tokens[i] ? double(assignments[i]) / double(moe_tokens[i]) : 0.0;
        r.experts_per_token = moe_layers ? per_tok / moe_layers : 0.0;
        r.active_expert_params = per_tok * double(m.params_per_expert());
        r.active_params = r.active_expert_params + double(m.always_on_params());
    }
    return res;
}

// Parses a token-id file: integers separated by commas and/or whitespace.
inline std::vector<std::int32_t> parse_token_ids(const std::string& text, const std::string& name, int vocab)
{
    using kdial::detail::check;
    std::vector<std::int32_t> ids;
    std::size_t i = 0;
    while (i < text.size()) {
        const char ch = text[i];
        if (ch == ',' || std::isspace(static_cast<unsigned char>(ch))) {
            ++i;
            continue;
        }
        std::size_t j = i;
        while (j < text.size() && text[j] != ',' && !std::isspace(static_cast<unsigned char>(text[j])))
            ++j;
        const std::string s = text.substr(i, j - i);
        const auto v = parse_long(s);
        check(v && *v >= 0 && *v < vocab, name, ": '", s, "' (token ", ids.size(),
            ") is not a token id in [0, vocab_size = ", vocab, ")");
        ids.push_back(std::int32_t(*v));
        i = j;
    }
    return ids;
}

} // namespace olmoe
