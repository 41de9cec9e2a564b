// The decoder of an OLMoE / Qwen2-MoE / Mixtral model assembled from kdial's
// parts: embedding, RMSNorm, attention (optional q/k norm over the whole
// projection, optional biases, rotate-half RoPE, causal softmax, GQA, an
// optional sliding window) with a KV cache, the kdial MoE layer (routed
// experts, optional shared expert, or a dense MLP run as a one-expert
// layer), the final norm and lm_head. Family differences are data in
// model_config; there is one code path. Deterministic for any thread count.
#pragma once

#include "config.hpp"

#include <kdial/kdial.hpp>
#include <kdial/kernels/dense.hpp>
#include <kdial/kernels/rmsnorm.hpp>
#include <kdial/kernels/rope.hpp>
#include <kdial/kernels/softmax.hpp>

#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <vector>

namespace olmoe {

using kdial::any_weight_view;
using kdial::cmatrix_view;
using kdial::matrix_view;

struct attention_weights {
    any_weight_view q, k, v, o;                      // [nh*hd, d], [nkv*hd, d] x2, [d, nh*hd]
    std::vector<float> q_bias, k_bias, v_bias, o_bias; // empty when absent
    std::vector<float> q_norm, k_norm;               // [nh*hd], [nkv*hd] when qk_norm
};

struct layer_weights {
    std::vector<float> input_norm, post_norm; // [d]
    attention_weights attn;
    std::vector<float> router;   // [E, d] f32 (or [1, d] zeros for a dense layer)
    std::unique_ptr<kdial::moe_layer> moe;
    bool dense = false;          // a dense MLP run as a one-expert layer
};

// Everything the forward pass reads. Views may point into a memory-mapped
// checkpoint held by `keep_alive`; converted copies live in `owned_*`.
struct model_weights {
    model_config cfg;
    any_weight_view embed;       // [V, d] (f32 or bf16)
    std::vector<float> final_norm;
    any_weight_view lm_head;     // [V, d]
    std::vector<layer_weights> layers;
    std::shared_ptr<void> keep_alive;
    std::vector<std::vector<kdial::q8_block>> owned_q8;
    std::vector<std::vector<float>> owned_f32;
};

// The KV cache of one sequence: post-RoPE keys and values per layer.
struct kv_cache {
    std::size_t capacity = 0; // positions
    std::size_t pos = 0;      // tokens already cached
    std::size_t width = 0;    // nkv * hd
    std::vector<std::vector<float>> k, v; // [layers][capacity * width]

    kv_cache() = default;
    kv_cache(const model_config& c, std::size_t cap)
        : capacity(cap), width(std::size_t(c.kv_heads) * std::size_t(c.head_dim)),
          k(std::size_t(c.layers), std::vector<float>(cap * std::size_t(c.kv_heads) * std::size_t(c.head_dim))),
          v(std::size_t(c.layers), std::vector<float>(cap * std::size_t(c.kv_heads) * std::size_t(c.head_dim)))
    {
    }
    void reset() { pos = 0; }
};

class model {
public:
    // max_chunk: most tokens per forward call (longer prompts are chunked by
    // the caller); max_k: the largest k any layer will be asked for.
    model(model_weights&& w, std::size_t max_chunk)
        : w_(std::move(w)), max_chunk_(max_chunk)
    {
        const auto& c = w_.cfg;
        const std::size_t d = std::size_t(c.hidden), qw = std::size_t(c.heads * c.head_dim),
                          kw = std::size_t(c.kv_heads * c.head_dim);
        h_.resize(max_chunk * d);
        a_.resize(max_chunk * d);
        q_.resize(max_chunk * qw);
        k_.resize(max_chunk * kw);
        v_.resize(max_chunk * kw);
        att_.resize(max_chunk * qw);
        tmp_.resize(max_chunk * d);
        inv_freq_.resize(std::size_t(c.head_dim / 2));
        kdial::rope_inv_freq(c.rope_theta, std::size_t(c.head_dim), inv_freq_.data());
        cos_.resize(max_chunk * std::size_t(c.head_dim / 2));
        sin_.resize(cos_.size());
    }

    const model_config& config() const noexcept { return w_.cfg; }
    const model_weights& weights() const noexcept { return w_; }
    std::size_t max_chunk() const noexcept { return max_chunk_; }

