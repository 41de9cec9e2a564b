// Binds a Hugging Face checkpoint's tensors to the model: names and shapes
// per family (olmoe, qwen2_moe, mixtral, qwen3_moe; per-expert names or v5's fused
// expert tensors), each checked against config.json with errors naming the
// file, tensor and shapes. BF16 / F32 matrices are used in place as views of
// the memory-mapped files where 64-byte aligned, else copied to aligned
// memory; F16 is widened to f32; with int8 every linear weight is quantised
// to q8 at load. Norms,
// biases and routers are small and read into f32 vectors. Every shape is
// checked before anything sized from the config is allocated, and tensors
// the config does not use are an error (strict loading).
#pragma once

#include "config.hpp"
#include "model.hpp"

#include <kdial/io/finite.hpp>
#include <kdial/io/safetensors.hpp>
#include <kdial/kernels/quantize.hpp>

#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <set>
#include <string>

namespace olmoe {

struct load_options {
    bool int8 = false; // quantise linear weights to q8 at load
    std::size_t max_chunk = 256; // most tokens per forward call
    std::size_t k_budget = 8; // workspace slots = max_chunk * max(k_budget, trained k)
    std::function<void(int, int)> progress; // (layers bound, total layers)
    bool check_weights = false; // scan every float tensor for NaN / inf first (--check-weights)
    // Copy float weights the file leaves off 64-byte alignment into aligned
    // memory (false: in place wherever their element size allows, for
    // expert-parallel ranks that each touch only their own experts' pages).
    bool align = true;
    // With align: copy every float weight onto the arena's huge pages, the
    // ones the file aligns too (--copy-weights; see README "Aligned weights").
    bool copy_all = false;

    // Whether a float weight at p (elements of esize bytes) is used in place
    // in the mapped file rather than copied: the one rule both loaders use.
    bool in_place(const void* p, std::size_t esize) const noexcept
    {
        return !(align && copy_all) && reinterpret_cast<std::uintptr_t>(p) % (align ? 64 : esize) == 0;
    }
};

namespace detail {

using kdial::detail::cat;
using kdial::detail::check;
using kdial::io::st_dtype;

class binder {
public:
    binder(std::shared_ptr<kdial::io::safetensors_checkpoint> ck, model_weights& w, const load_options& o)
        : ck_(std::move(ck))
        , w_(w)
        , o_(o)
    {
    }

    bool has(const std::string& name) const { return ck_->has(name); }

    std::vector<float> vec(const std::string& name, std::size_t n) const
    {
        ck_->expect(name, { n });
        return ck_->read_floats(name);
    }
    std::vector<float> mat_f32(const std::string& name, std::size_t rows, std::size_t cols) const
    {
        ck_->expect(name, { rows, cols });
        return ck_->read_floats(name);
    }

    // The [rows, cols] tensor `name` as a weight view (shape checked).
    any_weight_view linear(const std::string& name, std::size_t rows, std::size_t cols, bool quantise = true)
    {
        ck_->expect(name, { rows, cols });
        return slice(name, 0, rows, cols, quantise);
    }

