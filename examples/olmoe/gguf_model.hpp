// Loads a model from one GGUF file (llama.cpp's format): hyperparameters
// from the metadata mapped onto model_config, llama.cpp's tensor names bound
// to the model, the tokenizer from the metadata (io/gguf_tokenizer.hpp).
//
// Architectures (general.architecture): olmoe, qwen2moe, and Mixtral as
// llama with <arch>.expert_count; qwen3moe is mapped (model_type qwen3_moe,
// per-head attn_q_norm / attn_k_norm [head_dim]) and runs where config.hpp
// has that family. The metadata are turned into config.json fields and go
// through parse_config, so a GGUF file meets every check and limit a
// config.json does.
//
// Tensors: F32, F16, BF16, Q8_0, Q4_0 and Q4_K run in place (Q8_0 blocks are
// kdial's q8 byte for byte; kernels/gguf_weight.hpp); Q5_K and Q6_K are
// repacked once into q8 at load (error bound in gguf_weight.hpp). The
// stacked expert tensors ffn_{gate,up}_exps [E, F, d] and ffn_down_exps
// [E, d, F] bind through expert_set::stacked without a copy; an expert set
// whose tensors come in different types (Q4_K_M files: Q4_K gate / up, Q6_K
// down) runs as q8, repacked at load. Norms, biases and routers are read as
// f32 (F32 / F16 / BF16 / Q8_0). Other tensor types are an error naming the
// tensor and its type. Like the safetensors loader, every tensor's presence,
// dims and type are checked before anything sized from the metadata is
// allocated, and tensors the model does not use are an error.
//
// Q/K row order: llama.cpp's converter permutes the rows of attn_q / attn_k
// of the `llama` architecture (Mixtral) within each head so that its
// interleaved ("NORM") RoPE sees HF's rotate-half pairs: GGUF row
// h*hd + 2i + j holds HF row h*hd + j*hd/2 + i (i < hd/2, j in {0, 1}).
// olmoe, qwen2moe and qwen3moe use rotate-half ("NEOX") RoPE in llama.cpp
// and are stored unpermuted. For llama, the loader undoes the permutation
// at load (a row copy of attn_q and attn_k in their own format, about 1.4%
// of Mixtral-8x7B's bytes), so kdial's one rotate-half RoPE gives the same
// bits as the Hugging Face checkpoint.
#pragma once

#include "config.hpp"
#include "model.hpp"
#include "weights.hpp"

#include <kdial/io/gguf.hpp>
#include <kdial/io/gguf_tokenizer.hpp>
#include <kdial/core/blocks.hpp>
#include <kdial/kernels/gguf_weight.hpp>
#include <kdial/kernels/quantize.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace olmoe {

// True when `path` names a GGUF model file (the GGUF magic, or a .gguf name).
inline bool is_gguf_path(const std::string& path)
{
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec))
        return false;
    return kdial::io::looks_like_gguf(path) || std::filesystem::path(path).extension() == ".gguf";
}

namespace gguf_detail {

using kdial::detail::cat;
using kdial::detail::check;
using kdial::io::ggml_type;
using kdial::io::gguf_file;
using kdial::io::gguf_tensor_info;

// The GGUF architecture of a supported family, and whether the converter
// permuted attn_q / attn_k rows (see the header comment).
struct arch_info {
    std::string arch; // general.architecture
    std::string model_type; // config.json model_type it maps to
    bool permuted_qk = false;
};

inline arch_info architecture(const gguf_file& f)
{
    const std::string a(f.get_string("general.architecture"));
    if (a == "olmoe")
        return { a, "olmoe", false };
    if (a == "qwen2moe")
        return { a, "qwen2_moe", false };
    if (a == "qwen3moe")
        return { a, "qwen3_moe", false };
    if (a == "llama") {
        check(f.has_key("llama.expert_count"), f.name(),
            ": general.architecture is 'llama' without llama.expert_count: a dense model; kdial runs the MoE "
            "architectures olmoe, qwen2moe, qwen3moe and Mixtral (llama with experts)");
        return { a, "mixtral", true };
    }
    throw kdial::error(cat(f.name(), ": general.architecture '", a,
        "' is not supported (olmoe, qwen2moe, qwen3moe, and Mixtral as llama with llama.expert_count)"));
}

} // namespace gguf_detail

