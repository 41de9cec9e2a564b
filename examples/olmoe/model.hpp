// The decoder of an OLMoE / Qwen2-MoE / Mixtral / Qwen3-MoE model assembled
// from kdial's parts: embedding, RMSNorm, attention (optional q/k norm over
// the whole projection or per head, optional biases, rotate-half RoPE, causal
// softmax, GQA, an optional sliding window) with a KV cache, the kdial MoE layer (routed
// experts, optional shared expert, or a dense MLP run as a one-expert
// layer), the final norm and lm_head. Family differences are data in
// model_config; there is one code path. Deterministic for any thread count.
#pragma once

#include "config.hpp"

#include <kdial/kdial.hpp>
#include <kdial/kernels/dense.hpp>
#include <kdial/kernels/quantize.hpp>
#include <kdial/kernels/rmsnorm.hpp>
#include <kdial/kernels/rope.hpp>
#include <kdial/kernels/softmax.hpp>

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <type_traits>
#include <optional>
#include <span>
#include <string_view>
#include <tuple>
#include <typeindex>
#include <typeinfo>
#include <utility>
#include <vector>

namespace olmoe {

using kdial::any_weight_view;
using kdial::cmatrix_view;
using kdial::matrix_view;

struct attention_weights {
    any_weight_view q, k, v, o; // [nh*hd, d], [nkv*hd, d] x2, [d, nh*hd]
    std::vector<float> q_bias, k_bias, v_bias, o_bias; // empty when absent
    std::vector<float> q_norm, k_norm; // qk_norm: [nh*hd], [nkv*hd]; qk_norm_per_head: [hd] each
};

struct layer_weights {
    std::vector<float> input_norm, post_norm; // [d]
    attention_weights attn;
    std::vector<float> router; // [E, d] f32 (or [1, d] zeros for a dense layer)
    std::optional<kdial::moe_weights> moe; // views of router and the experts
    bool dense = false; // a dense MLP run as a one-expert layer
};

// Memory for weights copied at load (the int8 copies of --weights int8, the
// repacked GGUF K-quants, aligned copies of misaligned float tensors and
// F16 widened to f32): 64 MiB regions with
// madvise(MADV_HUGEPAGE), cut into 64-byte aligned pieces, so a stream over
// one expert's weights crosses no 4 KiB page boundary (where hardware
// prefetchers stop) and needs few TLB entries. Only the pages written are
// resident; where transparent huge pages are off it is plain anonymous
// memory. Pieces live as long as the arena.
class weight_arena {
public:
    weight_arena() = default;
    weight_arena(const weight_arena&) = delete;
    weight_arena& operator=(const weight_arena&) = delete;
    weight_arena(weight_arena&& o) noexcept
        : regions_(std::move(o.regions_))
        , used_(std::exchange(o.used_, 0))
        , taken_(std::exchange(o.taken_, 0))
        , copies_(std::move(o.copies_))
    {
    }
    ~weight_arena()
    {
        for (const auto& r : regions_)
            ::munmap(r.p, r.bytes);
    }

    // n zeroed elements of T (trivially copyable), 64-byte aligned.
    template <class T> std::span<T> take(std::size_t n)
    {
        static_assert(std::is_trivially_copyable_v<T> && alignof(T) <= 64);
        const std::size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
        if (regions_.empty() || regions_.back().bytes - used_ < bytes) {
            const std::size_t size = std::max(region, (bytes + huge - 1) / huge * huge);
            void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED)
                throw std::bad_alloc();
            ::madvise(p, size, MADV_HUGEPAGE); // advice only: failure leaves 4 KiB pages
            regions_.push_back({ static_cast<std::byte*>(p), size });
            used_ = 0;
        }
        T* out = reinterpret_cast<T*>(regions_.back().p + used_);
        used_ += bytes;
        taken_ += bytes;
        return { out, n }; // fresh anonymous pages read as zeros
    }