    // Rows [row0, row0 + rows) of `name` read as a [., cols] matrix (the
    // caller has checked the tensor's shape), as a weight view: in place for
    // BF16 / F32 data 64-byte aligned in the mapped file; else a 64-byte
    // aligned copy (BF16 / F32 as they are, F16 widened to f32) in the arena,
    // since kernels streaming misaligned weights split every vector load over
    // two cache lines (safetensors aligns tensors to 8 bytes only; `olmoe
    // bench` on a checkpoint whose data sat 8 bytes off measured 1.2-2x
    // slower; load_options::align false: in place wherever the element size
    // allows). With int8, quantised to q8 in the arena.
    any_weight_view slice(
        const std::string& name, std::size_t row0, std::size_t rows, std::size_t cols, bool quantise = true)
    {
        const auto ref = ck_->find(name);
        const auto& t = *ref.info;
        const std::string& file = ref.file->name();
        check(t.dtype == st_dtype::bf16 || t.dtype == st_dtype::f32 || t.dtype == st_dtype::f16, file, ": tensor '",
            name, "' has dtype ", kdial::io::st_dtype_name(t.dtype), "; weights must be BF16, F16 or F32");
        const std::size_t off = row0 * cols, esize = kdial::io::st_dtype_size(t.dtype), n = rows * cols;
        const std::byte* src = t.bytes.data() + off * esize;
        const bool aligned_bf16 = t.dtype == st_dtype::bf16 && reinterpret_cast<std::uintptr_t>(src) % 2 == 0;
        if (o_.int8 && quantise) {
            const auto q = w_.arena.take<kdial::q8_block>(rows * kdial::storage_cols<kdial::q8_t>(cols));
            if (aligned_bf16)
                kdial::quantize_q8(
                    kdial::cmatrix_view<kdial::bf16>(reinterpret_cast<const kdial::bf16*>(src), rows, cols), q.data(),
                    kdial::storage_cols<kdial::q8_t>(cols));
            else {
                const auto f = floats(t, file, off, n);
                kdial::quantize_q8(
                    kdial::cmatrix_view<float>(f.data(), rows, cols), q.data(), kdial::storage_cols<kdial::q8_t>(cols));
            }
            release(src, n * esize);
            return kdial::weight_view<kdial::q8_t>(q.data(), rows, cols);
        }
        if (o_.in_place(src, esize)) {
            if (t.dtype == st_dtype::bf16)
                return kdial::weight_view<kdial::bf16_t>(reinterpret_cast<const kdial::bf16*>(src), rows, cols);
            if (t.dtype == st_dtype::f32)
                return kdial::weight_view<kdial::f32_t>(reinterpret_cast<const float*>(src), rows, cols);
        }
        // A tensor sliced twice (tied embeddings) is copied once.
        const std::span<const std::byte> bytes(src, n * esize);
        any_weight_view v;
        if (t.dtype == st_dtype::bf16)
            v = kdial::weight_view<kdial::bf16_t>(
                w_.arena
                    .copy_once<kdial::bf16>(
                        bytes, n, [&](std::span<kdial::bf16> c) { std::memcpy(c.data(), src, bytes.size()); })
                    .data(),
                rows, cols);
        else
            v = kdial::weight_view<kdial::f32_t>(
                w_.arena
                    .copy_once<float>(
                        bytes, n, [&](std::span<float> c) { kdial::io::detail::read_floats_range(t, off, c, file); })
                    .data(),
                rows, cols);
        release(src, bytes.size());
        return v;
    }

    const kdial::io::safetensors_checkpoint& checkpoint() const { return *ck_; }

private:
    // Drops the mapped pages of a tensor that was copied (quantised) out of
    // the file, so they stop counting toward the resident set; the mapping
    // stays valid and would fault them back in from the page cache.
    static void release(const std::byte* p, std::size_t n)
    {
        const std::uintptr_t page = 4096, a = reinterpret_cast<std::uintptr_t>(p);
        const std::uintptr_t b = (a + page - 1) / page * page, e = (a + n) / page * page;
        if (e > b)
            ::madvise(reinterpret_cast<void*>(b), e - b, MADV_DONTNEED);
    }

    static std::vector<float> floats(
        const kdial::io::tensor_info& t, const std::string& file, std::size_t off, std::size_t n)
    {
        std::vector<float> out(n);
        kdial::io::detail::read_floats_range(t, off, out, file);
        return out;
    }