// The model configuration of a GGUF file: its metadata as config.json
// fields, validated by parse_config (`source` in messages: the file name).
inline model_config gguf_config(const kdial::io::gguf_file& f)
{
    using gguf_detail::cat;
    using gguf_detail::check;
    const auto ai = gguf_detail::architecture(f);
    const std::string A = ai.arch + ".";
    const auto key = [&](const char* k) { return A + k; };
    const auto has = [&](const char* k) { return f.has_key(key(k)); };
    const auto integer = [&](const char* k) { return f.get_int(key(k), 0, 0x7fffffff); };
    nlohmann::ordered_json j;
    j["model_type"] = ai.model_type;
    j["hidden_size"] = integer("embedding_length");
    j["num_hidden_layers"] = integer("block_count");
    for (const char* k : { "attention.head_count", "attention.head_count_kv" })
        if (has(k) && f.value(key(k)).type == kdial::io::gguf_type::array)
            throw kdial::error(cat(f.name(), ": metadata key '", key(k), "' is ", f.value(key(k)).describe(),
                "; per-layer head counts are not supported"));
    j["num_attention_heads"] = integer("attention.head_count");
    if (has("attention.head_count_kv"))
        j["num_key_value_heads"] = integer("attention.head_count_kv");
    if (has("attention.key_length")) {
        j["head_dim"] = integer("attention.key_length");
        if (has("attention.value_length"))
            check(integer("attention.value_length") == integer("attention.key_length"), f.name(), ": ",
                key("attention.value_length"), " = ", integer("attention.value_length"), " differs from ",
                key("attention.key_length"), " = ", integer("attention.key_length"), "; not supported");
    }
    // The vocabulary size: the embedding's rows (llama.cpp's own rule).
    const kdial::io::gguf_tensor_info* embd = f.find("token_embd.weight");
    check(embd != nullptr, f.name(), ": no tensor 'token_embd.weight'");
    check(embd->rank() == 2, f.name(), ": tensor 'token_embd.weight' has ", embd->rank(), " dims, expected 2");
    check(embd->ne[1] <= 0x7fffffff, f.name(), ": tensor 'token_embd.weight' has ", embd->ne[1], " rows");
    j["vocab_size"] = embd->ne[1];
    if (has("vocab_size"))
        check(std::uint64_t(integer("vocab_size")) == embd->ne[1], f.name(), ": ", key("vocab_size"), " = ",
            integer("vocab_size"), " but token_embd.weight has ", embd->ne[1], " rows");
    j["num_experts_per_tok"] = integer("expert_used_count");
    const char* experts_field = ai.model_type == "mixtral" ? "num_local_experts" : "num_experts";
    j[experts_field] = integer("expert_count");
    // Expert width: expert_feed_forward_length where the converter writes it
    // (qwen2moe, qwen3moe), else feed_forward_length (olmoe, Mixtral).
    const std::int64_t ff = has("feed_forward_length") ? integer("feed_forward_length") : 0;
    const std::int64_t eff = has("expert_feed_forward_length") ? integer("expert_feed_forward_length") : ff;
    if (ai.model_type == "olmoe" || ai.model_type == "mixtral")
        j["intermediate_size"] = eff;
    else {
        j["moe_intermediate_size"] = eff;
        if (ff > 0)
            j["intermediate_size"] = ff;
    }
    if (ai.model_type == "qwen2_moe" || ai.model_type == "qwen3_moe") {
        // Layers without a router are dense MLP layers (mlp_only_layers).
        nlohmann::ordered_json dense = nlohmann::ordered_json::array();
        const std::int64_t L = integer("block_count");
        for (std::int64_t l = 0; l < L && l < 4096; ++l)
            if (!f.has(cat("blk.", l, ".ffn_gate_inp.weight")) && f.has(cat("blk.", l, ".ffn_up.weight")))
                dense.push_back(l);
        j["mlp_only_layers"] = dense;
    }
    if (ai.model_type == "qwen3_moe")
        j["attention_bias"] = f.has("blk.0.attn_q.bias");
    if (ai.model_type == "qwen2_moe") {
        std::int64_t fs = has("expert_shared_feed_forward_length") ? integer("expert_shared_feed_forward_length") : 0;
        if (fs == 0)
            if (const auto* t = f.find("blk.0.ffn_up_shexp.weight"); t && t->rank() == 2)
                fs = std::int64_t(t->ne[1]);
        j["shared_expert_intermediate_size"] = fs;
        j["qkv_bias"] = f.has("blk.0.attn_q.bias");
    }
    if (ai.model_type == "olmoe")
        j["attention_bias"] = f.has("blk.0.attn_q.bias");
    if (has("expert_weights_norm"))
        j["norm_topk_prob"] = f.get_bool(key("expert_weights_norm"));
    else if (ai.model_type == "qwen3_moe")
        j["norm_topk_prob"] = true; // llama.cpp's qwen3moe graph always renormalises
    if (has("attention.layer_norm_rms_epsilon"))
        j["rms_norm_eps"] = f.get_float(key("attention.layer_norm_rms_epsilon"));
    if (has("rope.freq_base"))
        j["rope_theta"] = f.get_float(key("rope.freq_base"));
    if (has("rope.scaling.type")) {
        const std::string_view t = f.get_string(key("rope.scaling.type"));
        check(t == "none", f.name(), ": metadata key '", key("rope.scaling.type"), "' is '", t,
            "'; only unscaled RoPE is supported");
    }
    if (has("rope.dimension_count")) {
        const std::int64_t hd = has("attention.key_length")
            ? integer("attention.key_length")
            : integer("embedding_length") / std::max<std::int64_t>(1, integer("attention.head_count"));
        check(integer("rope.dimension_count") == hd, f.name(), ": ", key("rope.dimension_count"), " = ",
            integer("rope.dimension_count"), " is not the head dim ", hd,
            "; partial rotary embeddings are not supported");
    }
    if (has("attention.clamp_kqv"))
        j["clip_qkv"] = f.get_float(key("attention.clamp_kqv"));
    if (has("attention.sliding_window"))
        j["sliding_window"] = integer("attention.sliding_window");
    if (has("context_length"))
        j["max_position_embeddings"] = integer("context_length");
    j["tie_word_embeddings"] = !f.has("output.weight");
    if (f.has_key("tokenizer.ggml.eos_token_id"))
        j["eos_token_id"] = f.get_int("tokenizer.ggml.eos_token_id", 0, 0x7fffffff);
    if (f.has_key("tokenizer.ggml.bos_token_id"))
        j["bos_token_id"] = f.get_int("tokenizer.ggml.bos_token_id", 0, 0x7fffffff);
    return parse_config(j.dump(), f.name() + " (GGUF metadata as config.json fields)");
}