    // Runs tokens (at most max_chunk) of one sequence after the cache's
    // tokens, appends them to the cache and writes logits:
    //   all_positions: logits [T, V], else logits [1, V] for the last token.
    // k_per_layer: k for every layer ([layers]; dense layers ignore it).
    void forward(std::span<const std::int32_t> tokens, kv_cache& cache, std::span<const int> k_per_layer,
                 matrix_view<float> logits, bool all_positions)
    {
        const auto& c = w_.cfg;
        const std::size_t T = tokens.size(), d = std::size_t(c.hidden), V = std::size_t(c.vocab);
        using kdial::detail::check;
        check(T >= 1 && T <= max_chunk_, "forward: ", T, " tokens, expected 1 to ", max_chunk_);
        check(cache.pos + T <= cache.capacity, "forward: the KV cache holds ", cache.capacity, " positions, ",
              cache.pos, " used, ", T, " more requested");
        check(cache.k.size() == std::size_t(c.layers) && cache.width == std::size_t(c.kv_heads * c.head_dim),
              "forward: KV cache does not match the model");
        check(k_per_layer.size() == std::size_t(c.layers), "forward: ", k_per_layer.size(), " k values for ",
              c.layers, " layers");
        for (std::size_t l = 0; l < k_per_layer.size(); ++l)
            if (!w_.layers[l].dense)
                check(k_per_layer[l] >= 1 && k_per_layer[l] <= c.experts, "k = ", k_per_layer[l], " for layer ", l,
                      " is outside [1, num_experts = ", c.experts, "]");
        for (std::size_t t = 0; t < T; ++t)
            check(tokens[t] >= 0 && std::size_t(tokens[t]) < V, "token id ", tokens[t], " at position ", t,
                  " is outside [0, vocab_size = ", V, ")");
        check(logits.cols == V && logits.rows == (all_positions ? T : 1), "forward: logits view is [", logits.rows,
              ", ", logits.cols, "], expected [", (all_positions ? T : 1), ", ", V, "]");

        const matrix_view<float> h(h_.data(), T, d), a(a_.data(), T, d), tmp(tmp_.data(), T, d);
        embed(tokens, h);
        kdial::rope_tables(cache.pos, T, inv_freq_.data(), std::size_t(c.head_dim), cos_.data(), sin_.data());
        for (std::size_t l = 0; l < w_.layers.size(); ++l) {
            auto& L = w_.layers[l];
            kdial::rmsnorm(h, L.input_norm.data(), c.rms_norm_eps, a);
            attention(l, a, cache, tmp);
            add_inplace(h, tmp);
            kdial::rmsnorm(h, L.post_norm.data(), c.rms_norm_eps, a);
            L.moe->forward(a, L.dense ? 1 : k_per_layer[l], tmp);
            add_inplace(h, tmp);
        }
        cache.pos += T;
        const std::size_t first = all_positions ? 0 : T - 1;
        const auto hs = h.sub_rows(first, T - first);
        kdial::rmsnorm(hs, w_.final_norm.data(), c.rms_norm_eps, a.sub_rows(0, hs.rows));
        kdial::dense_linear(w_.lm_head, a.sub_rows(0, hs.rows), logits);
    }

    // Weight bytes one decoded token streams at the given k per layer, with
    // the experts actually used in the last forward call (attention, norms,
    // routers, experts, shared experts, lm_head; the embedding row is
    // negligible).
    std::size_t last_decode_bytes() const
    {
        std::size_t b = kdial::bytes_of(w_.lm_head);
        for (const auto& L : w_.layers) {
            b += kdial::bytes_of(L.attn.q) + kdial::bytes_of(L.attn.k) + kdial::bytes_of(L.attn.v) +
                 kdial::bytes_of(L.attn.o);
            b += L.moe->last_weight_bytes();
        }
        return b;
    }

    kdial::moe_layer& moe(std::size_t layer) { return *w_.layers[layer].moe; }

private:
    static void add_inplace(matrix_view<float> h, cmatrix_view<float> x)
    {
        for (std::size_t t = 0; t < h.rows; ++t) {
            float* a = h.row(t);
            const float* b = x.row(t);
            for (std::size_t i = 0; i < h.cols; ++i)
                a[i] += b[i];
        }
    }

    void embed(std::span<const std::int32_t> tokens, matrix_view<float> h) const
    {
        std::visit(
            [&](const auto& e) {
                using W = typename std::decay_t<decltype(e)>::format;
                for (std::size_t t = 0; t < tokens.size(); ++t) {
                    const auto* row = e.row(std::size_t(tokens[t]));
                    float* out = h.row(t);
                    if constexpr (std::is_same_v<W, kdial::f32_t>)
                        std::memcpy(out, row, h.cols * sizeof(float));
                    else if constexpr (std::is_same_v<W, kdial::bf16_t>)
                        for (std::size_t i = 0; i < h.cols; ++i)
                            out[i] = row[i].to_float();
                    else
                        for (std::size_t i = 0; i < h.cols; ++i)
                            out[i] = row[i / kdial::q8_block_size].scale *
                                     float(row[i / kdial::q8_block_size].q[i % kdial::q8_block_size]);
                }
            },
            w_.embed);
    }