    std::shared_ptr<kdial::io::safetensors_checkpoint> ck_;
    model_weights& w_;
    const load_options o_; // a copy: callers may pass a temporary
};

// Builds an expert_set from per-expert weight views (all of one format).
inline kdial::expert_set make_set(
    const std::vector<std::array<any_weight_view, 3>>& ex, std::size_t d, std::size_t F, const std::string& where)
{
    const kdial::dtype t = kdial::type_of(ex[0][0]);
    for (std::size_t e = 0; e < ex.size(); ++e)
        for (const auto& m : ex[e])
            check(kdial::type_of(m) == t, where, ": expert ", e, " mixes weight formats (",
                kdial::dtype_name(kdial::type_of(m)), " vs ", kdial::dtype_name(t), ")");
    return kdial::visit_dtype(t, [&](auto W) {
        using WT = decltype(W);
        std::vector<kdial::expert_weights<WT>> v;
        for (const auto& m : ex)
            v.push_back({ std::get<kdial::weight_view<WT>>(m[0]), std::get<kdial::weight_view<WT>>(m[1]),
                std::get<kdial::weight_view<WT>>(m[2]) });
        return kdial::expert_set(std::move(v), d, F);
    });
}

// The tensors load_weights binds, with the shapes config.json implies.
inline std::vector<std::pair<std::string, std::vector<std::size_t>>> expected_tensors(
    const kdial::io::safetensors_checkpoint& ck, const model_config& c)
{
    const std::size_t d = std::size_t(c.hidden), V = std::size_t(c.vocab), hd = std::size_t(c.head_dim),
                      qw = std::size_t(c.heads) * hd, kw = std::size_t(c.kv_heads) * hd, E = std::size_t(c.experts),
                      F = std::size_t(c.expert_ffn), Fs = std::size_t(c.shared_ffn), Fd = std::size_t(c.dense_ffn);
    std::vector<std::pair<std::string, std::vector<std::size_t>>> t;
    t.push_back({ "model.embed_tokens.weight", { V, d } });
    t.push_back({ "model.norm.weight", { d } });
    if (!c.tie_word_embeddings || ck.has("lm_head.weight"))
        t.push_back({ "lm_head.weight", { V, d } });
    const std::string moe = c.fam == family::mixtral ? "block_sparse_moe" : "mlp";
    auto mlp = [&](const std::string& pre, std::size_t width, const char* g, const char* u, const char* dn) {
        t.push_back({ pre + g, { width, d } });
        t.push_back({ pre + u, { width, d } });
        t.push_back({ pre + dn, { d, width } });
    };
    for (int l = 0; l < c.layers; ++l) {
        const std::string p = cat("model.layers.", l, ".");
        t.push_back({ p + "input_layernorm.weight", { d } });
        t.push_back({ p + "post_attention_layernorm.weight", { d } });
        t.push_back({ p + "self_attn.q_proj.weight", { qw, d } });
        t.push_back({ p + "self_attn.k_proj.weight", { kw, d } });
        t.push_back({ p + "self_attn.v_proj.weight", { kw, d } });
        t.push_back({ p + "self_attn.o_proj.weight", { d, qw } });
        if (c.attention_bias || c.qkv_bias) {
            t.push_back({ p + "self_attn.q_proj.bias", { qw } });
            t.push_back({ p + "self_attn.k_proj.bias", { kw } });
            t.push_back({ p + "self_attn.v_proj.bias", { kw } });
        }
        if (c.attention_bias)
            t.push_back({ p + "self_attn.o_proj.bias", { d } });
        if (c.qk_norm) {
            t.push_back({ p + "self_attn.q_norm.weight", { c.qk_norm_per_head ? hd : qw } });
            t.push_back({ p + "self_attn.k_norm.weight", { c.qk_norm_per_head ? hd : kw } });
        }
        if (!c.is_moe_layer(l)) {
            mlp(p + "mlp.", Fd, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
            continue;
        }
        t.push_back({ p + moe + ".gate.weight", { E, d } });
        if (ck.has(p + moe + ".experts.gate_up_proj")) {
            t.push_back({ p + moe + ".experts.gate_up_proj", { E, 2 * F, d } });
            t.push_back({ p + moe + ".experts.down_proj", { E, d, F } });
        } else {
            const bool mix = c.fam == family::mixtral;
            for (std::size_t e = 0; e < E; ++e)
                mlp(cat(p, moe, ".experts.", e, "."), F, mix ? "w1.weight" : "gate_proj.weight",
                    mix ? "w3.weight" : "up_proj.weight", mix ? "w2.weight" : "down_proj.weight");
        }
        if (Fs > 0) {
            mlp(p + "mlp.shared_expert.", Fs, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
            if (c.shared_gate)
                t.push_back({ p + "mlp.shared_expert_gate.weight", { 1, d } });
        }
    }
    return t;
}

// Checks every tensor's presence and shape against the config before
// anything sized from the config (workspace, buffers) is allocated, so a
// config that disagrees with its tensors fails fast with a shape error, not
// a huge allocation; then rejects tensors the config does not use (like
// PyTorch's strict loading: a config with fewer layers than the checkpoint
// is an error naming the extra tensors, not a silently smaller model).
inline void check_tensors(const kdial::io::safetensors_checkpoint& ck, const model_config& c)
{
    const auto want = expected_tensors(ck, c);
    std::set<std::string, std::less<>> used;
    for (const auto& [name, shape] : want) {
        ck.expect(name, std::span<const std::size_t>(shape));
        used.insert(name);
    }
    std::vector<std::string_view> unused;
    for (const auto n : ck.names())
        if (!used.count(n))
            unused.push_back(n);
    if (unused.empty())
        return;
    std::string list;
    for (std::size_t i = 0; i < unused.size() && i < 8; ++i)
        list += cat(i ? ", '" : "'", unused[i], "'");
    if (unused.size() > 8)
        list += cat(" and ", unused.size() - 8, " more");
    throw kdial::error(cat(ck.directory().string(), ": ", unused.size(), " tensor(s) not used by config.json (",
        family_name(c.fam), ", num_hidden_layers = ", c.layers, ", num_experts = ", c.experts, "): ", list,
        "; the checkpoint and its config disagree"));
}

} // namespace detail

// Loads DIR (config.json + safetensors) into model weights.
inline model_weights load_weights(const std::string& dir, const model_config& c, const load_options& o)
{
    using detail::cat;
    using detail::check;
    auto ck = std::make_shared<kdial::io::safetensors_checkpoint>(kdial::io::safetensors_checkpoint::open(dir));
    detail::check_tensors(*ck, c); // shapes first: nothing sized from the config is allocated before
    if (o.check_weights)
        kdial::io::check_finite(*ck);
    model_weights w;
    w.cfg = c;
    w.keep_alive = ck;
    detail::binder b(ck, w, o);
    const std::size_t d = std::size_t(c.hidden), V = std::size_t(c.vocab), hd = std::size_t(c.head_dim),
                      qw = std::size_t(c.heads) * hd, kw = std::size_t(c.kv_heads) * hd, E = std::size_t(c.experts),
                      F = std::size_t(c.expert_ffn), Fs = std::size_t(c.shared_ffn);
    w.embed = b.linear("model.embed_tokens.weight", V, d, false);
    w.final_norm = b.vec("model.norm.weight", d);
    if (c.tie_word_embeddings && !b.has("lm_head.weight"))
        w.lm_head = b.linear("model.embed_tokens.weight", V, d);
    else
        w.lm_head = b.linear("lm_head.weight", V, d);

    const int k_budget = int(std::max<std::size_t>(o.k_budget, std::size_t(c.top_k)));
    kdial::router_options ropt;
    ropt.renormalize = c.norm_topk_prob;
    const std::string moe = c.fam == family::mixtral ? "block_sparse_moe" : "mlp";
    w.layers.resize(std::size_t(c.layers));
    for (int l = 0; l < c.layers; ++l) {
        const std::string p = cat("model.layers.", l, ".");
        auto& L = w.layers[std::size_t(l)];
        L.input_norm = b.vec(p + "input_layernorm.weight", d);
        L.post_norm = b.vec(p + "post_attention_layernorm.weight", d);
        auto& A = L.attn;
        A.q = b.linear(p + "self_attn.q_proj.weight", qw, d);
        A.k = b.linear(p + "self_attn.k_proj.weight", kw, d);
        A.v = b.linear(p + "self_attn.v_proj.weight", kw, d);
        A.o = b.linear(p + "self_attn.o_proj.weight", d, qw);
        if (c.attention_bias || c.qkv_bias) {
            A.q_bias = b.vec(p + "self_attn.q_proj.bias", qw);
            A.k_bias = b.vec(p + "self_attn.k_proj.bias", kw);
            A.v_bias = b.vec(p + "self_attn.v_proj.bias", kw);
        }
        if (c.attention_bias)
            A.o_bias = b.vec(p + "self_attn.o_proj.bias", d);
        if (c.qk_norm) {
            A.q_norm = b.vec(p + "self_attn.q_norm.weight", c.qk_norm_per_head ? hd : qw);
            A.k_norm = b.vec(p + "self_attn.k_norm.weight", c.qk_norm_per_head ? hd : kw);
        }
        if (c.is_moe_layer(l)) {
            L.router = b.mat_f32(p + moe + ".gate.weight", E, d);
            std::vector<std::array<any_weight_view, 3>> ex(E);
            const std::string fused = p + moe + ".experts.gate_up_proj";
            if (b.has(fused)) { // transformers v5: [E, 2F, d] (gate rows, then up) and [E, d, F]
                b.checkpoint().expect(fused, { E, 2 * F, d });
                b.checkpoint().expect(p + moe + ".experts.down_proj", { E, d, F });
                for (std::size_t e = 0; e < E; ++e)
                    ex[e] = { b.slice(fused, e * 2 * F, F, d), b.slice(fused, e * 2 * F + F, F, d),
                        b.slice(p + moe + ".experts.down_proj", e * d, d, F) };
            } else {
                const bool mix = c.fam == family::mixtral;
                for (std::size_t e = 0; e < E; ++e) {
                    const std::string ep = cat(p, moe, ".experts.", e, ".");
                    ex[e] = { b.linear(ep + (mix ? "w1.weight" : "gate_proj.weight"), F, d),
                        b.linear(ep + (mix ? "w3.weight" : "up_proj.weight"), F, d),
                        b.linear(ep + (mix ? "w2.weight" : "down_proj.weight"), d, F) };
                }
            }
            std::optional<kdial::shared_expert> sh;
            if (Fs > 0) {
                const std::string sp = p + "mlp.shared_expert.";
                std::vector<std::array<any_weight_view, 3>> s1 { { b.linear(sp + "gate_proj.weight", Fs, d),
                    b.linear(sp + "up_proj.weight", Fs, d), b.linear(sp + "down_proj.weight", d, Fs) } };
                sh = kdial::shared_expert { detail::make_set(s1, d, Fs, p + "mlp.shared_expert"), {} };
                if (c.shared_gate) {
                    auto& g = w.owned_f32.emplace_back(b.mat_f32(p + "mlp.shared_expert_gate.weight", 1, d));
                    sh->gate = kdial::weight_view<kdial::f32_t>(g.data(), 1, d);
                }
            }
            L.moe.emplace(kdial::cmatrix_view<float>(L.router.data(), E, d),
                detail::make_set(ex, d, F, p + moe + ".experts"), ropt, std::move(sh));
            w.moe_shape = { o.max_chunk, k_budget, E, d, F, Fs };
        } else {
            // A dense MLP, run as a one-expert layer whose router gives weight 1.
            const std::size_t Fd = std::size_t(c.dense_ffn);
            w.dense_shape = { o.max_chunk, 1, 1, d, Fd, 0 };
            L.dense = true;
            L.router.assign(d, 0.0f);
            std::vector<std::array<any_weight_view, 3>> ex { { b.linear(p + "mlp.gate_proj.weight", Fd, d),
                b.linear(p + "mlp.up_proj.weight", Fd, d), b.linear(p + "mlp.down_proj.weight", d, Fd) } };
            L.moe.emplace(kdial::cmatrix_view<float>(L.router.data(), 1, d), detail::make_set(ex, d, Fd, p + "mlp"));
        }
        if (o.progress)
            o.progress(l + 1, c.layers);
    }
    return w;
}

} // namespace olmoe

namespace olmoe {

// Touches every page of every weight the forward pass streams (in
// parallel), so a benchmark's first timed pass does not pay for page faults
// (of the mapped file or of fresh copies). Returns the bytes touched.
inline std::size_t prefault(const model_weights& w)
{
    std::vector<std::span<const std::byte>> spans;
    for_each_weight(w, [&](const auto& v) {
        if (v.data)
            spans.push_back({ reinterpret_cast<const std::byte*>(v.data), v.bytes() });
    });
    std::vector<unsigned char> sink(spans.size(), 0);
    kdial::parallel::for_each_index(spans.size(), [&](std::size_t i) {
        unsigned char acc = 0;
        for (std::size_t p = 0; p < spans[i].size(); p += 4096)
            acc = static_cast<unsigned char>(acc ^ static_cast<unsigned char>(spans[i][p]));
        if (!spans[i].empty()) // the last page, when the span ends part way into it
            acc = static_cast<unsigned char>(acc ^ static_cast<unsigned char>(spans[i].back()));
        sink[i] = acc; // keep the reads
    });
    std::size_t total = 0;
    for (const auto& s : spans)
        total += s.size();
    volatile unsigned char keep = sink.empty() ? 0 : sink[0];
    (void)keep;
    return total;
}

} // namespace olmoe