namespace gguf_detail {

// Width of the q / k norm weights: the whole projection (olmoe), or one
// head (Qwen3-MoE's per-head norm, where model_config has qk_norm_per_head;
// detected so this file builds with and without that family).
template <class C> std::uint64_t qk_norm_width(const C& c, std::uint64_t full)
{
    if constexpr (requires { c.qk_norm_per_head; })
        return c.qk_norm_per_head ? std::uint64_t(c.head_dim) : full;
    else
        return full;
}

// Keeps the mapped file and the buffers of copied tensors alive.
struct holder {
    std::shared_ptr<const gguf_file> file;
    std::vector<std::unique_ptr<kdial::q8_block[]>> repacked; // Q5_K / Q6_K tensors as q8
};

// The tensors a model uses with their GGUF dims (ne[0] first).
inline std::vector<std::pair<std::string, std::vector<std::uint64_t>>> expected_tensors(
    const gguf_file& f, const model_config& c)
{
    const std::uint64_t d = std::uint64_t(c.hidden), V = std::uint64_t(c.vocab), hd = std::uint64_t(c.head_dim),
                        qw = std::uint64_t(c.heads) * hd, kw = std::uint64_t(c.kv_heads) * hd,
                        E = std::uint64_t(c.experts), F = std::uint64_t(c.expert_ffn), Fs = std::uint64_t(c.shared_ffn),
                        Fd = std::uint64_t(c.dense_ffn);
    std::vector<std::pair<std::string, std::vector<std::uint64_t>>> t;
    t.push_back({ "token_embd.weight", { d, V } });
    t.push_back({ "output_norm.weight", { d } });
    if (f.has("output.weight"))
        t.push_back({ "output.weight", { d, V } });
    for (int l = 0; l < c.layers; ++l) {
        const std::string p = cat("blk.", l, ".");
        t.push_back({ p + "attn_norm.weight", { d } });
        t.push_back({ p + "ffn_norm.weight", { d } });
        t.push_back({ p + "attn_q.weight", { d, qw } });
        t.push_back({ p + "attn_k.weight", { d, kw } });
        t.push_back({ p + "attn_v.weight", { d, kw } });
        t.push_back({ p + "attn_output.weight", { qw, d } });
        if (c.attention_bias || c.qkv_bias) {
            t.push_back({ p + "attn_q.bias", { qw } });
            t.push_back({ p + "attn_k.bias", { kw } });
            t.push_back({ p + "attn_v.bias", { kw } });
        }
        if (c.attention_bias)
            t.push_back({ p + "attn_output.bias", { d } });
        if (c.qk_norm) {
            t.push_back({ p + "attn_q_norm.weight", { qk_norm_width(c, qw) } });
            t.push_back({ p + "attn_k_norm.weight", { qk_norm_width(c, kw) } });
        }
        if (!c.is_moe_layer(l)) {
            t.push_back({ p + "ffn_gate.weight", { d, Fd } });
            t.push_back({ p + "ffn_up.weight", { d, Fd } });
            t.push_back({ p + "ffn_down.weight", { Fd, d } });
            continue;
        }
        t.push_back({ p + "ffn_gate_inp.weight", { d, E } });
        t.push_back({ p + "ffn_gate_exps.weight", { d, F, E } });
        t.push_back({ p + "ffn_up_exps.weight", { d, F, E } });
        t.push_back({ p + "ffn_down_exps.weight", { F, d, E } });
        if (Fs > 0) {
            t.push_back({ p + "ffn_gate_shexp.weight", { d, Fs } });
            t.push_back({ p + "ffn_up_shexp.weight", { d, Fs } });
            t.push_back({ p + "ffn_down_shexp.weight", { Fs, d } });
            if (c.shared_gate) {
                const auto* g = f.find(p + "ffn_gate_inp_shexp.weight");
                // Written as [d] or [d, 1] (llama.cpp accepts both).
                t.push_back({ p + "ffn_gate_inp_shexp.weight",
                    g && g->rank() == 2 ? std::vector<std::uint64_t> { d, 1 } : std::vector<std::uint64_t> { d } });
            }
        }
    }
    return t;
}

inline bool is_float(ggml_type t) noexcept
{
    return t == ggml_type::f32 || t == ggml_type::f16 || t == ggml_type::bf16;
}

// Checks presence, dims and types of every tensor, then that no tensor is
// left unused; before anything sized from the metadata is allocated.
inline void check_tensors(const gguf_file& f, const model_config& c)
{
    std::set<std::string, std::less<>> used;
    for (const auto& [name, ne] : expected_tensors(f, c)) {
        const gguf_tensor_info* t = f.find(name);
        check(t != nullptr, f.name(), ": no tensor '", name, "' (", family_name(c.fam), ", ", c.layers, " layers)");
        if (t->ne != ne)
            throw kdial::error(
                cat(f.name(), ": tensor '", name, "' has dims ", kdial::io::detail::gguf_shape_str(t->ne),
                    " (GGUF order, ne[0] first), expected ", kdial::io::detail::gguf_shape_str(ne)));
        // Vectors (norms, biases, routers) are read as floats; matrices run
        // through kdial::to_weight.
        const bool vector_like = ne.size() == 1 || name.find("ffn_gate_inp") != std::string::npos;
        const bool supported = is_float(t->type) || t->type == ggml_type::q8_0
            || (!vector_like
                && (t->type == ggml_type::q4_0 || t->type == ggml_type::q4_k || t->type == ggml_type::q5_k
                    || t->type == ggml_type::q6_k));
        if (!supported)
            throw kdial::error(cat(f.name(), ": tensor '", name, "' has type ", t->traits.name, " (ggml type id ",
                static_cast<std::uint32_t>(t->type), "); this build runs F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K and ",
                "Q6_K matrices", vector_like ? " and F32 / F16 / BF16 / Q8_0 norms, biases and routers" : ""));
        used.insert(name);
    }
    std::vector<std::string_view> unused;
    for (const auto& t : f.tensors())
        if (!used.count(t.name) && t.name != "rope_freqs.weight")
            unused.push_back(t.name);
    if (unused.empty())
        return;
    std::string list;
    for (std::size_t i = 0; i < unused.size() && i < 8; ++i)
        list += cat(i ? ", '" : "'", unused[i], "'");
    if (unused.size() > 8)
        list += cat(" and ", unused.size() - 8, " more");
    throw kdial::error(cat(f.name(), ": ", unused.size(), " tensor(s) not used by the model (", family_name(c.fam),
        ", ", c.layers, " layers, ", c.experts, " experts): ", list));
}

// Binds GGUF tensors as weight views: in place where the type and address
// allow, else copied (f32 widening, q8 quantisation with int8, permuted rows).
class binder {
public:
    binder(const gguf_file& f, holder& h, model_weights& w, const load_options& o, bool permuted_qk)
        : f_(f)
        , h_(h)
        , w_(w)
        , o_(o)
        , permuted_(permuted_qk)
    {
    }