    // n elements of T that fill(span<T>) writes from the source bytes `src`
    // (an aligned copy, or a widened one), made once per (src, n, T) however
    // often asked: a tensor bound twice (tied embeddings, embed and
    // lm_head) shares one copy.
    template <class T, class Fill>
    std::span<const T> copy_once(std::span<const std::byte> src, std::size_t n, Fill&& fill)
    {
        const auto key
            = std::make_tuple(static_cast<const void*>(src.data()), src.size(), n, std::type_index(typeid(T)));
        if (const auto it = copies_.find(key); it != copies_.end())
            return { static_cast<const T*>(it->second), n };
        const auto c = take<T>(n);
        fill(c);
        copies_.emplace(key, c.data());
        return c;
    }

    // Bytes handed out so far (each piece rounded up to 64).
    std::size_t bytes() const noexcept { return taken_; }

private:
    static constexpr std::size_t huge = std::size_t(2) << 20, region = std::size_t(64) << 20;
    struct mapping {
        std::byte* p;
        std::size_t bytes;
    };
    std::vector<mapping> regions_;
    std::size_t used_ = 0;
    std::size_t taken_ = 0; // bytes handed out (rounded to 64)
    std::map<std::tuple<const void*, std::size_t, std::size_t, std::type_index>, const void*> copies_; // copy_once
};

// Everything the forward pass reads. Views may point into a memory-mapped
// checkpoint held by `keep_alive`; copies live in `arena` (and `owned_f32`).
struct model_weights {
    model_config cfg;
    any_weight_view embed; // [V, d] (f32 or bf16)
    std::vector<float> final_norm;
    any_weight_view lm_head; // [V, d]
    std::vector<layer_weights> layers;
    std::shared_ptr<void> keep_alive;
    weight_arena arena; // weights copied at load (weight_arena)
    std::vector<std::vector<float>> owned_f32;
    // Workspace shapes of the MoE layers and of the dense MLP layers (run as
    // one-expert layers); experts == 0: no such layer.
    kdial::moe_shape moe_shape {}, dense_shape {};
};

// f(view) for every linear weight the forward pass streams: embeddings,
// lm_head, attention projections, routed and shared experts; f takes any
// kdial::weight_view<W> (a generic lambda).
template <class F> void for_each_weight(const model_weights& w, F&& f)
{
    const auto any = [&](const kdial::any_weight_view& v) { std::visit(f, v); };
    any(w.embed);
    any(w.lm_head);
    const auto experts = [&](const kdial::expert_set& set) {
        set.visit([&](const auto& ex) {
            for (const auto& e : ex) {
                f(e.gate);
                f(e.up);
                f(e.down);
            }
        });
    };
    for (const auto& l : w.layers) {
        for (const auto* a : { &l.attn.q, &l.attn.k, &l.attn.v, &l.attn.o })
            any(*a);
        if (l.moe) {
            experts(l.moe->experts());
            if (l.moe->shared())
                experts(l.moe->shared()->expert);
        }
    }
}

// The KV cache of one sequence: post-RoPE keys and values per layer, in f32
// (the default: exact) or bf16 (c.kv, `--kv bf16`: half the bytes decode
// reads per cached position, the KV type Hugging Face uses for a bf16 model;
// each value rounded to nearest even once, when it is stored).
struct kv_cache {
    std::size_t capacity = 0; // positions
    std::size_t pos = 0; // tokens already cached
    std::size_t width = 0; // nkv * hd
    kv_dtype dtype = kv_dtype::f32;
    // [layers][kv_heads][capacity][head_dim]: head-major, so attention reads
    // each head's keys and values as one contiguous stream. k, v for f32;
    // kb, vb for bf16 (the other pair is empty).
    std::vector<std::vector<float>> k, v;
    std::vector<std::vector<kdial::bf16>> kb, vb;