    static void add_bias(matrix_view<float> x, const std::vector<float>& b)
    {
        if (b.empty())
            return;
        for (std::size_t t = 0; t < x.rows; ++t)
            for (std::size_t i = 0; i < x.cols; ++i)
                x(t, i) += b[i];
    }

    static void clip(matrix_view<float> x, float c)
    {
        for (std::size_t t = 0; t < x.rows; ++t)
            for (std::size_t i = 0; i < x.cols; ++i)
                x(t, i) = std::min(c, std::max(-c, x(t, i)));
    }

    // out [T, d] = o_proj(attention(a)) for the chunk; appends k, v to the cache.
    void attention(std::size_t l, cmatrix_view<float> a, kv_cache& cache, matrix_view<float> out)
    {
        const auto& c = w_.cfg;
        auto& A = w_.layers[l].attn;
        const std::size_t T = a.rows, hd = std::size_t(c.head_dim), nh = std::size_t(c.heads),
                          nkv = std::size_t(c.kv_heads), qw = nh * hd, kw = nkv * hd;
        const matrix_view<float> q(q_.data(), T, qw), k(k_.data(), T, kw), v(v_.data(), T, kw);
        kdial::dense_linear(A.q, a, q, A.q_bias.empty() ? nullptr : A.q_bias.data());
        kdial::dense_linear(A.k, a, k, A.k_bias.empty() ? nullptr : A.k_bias.data());
        kdial::dense_linear(A.v, a, v, A.v_bias.empty() ? nullptr : A.v_bias.data());
        if (c.qk_norm) {
            kdial::rmsnorm(q, A.q_norm.data(), c.rms_norm_eps, q);
            kdial::rmsnorm(k, A.k_norm.data(), c.rms_norm_eps, k);
        }
        if (c.clip_qkv) {
            clip(q, *c.clip_qkv);
            clip(k, *c.clip_qkv);
            clip(v, *c.clip_qkv);
        }
        kdial::apply_rope(q, nh, hd, hd, cos_.data(), sin_.data());
        kdial::apply_rope(k, nkv, hd, hd, cos_.data(), sin_.data());
        const std::size_t P = cache.pos;
        std::memcpy(cache.k[l].data() + P * kw, k.data, T * kw * sizeof(float));
        std::memcpy(cache.v[l].data() + P * kw, v.data, T * kw * sizeof(float));

        const matrix_view<float> o(att_.data(), T, qw);
        const float scale = 1.0f / std::sqrt(float(hd));
        const std::size_t group = nh / nkv;
        const std::size_t ctx = P + T;
        const std::size_t tok_tile = 16;
        const std::size_t tiles = nh * ((T + tok_tile - 1) / tok_tile);
        if (scores_.size() < tiles * ctx)
            scores_.resize(tiles * ctx); // grows with the context only
        const float* K = cache.k[l].data();
        const float* Vc = cache.v[l].data();
        const std::size_t window = c.sliding_window ? std::size_t(*c.sliding_window) : 0;
        kdial::parallel::for_each_index(tiles, [&](std::size_t i) {
            const std::size_t head = i % nh, t0 = (i / nh) * tok_tile, t1 = std::min(T, t0 + tok_tile);
            const std::size_t kvh = head / group;
            float* s = scores_.data() + i * ctx;
            for (std::size_t t = t0; t < t1; ++t) {
                const std::size_t pos = P + t;
                const std::size_t j0 = window && pos + 1 > window ? pos + 1 - window : 0;
                const float* qv = q.row(t) + head * hd;
                for (std::size_t j = j0; j <= pos; ++j)
                    s[j - j0] = kdial::simd::dot(qv, K + j * kw + kvh * hd, hd) * scale;
                const std::size_t n = pos + 1 - j0;
                kdial::softmax_inplace(s, n);
                float* ov = o.row(t) + head * hd;
                std::memset(ov, 0, hd * sizeof(float));
                for (std::size_t j = 0; j < n; ++j)
                    kdial::simd::axpy(s[j], Vc + (j0 + j) * kw + kvh * hd, ov, hd);
            }
        });
        kdial::dense_linear(A.o, cmatrix_view<float>(o), out, A.o_bias.empty() ? nullptr : A.o_bias.data());
    }

    model_weights w_;
    std::size_t max_chunk_;
    std::vector<float> h_, a_, q_, k_, v_, att_, tmp_, inv_freq_, cos_, sin_, scores_;
};

} // namespace olmoe