    std::vector<float> vec(const std::string& name) const { return f_.read_floats(name); }

    // Rows [row0, row0 + rows) of tensor `name` seen as a [., cols] matrix.
    // force_q8: the rows as q8 whatever the type (Q8_0 in place, others
    // dequantised exactly and quantised), for expert sets whose tensors come
    // in different types (llama.cpp's Q4_K_M files mix Q4_K and Q6_K).
    kdial::any_weight_view slice(
        const std::string& name, std::size_t row0, std::size_t rows, bool quantise = true, bool force_q8 = false)
    {
        const gguf_tensor_info& t = f_.info(name);
        const std::size_t cols = t.cols();
        const std::size_t row_bytes = cols / t.traits.block * t.traits.bytes;
        if (force_q8 && t.type != ggml_type::q8_0)
            return quantised(dequantised(t, row0, rows), rows, cols);
        if (o_.int8 && quantise && is_float(t.type)) {
            std::vector<float> fl(rows * cols);
            f_.read_floats(t, row0 * cols, fl);
            return quantised(fl, rows, cols);
        }
        return view(t, t.bytes.subspan(row0 * row_bytes, rows * row_bytes), rows);
    }

    kdial::any_weight_view linear(const std::string& name, bool quantise = true)
    {
        const gguf_tensor_info& t = f_.info(name);
        return slice(name, 0, t.rows(), quantise);
    }