    kv_cache() = default;
    kv_cache(const model_config& c, std::size_t cap)
        : capacity(cap)
        , width(std::size_t(c.kv_heads) * std::size_t(c.head_dim))
        , dtype(c.kv)
    {
        const std::size_t n = cap * width, L = std::size_t(c.layers);
        if (dtype == kv_dtype::bf16) {
            kb.assign(L, std::vector<kdial::bf16>(n));
            vb.assign(L, std::vector<kdial::bf16>(n));
        } else {
            k.assign(L, std::vector<float>(n));
            v.assign(L, std::vector<float>(n));
        }
    }
    std::size_t layers() const noexcept { return dtype == kv_dtype::bf16 ? kb.size() : k.size(); }
    // Bytes one cached position takes over all layers (K and V).
    std::size_t bytes_per_position() const noexcept
    {
        return 2 * layers() * width * (dtype == kv_dtype::bf16 ? sizeof(kdial::bf16) : sizeof(float));
    }
    void reset() { pos = 0; }
};

// How one sequence's tokens are routed in every layer: a k per layer, or
// threshold routing (then k_per_layer is not read).
struct route_spec {
    std::span<const int> k_per_layer; // [layers]; dense layers ignore it
    std::optional<kdial::threshold_options> threshold; // per-token threshold routing in every MoE layer
};

// One independent sequence of a batched forward call: its new tokens, its
// own KV cache and its own routing.
struct sequence_step {
    std::span<const std::int32_t> tokens; // appended after cache->pos
    kv_cache* cache = nullptr;
    route_spec route;
    bool all_positions = false; // logits of every new token, else of the last
};

class model {
public:
    // max_chunk: most tokens per forward call (longer prompts are chunked by
    // the caller); max_k: the largest k any layer will be asked for.
    model(model_weights&& w, std::size_t max_chunk)
        : w_(std::move(w))
        , max_chunk_(max_chunk)
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
        rules_.resize(max_chunk);
        kept_.resize(max_chunk);
        // The int8 copy of a projection's input (q/k/v, o, lm_head), sized
        // for the widest input so set_act_mode never needs more.
        dense_scratch_.resize(kdial::dense_workspace_bytes(max_chunk, std::max(d, qw), kdial::act_mode::int8));
        // One workspace for all MoE layers (they run one after another), one
        // for the dense MLP layers.
        if (w_.moe_shape.experts)
            moe_ws_.emplace(w_.moe_shape);
        if (w_.dense_shape.experts)
            dense_ws_.emplace(w_.dense_shape);
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
        const sequence_step s { tokens, &cache, route_spec { k_per_layer, std::nullopt }, all_positions };
        forward_batch(std::span<const sequence_step>(&s, 1), logits);
    }

    // The same with any routing (a k per layer or threshold routing).
    void forward(std::span<const std::int32_t> tokens, kv_cache& cache, const route_spec& route,
        matrix_view<float> logits, bool all_positions)
    {
        const sequence_step s { tokens, &cache, route, all_positions };
        forward_batch(std::span<const sequence_step>(&s, 1), logits);
    }

    // One forward call over several independent sequences (per-request k):
    // every projection, the router, dispatch and the experts run once over
    // all the sequences' tokens (token t of sequence s routed by s's spec,
    // through per-token k with dropped slots when the specs differ);
    // attention runs per sequence on its own cache. Sequences need distinct
    // caches; together at most max_chunk tokens.
    //   logits [R, V]: R = sum over sequences of (all_positions ? T_s : 1),
    //                  rows in sequence order.
    // A sequence's logits equal those of running it alone up to the f32
    // rounding of kernels that see a different number of rows (see
    // tests/examples/batch.cpp); a batch of one is the single-sequence call.
    // Non-finite activations are caught once per call at two cheap points:
    // a router logit (the error names the layer) and the output logits.
    void forward_batch(std::span<const sequence_step> seqs, matrix_view<float> logits)
    {
        layer_ = no_layer;
        try {
            run_batch(seqs, logits);
        } catch (const kdial::error& e) {
            if (layer_ == no_layer)
                throw;
            const std::size_t l = std::exchange(layer_, no_layer);
            const bool nan = std::string_view(e.what()).find("non-finite") != std::string_view::npos;
            throw kdial::error(kdial::detail::cat("layer ", l, ": ", e.what(),
                nan ? kdial::detail::cat(" (a NaN or inf reached the router of layer ", l,
                    ": check the weights of model.layers.0-", l, " with --check-weights)")
                    : std::string()));
        }
        check_logits_finite(logits);
    }

private:
    // forward_batch without the wrapping of its errors.
    void run_batch(std::span<const sequence_step> seqs, matrix_view<float> logits)
    {
        const auto& c = w_.cfg;
        const std::size_t d = std::size_t(c.hidden), V = std::size_t(c.vocab);
        using kdial::detail::check;
        check(!seqs.empty(), "forward: no sequences");
        std::size_t T = 0, R = 0;
        bool uniform = true;
        for (std::size_t s = 0; s < seqs.size(); ++s) {
            const auto& q = seqs[s];
            check(q.cache != nullptr, "forward: sequence ", s, " has no KV cache");
            for (std::size_t o = 0; o < s; ++o)
                check(seqs[o].cache != q.cache, "forward: sequences ", o, " and ", s, " share a KV cache");
            check_sequence(q, s);
            T += q.tokens.size();
            R += q.all_positions ? q.tokens.size() : 1;
            uniform = uniform && !q.route.threshold && !seqs[0].route.threshold
                && std::equal(q.route.k_per_layer.begin(), q.route.k_per_layer.end(), seqs[0].route.k_per_layer.begin(),
                    seqs[0].route.k_per_layer.end());
        }
        check(T <= max_chunk_, "forward: ", T, " tokens in the batch, at most ", max_chunk_, " per call");
        check(logits.cols == V && logits.rows == R, "forward: logits view is [", logits.rows, ", ", logits.cols,
            "], expected [", R, ", ", V, "]");

        const matrix_view<float> h(h_.data(), T, d), a(a_.data(), T, d), tmp(tmp_.data(), T, d);
        std::size_t r0 = 0;
        for (const auto& q : seqs) {
            embed(q.tokens, h.sub_rows(r0, q.tokens.size()));
            const std::size_t half = std::size_t(c.head_dim / 2);
            kdial::rope_tables(q.cache->pos, q.tokens.size(), inv_freq_.data(), std::size_t(c.head_dim),
                cos_.data() + r0 * half, sin_.data() + r0 * half);
            r0 += q.tokens.size();
        }
        last_assignments_ = 0;
        last_moe_bytes_ = 0;
        last_tokens_ = T;
        std::fill_n(kept_.begin(), T, 0);
        for (std::size_t l = 0; l < w_.layers.size(); ++l) {
            layer_ = l;
            auto& L = w_.layers[l];
            kdial::rmsnorm(h, L.input_norm.data(), c.rms_norm_eps, a);
            attention(l, a, seqs, tmp);
            add_inplace(h, tmp);
            kdial::rmsnorm(h, L.post_norm.data(), c.rms_norm_eps, a);
            // The MoE output is added into the residual stream h.
            constexpr auto acc = kdial::combine_mode::accumulate;
            if (moe_hook && !L.dense) { // expert parallel (expert_parallel.hpp): h += MoE(a) across ranks
                const int k = uniform ? seqs[0].route.k_per_layer[l] : 0;
                if (!uniform) {
                    std::size_t t = 0;
                    for (const auto& q : seqs) {
                        const auto& th = q.route.threshold;
                        const int kq = th ? 0 : q.route.k_per_layer[l];
                        std::fill_n(rules_.begin() + std::ptrdiff_t(t), q.tokens.size(),
                            th ? kdial::token_k { th->k_min, th->k_max, th->p } : kdial::token_k { kq, kq, 1.0f });
                        t += q.tokens.size();
                    }
                }
                moe_hook(l, a, h, k, std::span<const kdial::token_k>(rules_.data(), uniform ? 0 : T));
                continue;
            }
            if (L.dense)
                kdial::moe::forward(*L.moe, *dense_ws_, a, kdial::fixed_k<1> {}, h, acc);
            else if (uniform)
                kdial::moe::forward(*L.moe, *moe_ws_, a, seqs[0].route.k_per_layer[l], h, acc);
            else {
                std::size_t t = 0;
                for (const auto& q : seqs) {
                    const auto& th = q.route.threshold;
                    const int k = th ? 0 : q.route.k_per_layer[l];
                    const kdial::token_k rule
                        = th ? kdial::token_k { th->k_min, th->k_max, th->p } : kdial::token_k { k, k, 1.0f };
                    std::fill_n(rules_.begin() + std::ptrdiff_t(t), q.tokens.size(), rule);
                    t += q.tokens.size();
                }
                kdial::moe::forward(*L.moe, *moe_ws_, a,
                    kdial::per_token_rules { std::span<const kdial::token_k>(rules_.data(), T) }, h, acc);
            }
            const kdial::moe_workspace& ws = L.dense ? *dense_ws_ : *moe_ws_;
            if (!L.dense) {
                last_assignments_ += ws.assignments();
                const auto kept = ws.kept();
                for (std::size_t t = 0; t < T; ++t)
                    kept_[t] += kept[t];
            }
            last_moe_bytes_ += kdial::moe::weight_bytes(*L.moe, ws);
        }
        layer_ = no_layer;
        // Final norm of the rows whose logits are wanted, gathered in order.
        std::size_t src = 0, dst = 0;
        for (const auto& q : seqs) {
            const std::size_t n = q.tokens.size(), first = q.all_positions ? 0 : n - 1;
            kdial::rmsnorm(
                h.sub_rows(src + first, n - first), w_.final_norm.data(), c.rms_norm_eps, a.sub_rows(dst, n - first));
            src += n;
            dst += n - first;
            q.cache->pos += n;
        }
        kdial::dense_linear(w_.lm_head, a.sub_rows(0, R), logits, nullptr, act_, dense_scratch_);
    }