    // attn_q / attn_k: for a permuted architecture, rows reordered back to
    // the Hugging Face order (per head of hd rows: HF row j*hd/2 + i is GGUF
    // row 2i + j), copied in the tensor's own format; else in place.
    kdial::any_weight_view qk(const std::string& name, std::size_t heads, std::size_t hd)
    {
        if (!permuted_)
            return linear(name);
        const gguf_tensor_info& t = f_.info(name);
        const std::size_t rows = t.rows(), cols = t.cols(), row_bytes = cols / t.traits.block * t.traits.bytes;
        check(rows == heads * hd && hd % 2 == 0, f_.name(), ": tensor '", name, "' has ", rows, " rows, expected ",
            heads, " heads x ", hd);
        const auto buf = w_.arena.take<std::byte>(t.bytes.size());
        for (std::size_t h = 0; h < heads; ++h)
            for (std::size_t j = 0; j < 2; ++j)
                for (std::size_t i = 0; i < hd / 2; ++i)
                    std::memcpy(buf.data() + (h * hd + j * (hd / 2) + i) * row_bytes,
                        t.bytes.data() + (h * hd + 2 * i + j) * row_bytes, row_bytes);
        if (o_.int8 && is_float(t.type)) {
            // The permuted rows as floats (a temporary image of the tensor).
            gguf_tensor_info tmp = t;
            tmp.bytes = buf;
            std::vector<float> fl(rows * cols);
            f_.read_floats(tmp, 0, fl);
            return quantised(fl, rows, cols);
        }
        return view(t, buf, rows, true);
    }

private:
    // The weight of `bytes` (rows of tensor t): in place through
    // kdial::to_weight (F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_K; Q5_K / Q6_K
    // repacked to q8, kept alive by the holder); a float tensor not 64-byte
    // aligned (GGUF aligns tensors to 32 bytes by default) is copied as it is
    // into the arena first, so no vector load of the stream splits over two
    // cache lines (see binder in weights.hpp; load_options::align false:
    // copied only when misaligned for its element type).
    // in_arena: bytes are an arena copy already (64-byte aligned): used as they are.
    kdial::any_weight_view view(
        const gguf_tensor_info& t, std::span<const std::byte> bytes, std::size_t rows, bool in_arena = false)
    {
        if (is_float(t.type) && !in_arena && !o_.in_place(bytes.data(), t.traits.bytes)) {
            // Once per source (tied token_embd: embed and lm_head share it).
            const std::span<const std::byte> src = bytes;
            bytes = w_.arena.copy_once<std::byte>(
                src, src.size(), [&](std::span<std::byte> c) { std::memcpy(c.data(), src.data(), c.size()); });
        }
        auto g = kdial::to_weight(static_cast<std::uint32_t>(t.type), bytes, rows, t.cols(), f_.name() + ": " + t.name);
        if (g.owned)
            h_.repacked.push_back(std::move(g.owned));
        return g.view;
    }
    // Rows [row0, row0 + rows) of t as floats: the exact values of every type
    // that binds (core/blocks.hpp's block_value for the 4-bit and K types).
    std::vector<float> dequantised(const gguf_tensor_info& t, std::size_t row0, std::size_t rows) const
    {
        const std::size_t cols = t.cols();
        std::vector<float> fl(rows * cols);
        const auto blocks = [&]<class B>(B) {
            const std::size_t per_row = cols / t.traits.block;
            const B* src = reinterpret_cast<const B*>(t.bytes.data()) + row0 * per_row;
            for (std::size_t r = 0; r < rows; ++r)
                for (std::size_t c = 0; c < cols; ++c)
                    fl[r * cols + c] = kdial::block_value(src[r * per_row + c / t.traits.block], c % t.traits.block);
        };
        switch (t.type) {
        case ggml_type::q4_0:
            blocks(kdial::q4_0_block {});
            break;
        case ggml_type::q4_k:
            blocks(kdial::q4_k_block {});
            break;
        case ggml_type::q5_k:
            blocks(kdial::q5_k_block {});
            break;
        case ggml_type::q6_k:
            blocks(kdial::q6_k_block {});
            break;
        default:
            f_.read_floats(t, row0 * cols, fl);
        }
        return fl;
    }
    kdial::any_weight_view quantised(const std::vector<float>& fl, std::size_t rows, std::size_t cols)
    {
        const auto q = w_.arena.take<kdial::q8_block>(rows * kdial::storage_cols<kdial::q8_t>(cols));
        kdial::quantize_q8(
            kdial::cmatrix_view<float>(fl.data(), rows, cols), q.data(), kdial::storage_cols<kdial::q8_t>(cols));
        return kdial::weight_view<kdial::q8_t>(q.data(), rows, cols);
    }

private:
    const gguf_file& f_;
    holder& h_;
    model_weights& w_;
    const load_options o_; // a copy: callers may pass a temporary
    bool permuted_;
};

inline bool one_format(const std::vector<std::array<kdial::any_weight_view, 3>>& ex)
{
    for (const auto& m : ex)
        for (const auto& v : m)
            if (kdial::type_of(v) != kdial::type_of(ex[0][0]))
                return false;
    return true;
}

// An expert set from stacked tensors [E, rows, cols]: expert_set::stacked
// over the mapped tensors when all three are in place in one format, else
// per-expert views, all as q8 when the three tensors' formats differ.
inline kdial::expert_set stacked_set(binder& b, const gguf_file& f, const std::string& p, std::size_t E, std::size_t d,
    std::size_t F, const load_options& o)
{
    const std::string g = p + "ffn_gate_exps.weight", u = p + "ffn_up_exps.weight", dn = p + "ffn_down_exps.weight";
    const auto &tg = f.info(g), &tu = f.info(u), &td = f.info(dn);
    const bool same = tg.type == tu.type && tu.type == td.type;
    // Float tensors stay in place as binder::view would keep them.
    const auto aligned = [&](const gguf_tensor_info& t) { return o.in_place(t.bytes.data(), t.traits.bytes); };
    if (same && !(o.int8 && is_float(tg.type))) {
        auto make = [&]<class W>(W) {
            using S = typename W::storage;
            auto sw = [&](const gguf_tensor_info& t, std::size_t rows, std::size_t cols) {
                return kdial::stacked_weight<W> { reinterpret_cast<const S*>(t.bytes.data()), rows, cols };
            };
            return kdial::expert_set::stacked<W>(E, sw(tg, F, d), sw(tu, F, d), sw(td, d, F));
        };
        if (tg.type == ggml_type::q8_0)
            return make(kdial::q8_t {});
        if (tg.type == ggml_type::q4_0)
            return make(kdial::q4_0_t {});
        if (tg.type == ggml_type::q4_k)
            return make(kdial::q4_k_t {});
        if (tg.type == ggml_type::bf16 && aligned(tg) && aligned(tu) && aligned(td))
            return make(kdial::bf16_t {});
        if (tg.type == ggml_type::f16 && aligned(tg) && aligned(tu) && aligned(td))
            return make(kdial::f16_t {});
        if (tg.type == ggml_type::f32 && aligned(tg) && aligned(tu) && aligned(td))
            return make(kdial::f32_t {});
    }
    std::vector<std::array<kdial::any_weight_view, 3>> ex(E);
    for (const bool force : { false, true }) {
        for (std::size_t e = 0; e < E; ++e)
            ex[e] = { b.slice(g, e * F, F, true, force), b.slice(u, e * F, F, true, force),
                b.slice(dn, e * d, d, true, force) };
        if (one_format(ex))
            break;
    }
    return detail::make_set(ex, d, F, p + "ffn_*_exps");
}

// Three matrices (gate, up, down) as one expert: in place where they share a
// format, else all as q8 (see binder::slice).
inline std::vector<std::array<kdial::any_weight_view, 3>> one_expert(
    binder& b, const gguf_file& f, const std::string& gate, const std::string& up, const std::string& down)
{
    std::vector<std::array<kdial::any_weight_view, 3>> ex(1);
    for (const bool force : { false, true }) {
        ex[0] = { b.slice(gate, 0, f.info(gate).rows(), true, force), b.slice(up, 0, f.info(up).rows(), true, force),
            b.slice(down, 0, f.info(down).rows(), true, force) };
        if (one_format(ex))
            break;
    }
    return ex;
}

} // namespace gguf_detail