public:
    // The element type of the KV caches built from config() from now on
    // (a cache keeps the type it was built with; attention reads either).
    void set_kv_dtype(kv_dtype t) noexcept { w_.cfg.kv = t; }
    // int8 activations for the 8- and 4-bit weights (any row count,
    // kernels/qdot.hpp) in every layer and lm_head, or exact (the default;
    // --act).
    void set_act_mode(kdial::act_mode a)
    {
        act_ = a;
        if (moe_ws_)
            moe_ws_->set_act_mode(a);
        if (dense_ws_)
            dense_ws_->set_act_mode(a);
        if (act_hook)
            act_hook(a);
    }
    kdial::act_mode act_mode() const noexcept { return act_; }

    // Turns renormalisation of the kept routing weights on or off in every
    // MoE layer (--renorm: overrides norm_topk_prob = false at any k).
    void set_renormalize(bool on)
    {
        for (auto& L : w_.layers)
            if (!L.dense) {
                kdial::router_options r = L.moe->routing();
                r.renormalize = on;
                L.moe = L.moe->with_routing(r);
            }
    }

    // (token, expert) assignments the experts ran in the last forward call,
    // summed over MoE layers, and the tokens of that call.
    std::size_t last_assignments() const noexcept { return last_assignments_; }
    std::size_t last_tokens() const noexcept { return last_tokens_; }
    // Experts each token of the last forward call used, summed over the MoE
    // layers [last_tokens()], rows in batch order (serve's experts_per_token).
    std::span<const int> last_kept() const noexcept { return { kept_.data(), last_tokens_ }; }

    // Parameters of one routed expert (gate, up, down: 3 d F).
    std::size_t params_per_expert() const noexcept
    {
        return 3 * std::size_t(w_.cfg.hidden) * std::size_t(w_.cfg.expert_ffn);
    }
    // Parameters every token uses whatever k is: attention (with biases and
    // q/k norms), the layer norms, routers, shared experts and their gates,
    // dense MLP layers, the final norm and lm_head. The embedding (a row
    // lookup, no compute) is not counted.
    std::size_t always_on_params() const
    {
        const auto& c = w_.cfg;
        const std::size_t d = std::size_t(c.hidden);
        std::size_t n = kdial::rows_of(w_.lm_head) * kdial::cols_of(w_.lm_head) + d;
        for (const auto& L : w_.layers) {
            const auto& A = L.attn;
            for (const auto* w : { &A.q, &A.k, &A.v, &A.o })
                n += kdial::rows_of(*w) * kdial::cols_of(*w);
            n += A.q_bias.size() + A.k_bias.size() + A.v_bias.size() + A.o_bias.size() + A.q_norm.size()
                + A.k_norm.size() + L.input_norm.size() + L.post_norm.size();
            if (L.dense)
                n += 3 * d * L.moe->experts().ffn();
            else {
                n += L.router.size();
                if (L.moe->has_shared_expert())
                    n += 3 * d * std::size_t(c.shared_ffn) + (c.shared_gate ? d : 0);
            }
        }
        return n;
    }

    // Weight bytes one decoded token streams at the given k per layer, with
    // the experts each layer actually used in the last forward call
    // (attention, norms, routers, experts, shared experts, lm_head; the
    // embedding row is negligible).
    std::size_t last_decode_bytes() const
    {
        std::size_t b = kdial::bytes_of(w_.lm_head) + last_moe_bytes_;
        for (const auto& L : w_.layers)
            b += kdial::bytes_of(L.attn.q) + kdial::bytes_of(L.attn.k) + kdial::bytes_of(L.attn.v)
                + kdial::bytes_of(L.attn.o);
        return b;
    }

    const kdial::moe_weights& moe(std::size_t layer) const { return *w_.layers[layer].moe; }
    // Largest k a forward call of T tokens may use in every MoE layer.
    // When set, MoE layers call it instead of moe::forward: (layer, a [T, d],
    // h [T, d] += MoE(a), k for every token or 0 with one rule per token).
    std::function<void(
        std::size_t, kdial::cmatrix_view<float>, kdial::matrix_view<float>, int, std::span<const kdial::token_k>)>
        moe_hook;
    // When set, set_act_mode also calls it (expert parallel: the MoE
    // layers' own workspace takes the mode).
    std::function<void(kdial::act_mode)> act_hook;
    int max_k(std::size_t T) const noexcept { return moe_ws_ ? moe_ws_->max_k(T) : w_.cfg.experts; }