// A model loaded from a GGUF file, with its tokenizer when the file holds a
// supported one (tokenizer.ggml.model = gpt2).
struct gguf_model {
    model_config cfg;
    model_weights weights;
    std::shared_ptr<const kdial::io::gguf_file> file;
    std::optional<kdial::io::gguf_tokenizer> tok;
    std::string tokenizer_error; // why there is no tokenizer, when the file has an unsupported one
};

// Opens and validates `path`, maps its metadata onto model_config, checks
// every tensor, binds the weights and builds the tokenizer.
inline gguf_model load_gguf_model(const std::string& path, const load_options& o)
{
    using gguf_detail::cat;
    auto file = std::make_shared<const kdial::io::gguf_file>(kdial::io::gguf_file::open(path));
    const kdial::io::gguf_file& f = *file;
    gguf_model m;
    m.file = file;
    m.cfg = gguf_config(f);
    const model_config& c = m.cfg;
    gguf_detail::check_tensors(f, c); // before anything sized from the metadata is allocated
    if (o.check_weights) // --check-weights: every F32 / F16 / BF16 / Q8_0 value, in 1 Mi-element chunks
        for (const auto& t : f.tensors()) {
            if (!gguf_detail::is_float(t.type) && t.type != kdial::io::ggml_type::q8_0)
                continue;
            std::vector<float> buf;
            for (std::size_t at = 0, n = t.numel(); at < n;) {
                buf.resize(std::min<std::size_t>(n - at, std::size_t(1) << 20));
                f.read_floats(t, at, buf);
                for (std::size_t i = 0; i < buf.size(); ++i)
                    if (!std::isfinite(buf[i]))
                        throw kdial::error(cat(f.name(), ": tensor '", t.name, "' element ", at + i, " is ", buf[i],
                            " (--check-weights)"));
                at += buf.size();
            }
        }
    try { // an unsupported tokenizer leaves the model usable with token ids
        m.tok = kdial::io::gguf_tokenizer::from_gguf(f);
    } catch (const kdial::error& e) {
        m.tokenizer_error = e.what();
    }

    auto h = std::make_shared<gguf_detail::holder>();
    h->file = file;
    model_weights& w = m.weights;
    w.cfg = c;
    w.keep_alive = h;
    const bool permuted = gguf_detail::architecture(f).permuted_qk;
    gguf_detail::binder b(f, *h, w, o, permuted);
    const std::size_t d = std::size_t(c.hidden), hd = std::size_t(c.head_dim), E = std::size_t(c.experts),
                      F = std::size_t(c.expert_ffn), Fs = std::size_t(c.shared_ffn);
    w.embed = b.linear("token_embd.weight", false);
    w.final_norm = b.vec("output_norm.weight");
    w.lm_head = b.linear(f.has("output.weight") ? "output.weight" : "token_embd.weight");
    const int k_budget = int(std::max<std::size_t>(o.k_budget, std::size_t(c.top_k)));
    kdial::router_options ropt;
    ropt.renormalize = c.norm_topk_prob;
    w.layers.resize(std::size_t(c.layers));
    for (int l = 0; l < c.layers; ++l) {
        const std::string p = cat("blk.", l, ".");
        auto& L = w.layers[std::size_t(l)];
        L.input_norm = b.vec(p + "attn_norm.weight");
        L.post_norm = b.vec(p + "ffn_norm.weight");
        auto& A = L.attn;
        A.q = b.qk(p + "attn_q.weight", std::size_t(c.heads), hd);
        A.k = b.qk(p + "attn_k.weight", std::size_t(c.kv_heads), hd);
        A.v = b.linear(p + "attn_v.weight");
        A.o = b.linear(p + "attn_output.weight");
        if (c.attention_bias || c.qkv_bias) {
            gguf_detail::check(
                !permuted, f.name(), ": attention biases of a permuted (llama) architecture are not supported");
            A.q_bias = b.vec(p + "attn_q.bias");
            A.k_bias = b.vec(p + "attn_k.bias");
            A.v_bias = b.vec(p + "attn_v.bias");
        }
        if (c.attention_bias)
            A.o_bias = b.vec(p + "attn_output.bias");
        if (c.qk_norm) {
            A.q_norm = b.vec(p + "attn_q_norm.weight");
            A.k_norm = b.vec(p + "attn_k_norm.weight");
        }
        if (c.is_moe_layer(l)) {
            L.router = b.vec(p + "ffn_gate_inp.weight");
            std::optional<kdial::shared_expert> sh;
            if (Fs > 0) {
                const auto s1 = gguf_detail::one_expert(
                    b, f, p + "ffn_gate_shexp.weight", p + "ffn_up_shexp.weight", p + "ffn_down_shexp.weight");
                sh = kdial::shared_expert { detail::make_set(s1, d, Fs, p + "ffn_*_shexp"), {} };
                if (c.shared_gate) {
                    auto& g = w.owned_f32.emplace_back(b.vec(p + "ffn_gate_inp_shexp.weight"));
                    sh->gate = kdial::weight_view<kdial::f32_t>(g.data(), 1, d);
                }
            }
            L.moe.emplace(kdial::cmatrix_view<float>(L.router.data(), E, d),
                gguf_detail::stacked_set(b, f, p, E, d, F, o), ropt, std::move(sh));
            w.moe_shape = { o.max_chunk, k_budget, E, d, F, Fs };
        } else {
            const std::size_t Fd = std::size_t(c.dense_ffn);
            w.dense_shape = { o.max_chunk, 1, 1, d, Fd, 0 };
            L.dense = true;
            L.router.assign(d, 0.0f);
            const auto ex
                = gguf_detail::one_expert(b, f, p + "ffn_gate.weight", p + "ffn_up.weight", p + "ffn_down.weight");
            L.moe.emplace(kdial::cmatrix_view<float>(L.router.data(), 1, d), detail::make_set(ex, d, Fd, p + "ffn"));
        }
        if (o.progress)
            o.progress(l + 1, c.layers);
    }
    return m;
}

} // namespace olmoe