private:
    static constexpr std::size_t no_layer = std::size_t(-1);

    // Throws if an output logit is NaN or inf: a non-finite value that
    // passed every router (the last layers' experts, the final norm or
    // lm_head) would otherwise reach the caller silently.
    static void check_logits_finite(cmatrix_view<float> logits)
    {
        for (std::size_t r = 0; r < logits.rows; ++r) {
            const std::size_t v = kdial::find_non_finite(logits.row(r), logits.cols);
            kdial::detail::check(v == logits.cols, "forward: output logit of row ", r, ", token id ", v, " is ",
                v < logits.cols ? logits(r, v) : 0.0f,
                ": a NaN or inf reached the output after the last router (the last layer's experts, "
                "model.norm.weight or lm_head.weight); check the weights with --check-weights");
        }
    }

    static void add_inplace(matrix_view<float> h, cmatrix_view<float> x)
    {
        // fma(1, x, h) rounds exactly like h + x.
        for (std::size_t t = 0; t < h.rows; ++t)
            kdial::simd::axpy(1.0f, x.row(t), h.row(t), h.cols);
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
                    else
                        for (std::size_t i = 0; i < h.cols; ++i)
                            out[i] = kdial::simd::weight_at(row, i);
                }
            },
            w_.embed);
    }

    static void clip(matrix_view<float> x, float c)
    {
        for (std::size_t t = 0; t < x.rows; ++t)
            for (std::size_t i = 0; i < x.cols; ++i)
                x(t, i) = std::min(c, std::max(-c, x(t, i)));
    }

    // Validates one sequence of a forward call.
    void check_sequence(const sequence_step& q, std::size_t s) const
    {
        const auto& c = w_.cfg;
        using kdial::detail::check;
        const std::size_t T = q.tokens.size(), V = std::size_t(c.vocab);
        const kv_cache& cache = *q.cache;
        check(T >= 1, "forward: sequence ", s, " has no tokens");
        check(cache.pos + T <= cache.capacity, "forward: the KV cache holds ", cache.capacity, " positions, ",
            cache.pos, " used, ", T, " more requested");
        check(cache.layers() == std::size_t(c.layers) && cache.width == std::size_t(c.kv_heads * c.head_dim),
            "forward: KV cache does not match the model");
        if (q.route.threshold) {
            const auto& th = *q.route.threshold;
            check(th.p >= 0.0f && th.p <= 1.0f, "threshold p = ", th.p, " is outside [0, 1]");
            check(th.k_min >= 1 && th.k_min <= th.k_max && th.k_max <= c.experts, "threshold k range [", th.k_min, ", ",
                th.k_max, "] must satisfy 1 <= k_min <= k_max <= num_experts = ", c.experts);
        } else {
            const auto ks = q.route.k_per_layer;
            check(ks.size() == std::size_t(c.layers), "forward: ", ks.size(), " k values for ", c.layers, " layers");
            for (std::size_t l = 0; l < ks.size(); ++l)
                if (!w_.layers[l].dense)
                    check(ks[l] >= 1 && ks[l] <= c.experts, "k = ", ks[l], " for layer ", l,
                        " is outside [1, num_experts = ", c.experts, "]");
        }
        for (std::size_t t = 0; t < T; ++t)
            check(q.tokens[t] >= 0 && std::size_t(q.tokens[t]) < V, "token id ", q.tokens[t], " at position ", t,
                " is outside [0, vocab_size = ", V, ")");
    }

    // out [T, d] = o_proj(attention(a)) for the batch: the projections run
    // over all rows at once, attention per sequence on its own cache
    // (rows of sequence s follow those of s - 1); appends k, v to each cache.
    void attention(std::size_t l, cmatrix_view<float> a, std::span<const sequence_step> seqs, matrix_view<float> out)
    {
        const auto& c = w_.cfg;
        auto& A = w_.layers[l].attn;
        const std::size_t T = a.rows, hd = std::size_t(c.head_dim), nh = std::size_t(c.heads),
                          nkv = std::size_t(c.kv_heads), qw = nh * hd, kw = nkv * hd;
        const matrix_view<float> q(q_.data(), T, qw), k(k_.data(), T, kw), v(v_.data(), T, kw);
        auto bias = [](const std::vector<float>& b) { return b.empty() ? nullptr : b.data(); };
        const kdial::dense_output qkv[]
            = { { &A.q, q, bias(A.q_bias) }, { &A.k, k, bias(A.k_bias) }, { &A.v, v, bias(A.v_bias) } };
        kdial::dense_linear(a, qkv, act_, dense_scratch_);
        if (c.qk_norm_per_head) { // each head's hd values: the rows of [T * heads, hd]
            const matrix_view<float> qh(q.data, T * nh, hd), kh(k.data, T * nkv, hd);
            kdial::rmsnorm(qh, A.q_norm.data(), c.rms_norm_eps, qh);
            kdial::rmsnorm(kh, A.k_norm.data(), c.rms_norm_eps, kh);
        } else if (c.qk_norm) {
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

        // Tiles (sequence, head, 16 tokens), each with its own score row.
        const std::size_t tok_tile = 16;
        tiles_.clear();
        std::size_t r0 = 0, score_len = 0;
        for (std::size_t s = 0; s < seqs.size(); ++s) {
            const auto& sq = seqs[s];
            const std::size_t n = sq.tokens.size(), P = sq.cache->pos;
            const std::size_t cap = sq.cache->capacity;
            for (std::size_t r = 0; r < n; ++r) {
                // Row r's nkv heads of hd values land cap * hd apart in the
                // head-major cache.
                const std::size_t at = (P + r) * hd;
                if (sq.cache->dtype == kv_dtype::bf16) {
                    kdial::convert_bf16(cmatrix_view<float>(k.row(r0 + r), nkv, hd),
                        matrix_view<kdial::bf16>(sq.cache->kb[l].data() + at, nkv, hd, cap * hd));
                    kdial::convert_bf16(cmatrix_view<float>(v.row(r0 + r), nkv, hd),
                        matrix_view<kdial::bf16>(sq.cache->vb[l].data() + at, nkv, hd, cap * hd));
                } else {
                    for (std::size_t h = 0; h < nkv; ++h) {
                        std::memcpy(
                            sq.cache->k[l].data() + at + h * cap * hd, k.row(r0 + r) + h * hd, hd * sizeof(float));
                        std::memcpy(
                            sq.cache->v[l].data() + at + h * cap * hd, v.row(r0 + r) + h * hd, hd * sizeof(float));
                    }
                }
            }
            for (std::size_t t0 = 0; t0 < n; t0 += tok_tile)
                for (std::size_t head = 0; head < nh; ++head) {
                    tiles_.push_back({ s, head, r0 + t0, r0 + std::min(n, t0 + tok_tile), r0, score_len });
                    score_len += P + n;
                }
            r0 += n;
        }
        if (scores_.size() < score_len)
            scores_.resize(score_len); // grows with the context only

        const matrix_view<float> o(att_.data(), T, qw);
        const float scale = 1.0f / std::sqrt(float(hd));
        const std::size_t group = nh / nkv;
        const std::size_t window = c.sliding_window ? std::size_t(*c.sliding_window) : 0;
        kdial::parallel::for_each_index(tiles_.size(), [&](std::size_t i) {
            const auto& tl = tiles_[i];
            const kv_cache& cache = *seqs[tl.seq].cache;
            const std::size_t P = cache.pos, head = tl.head, kvh = head / group;
            float* s = scores_.data() + tl.score0;
            const auto run = [&](const auto* K, const auto* Vc) {
                for (std::size_t r = tl.r0; r < tl.r1; ++r) {
                    const std::size_t pos = P + (r - tl.first);
                    const std::size_t j0 = window && pos + 1 > window ? pos + 1 - window : 0;
                    const float* qv = q.row(r) + head * hd;
                    for (std::size_t j = j0; j <= pos; ++j)
                        s[j - j0] = kdial::simd::dot_w(qv, K + j * hd, hd) * scale;
                    const std::size_t n = pos + 1 - j0;
                    kdial::softmax_inplace(s, n);
                    float* ov = o.row(r) + head * hd;
                    std::memset(ov, 0, hd * sizeof(float));
                    for (std::size_t j = 0; j < n; ++j)
                        kdial::simd::axpy_w(s[j], Vc + (j0 + j) * hd, ov, hd);
                }
            };
            const std::size_t at = kvh * cache.capacity * hd;
            if (cache.dtype == kv_dtype::bf16)
                run(cache.kb[l].data() + at, cache.vb[l].data() + at);
            else
                run(cache.k[l].data() + at, cache.v[l].data() + at);
        });
        kdial::dense_linear(A.o, cmatrix_view<float>(o), out, bias(A.o_bias), act_, dense_scratch_);
    }

    struct att_tile {
        std::size_t seq, head;
        std::size_t r0, r1; // rows of the batch
        std::size_t first; // the sequence's first row
        std::size_t score0; // offset of this tile's score row
    };

    model_weights w_;
    std::size_t max_chunk_;
    std::vector<float> h_, a_, q_, k_, v_, att_, tmp_, inv_freq_, cos_, sin_, scores_;
    std::vector<kdial::token_k> rules_; // [max_chunk] per-token routing of a mixed batch
    std::vector<int> kept_; // [max_chunk] experts per token, summed over MoE layers
    std::vector<att_tile> tiles_;
    std::vector<std::byte> dense_scratch_; // dense_linear's workspace (int8 activations)
    std::optional<kdial::moe_workspace> moe_ws_, dense_ws_;
    kdial::act_mode act_ = kdial::act_mode::exact;
    std::size_t last_assignments_ = 0, last_tokens_ = 0, last_moe_bytes_ = 0;
    std::size_t layer_ = no_layer; // the layer run_batch is in, for errors
};

} // namespace olmoe
