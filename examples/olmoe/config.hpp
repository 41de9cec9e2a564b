// Model configuration read from a Hugging Face config.json: a plain runtime
// struct (the model is data, not a type). One struct serves every supported
// family (olmoe, qwen2_moe, mixtral, qwen3_moe); family differences are
// flags and optional sizes. Every field Hugging Face honours for the forward pass is
// read or rejected with a clear error naming the file, field and value;
// training-only fields are ignored.
#pragma once

#include <kdial/core/error.hpp>
#include <kdial/io/json.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <optional>
#include <string>
#include <vector>

namespace olmoe {

enum class family { olmoe, qwen2_moe, mixtral, qwen3_moe };

inline const char* family_name(family f)
{
    switch (f) {
    case family::olmoe:
        return "olmoe";
    case family::qwen2_moe:
        return "qwen2_moe";
    case family::mixtral:
        return "mixtral";
    case family::qwen3_moe:
        return "qwen3_moe";
    }
    return "?";
}

// The element type of the KV cache (a run-time choice, not a config.json
// field: see kv_cache in model.hpp).
enum class kv_dtype { f32, bf16 };

struct model_config {
    family fam = family::olmoe;
    std::string model_type;
    int hidden = 0; // d
    int layers = 0;
    int heads = 0; // nh
    int kv_heads = 0; // nkv
    int head_dim = 0; // hd
    int vocab = 0; // embedding / lm_head rows
    int experts = 0; // E
    int top_k = 0; // trained k (num_experts_per_tok)
    int expert_ffn = 0; // F
    int shared_ffn = 0; // Fs (0: no shared expert)
    bool shared_gate = false;
    int dense_ffn = 0; // width of dense MLP layers (qwen2_moe / qwen3_moe mlp_only_layers)
    int sparse_step = 1; // qwen2_moe / qwen3_moe decoder_sparse_step
    std::vector<int> mlp_only_layers;
    bool norm_topk_prob = false;
    double rope_theta = 10000.0;
    float rms_norm_eps = 1e-5f;
    bool qk_norm = false; // RMSNorm on q and k after the projection, before RoPE
    // qwen3_moe: that norm is over each head (weights [head_dim], shared by
    // the heads); olmoe: over the whole projection (weights [heads * head_dim]).
    bool qk_norm_per_head = false;
    bool attention_bias = false; // olmoe, qwen3_moe: bias on q, k, v and o
    bool qkv_bias = false; // qwen2_moe: bias on q, k, v only
    std::optional<float> clip_qkv;
    std::optional<int> sliding_window; // mixtral: attend to the last W positions
    bool tie_word_embeddings = false;
    int max_positions = 4096;
    std::vector<int> eos_ids;
    kv_dtype kv = kv_dtype::f32; // set by the runner (--kv), not read from config.json
    std::optional<int> bos_id;
    std::string torch_dtype;

    // Layer i uses experts (else a dense MLP of width dense_ffn).
    bool is_moe_layer(int i) const
    {
        for (int l : mlp_only_layers)
            if (l == i)
                return false;
        return experts > 0 && (i + 1) % sparse_step == 0;
    }
};

// Bounds on the integers of config.json. They are far above every published
// checkpoint (the largest: hidden 16384, FFN width 53248, vocab 256000, 256
// experts, 126 layers, 1M positions) and low enough that no size derived from
// them overflows an int or asks for an absurd allocation before the tensors
// are checked against them.
struct config_limits {
    static constexpr int max_hidden = 1 << 16; // hidden_size
    static constexpr int max_ffn = 1 << 17; // every intermediate size (expert, shared, dense)
    static constexpr int max_head_dim = 1024;
    static constexpr int max_heads = 1024; // num_attention_heads (and kv heads)
    static constexpr int max_attention_width = 1 << 17; // heads x head_dim
    static constexpr int max_layers = 1024;
    static constexpr int max_vocab = 1 << 24;
    static constexpr int max_experts = 1024; // num_experts, num_experts_per_tok
    static constexpr int max_positions = 1 << 24; // max_position_embeddings, sliding_window
    static constexpr std::size_t max_file_bytes = std::size_t(1) << 22; // config.json text (real ones: a few KB)
};

namespace detail {

using json = nlohmann::json;
using kdial::detail::cat;

// Typed, checked access to the fields of one JSON object of config.json;
// `prefix` qualifies nested fields ("rope_scaling.") in messages. Every
// message names the file, the field and (briefly) the value.
struct reader {
    const json& j;
    std::string file;
    std::string prefix;

    std::string name(std::string_view f) const { return prefix + std::string(f); }
    [[noreturn]] void fail(std::string_view field, const std::string& what) const
    {
        throw kdial::error(cat(file, ": field '", name(field), "' ", what));
    }
    bool has(const char* f) const
    {
        const auto it = j.find(f);
        return it != j.end() && !it->is_null();
    }
    const json& at(const char* f) const
    {
        if (!has(f))
            fail(f, "is missing");
        return *j.find(f);
    }
    // The one path for integers: type, integral value and range are checked.
    int integer(const char* f, int lo, int hi) const
    {
        return kdial::io::json_integer<int>(at(f), lo, hi, file, name(f));
    }
    int integer_or(const char* f, int lo, int hi, int dflt) const { return has(f) ? integer(f, lo, hi) : dflt; }
    double number(const char* f) const
    {
        const json& v = at(f);
        if (!v.is_number())
            fail(f, cat("must be a number, got ", kdial::io::json_typed_brief(v)));
        const double x = v.get<double>();
        if (!std::isfinite(x))
            fail(f, cat("must be finite, got ", kdial::io::json_brief(v)));
        return x;
    }
    bool boolean_or(const char* f, bool dflt) const
    {
        if (!has(f))
            return dflt;
        const json& v = at(f);
        if (!v.is_boolean())
            fail(f, cat("must be true or false, got ", kdial::io::json_typed_brief(v)));
        return v.get<bool>();
    }
    std::string string_or(const char* f, const std::string& dflt) const
    {
        if (!has(f))
            return dflt;
        const json& v = at(f);
        if (!v.is_string())
            fail(f, cat("must be a string, got ", kdial::io::json_typed_brief(v)));
        return v.get<std::string>();
    }
    // An integer or a list of integers (eos_token_id, mlp_only_layers), each in [lo, hi].
    std::vector<int> int_list(const char* f, int lo, int hi) const
    {
        std::vector<int> out;
        if (!has(f))
            return out;
        const json& v = at(f);
        if (v.is_number())
            return { integer(f, lo, hi) };
        if (!v.is_array())
            fail(f, cat("must be an integer or a list of integers, got ", kdial::io::json_typed_brief(v)));
        if (v.size() > std::size_t(config_limits::max_layers) + 64)
            fail(f, cat("has ", v.size(), " entries, more than the limit of ", config_limits::max_layers + 64));
        for (std::size_t i = 0; i < v.size(); ++i)
            out.push_back(kdial::io::json_integer<int>(v[i], lo, hi, file, cat(name(f), "[", i, "]")));
        return out;
    }
};

} // namespace detail

// Parses config.json text. `file` names the source in error messages. The
// text goes through the strict JSON entry (depth and size limits, duplicate
// keys rejected); every integer through one checked conversion with the
// bounds of config_limits.
inline model_config parse_config(const std::string& text, const std::string& file)
{
    using detail::cat;
    using L = config_limits;
    const nlohmann::json j
        = kdial::io::parse_json_strict(text, file, "config", kdial::io::json_max_depth, L::max_file_bytes);
    if (!j.is_object())
        throw kdial::error(cat(file, ": top level must be a JSON object, got ", j.type_name()));
    const detail::reader r { j, file, "" };
    const auto brief = [](const std::string& s) { return kdial::io::json_brief(nlohmann::json(s)); };
    model_config c;
    c.model_type = r.string_or("model_type", "");
    if (c.model_type == "olmoe")
        c.fam = family::olmoe;
    else if (c.model_type == "qwen2_moe")
        c.fam = family::qwen2_moe;
    else if (c.model_type == "mixtral")
        c.fam = family::mixtral;
    else if (c.model_type == "qwen3_moe")
        c.fam = family::qwen3_moe;
    else
        r.fail("model_type", cat("is ", brief(c.model_type), "; supported: olmoe, qwen2_moe, mixtral, qwen3_moe"));

    c.hidden = r.integer("hidden_size", 1, L::max_hidden);
    c.layers = r.integer("num_hidden_layers", 1, L::max_layers);
    c.heads = r.integer("num_attention_heads", 1, L::max_heads);
    c.kv_heads = r.integer_or("num_key_value_heads", 1, c.heads, c.heads);
    if (c.heads % c.kv_heads != 0)
        r.fail("num_key_value_heads", cat("= ", c.kv_heads, " must divide num_attention_heads = ", c.heads));
    if (r.has("head_dim"))
        c.head_dim = r.integer("head_dim", 1, L::max_head_dim);
    else {
        if (c.hidden % c.heads != 0)
            r.fail("hidden_size", cat("= ", c.hidden, " is not a multiple of num_attention_heads = ", c.heads));
        c.head_dim = c.hidden / c.heads;
        if (c.head_dim > L::max_head_dim)
            r.fail("hidden_size",
                cat("= ", c.hidden, " / num_attention_heads = ", c.heads, " gives head_dim ", c.head_dim,
                    ", above the limit of ", L::max_head_dim));
    }
    if (c.head_dim % 2 != 0)
        r.fail("head_dim", cat("= ", c.head_dim, " must be even for rotary embeddings"));
    if (static_cast<long long>(c.heads) * c.head_dim > L::max_attention_width)
        r.fail("num_attention_heads",
            cat("= ", c.heads, " x head_dim ", c.head_dim, " is above the limit of ", L::max_attention_width));
    c.vocab = r.integer("vocab_size", 1, L::max_vocab);
    const std::string act = r.string_or("hidden_act", "silu");
    if (act != "silu")
        r.fail("hidden_act", cat("is ", brief(act), "; only 'silu' is supported"));

    // Experts.
    const char* ne = c.fam == family::mixtral ? "num_local_experts" : "num_experts";
    if (!r.has(ne) && r.has("num_local_experts"))
        ne = "num_local_experts";
    c.experts = r.integer(ne, 1, L::max_experts);
    c.top_k = r.integer("num_experts_per_tok", 1, L::max_experts);
    if (c.top_k > c.experts)
        r.fail("num_experts_per_tok", cat("= ", c.top_k, " exceeds the expert count ", c.experts));
    switch (c.fam) {
    case family::olmoe:
        c.expert_ffn = r.integer("intermediate_size", 1, L::max_ffn);
        c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
        c.qk_norm = true;
        c.attention_bias = r.boolean_or("attention_bias", false);
        c.rms_norm_eps = float(r.has("rms_norm_eps") ? r.number("rms_norm_eps") : 1e-5);
        if (r.has("clip_qkv")) {
            const double v = r.number("clip_qkv");
            if (!(v > 0 && v <= 3.4e38))
                r.fail("clip_qkv", cat("must be positive and finite in float, got ", v));
            c.clip_qkv = float(v);
        }
        break;
    case family::qwen2_moe:
        c.expert_ffn = r.integer("moe_intermediate_size", 1, L::max_ffn);
        c.dense_ffn = r.integer_or("intermediate_size", 1, L::max_ffn, 0);
        c.shared_ffn = r.integer_or("shared_expert_intermediate_size", 0, L::max_ffn, 0);
        c.shared_gate = c.shared_ffn > 0;
        c.sparse_step = r.integer_or("decoder_sparse_step", 1, c.layers, 1);
        c.mlp_only_layers = r.int_list("mlp_only_layers", 0, c.layers - 1);
        c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
        c.qkv_bias = r.boolean_or("qkv_bias", true);
        c.rms_norm_eps = float(r.has("rms_norm_eps") ? r.number("rms_norm_eps") : 1e-6);
        if (r.boolean_or("use_sliding_window", false))
            r.fail("use_sliding_window", "is true; Qwen2-MoE sliding-window attention is not supported");
        for (int i = 0; i < c.layers; ++i)
            if (!c.is_moe_layer(i) && c.dense_ffn <= 0)
                r.fail("intermediate_size", cat("is needed for dense layer ", i, " but is missing"));
        break;
    case family::qwen3_moe:
        // Qwen3-MoE: no shared expert (shared_expert_* fields are not read by
        // Hugging Face for this family), q/k RMSNorm per head, optional
        // biases on all four attention projections (attention_bias).
        c.expert_ffn = r.integer("moe_intermediate_size", 1, L::max_ffn);
        c.dense_ffn = r.integer_or("intermediate_size", 1, L::max_ffn, 0);
        c.sparse_step = r.integer_or("decoder_sparse_step", 1, c.layers, 1);
        c.mlp_only_layers = r.int_list("mlp_only_layers", 0, c.layers - 1);
        c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
        c.qk_norm = true;
        c.qk_norm_per_head = true;
        c.attention_bias = r.boolean_or("attention_bias", false);
        c.rms_norm_eps = float(r.has("rms_norm_eps") ? r.number("rms_norm_eps") : 1e-6);
        if (r.boolean_or("use_sliding_window", false))
            r.fail("use_sliding_window", "is true; Qwen3-MoE sliding-window attention is not supported");
        for (int i = 0; i < c.layers; ++i)
            if (!c.is_moe_layer(i) && c.dense_ffn <= 0)
                r.fail("intermediate_size", cat("is needed for dense layer ", i, " but is missing"));
        break;
    case family::mixtral:
        c.expert_ffn = r.integer("intermediate_size", 1, L::max_ffn);
        c.norm_topk_prob = true; // Mixtral always renormalises the chosen weights
        c.rms_norm_eps = float(r.has("rms_norm_eps") ? r.number("rms_norm_eps") : 1e-5);
        if (r.has("sliding_window"))
            c.sliding_window = r.integer("sliding_window", 1, L::max_positions);
        break;
    }
    if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps))
        r.fail("rms_norm_eps", cat("must be positive and finite in float, got ", c.rms_norm_eps));

    // Rotary embedding: default RoPE only. v5 configs carry rope_parameters.
    if (r.has("rope_parameters")) {
        const auto& rp = j.at("rope_parameters");
        if (!rp.is_object())
            r.fail("rope_parameters", cat("must be an object or null, got ", kdial::io::json_typed_brief(rp)));
        const detail::reader rr { rp, file, "rope_parameters." };
        const std::string type = rr.string_or("rope_type", "default");
        if (type != "default")
            rr.fail("rope_type", cat("is ", brief(type), "; only default RoPE is supported"));
        c.rope_theta = rr.has("rope_theta") ? rr.number("rope_theta") : c.rope_theta;
    }
    if (r.has("rope_theta"))
        c.rope_theta = r.number("rope_theta");
    if (!(c.rope_theta > 0))
        r.fail("rope_theta", cat("must be positive, got ", c.rope_theta));
    if (r.has("rope_scaling")) {
        const auto& rs = j.at("rope_scaling");
        if (!rs.is_object())
            r.fail("rope_scaling", cat("must be an object or null, got ", kdial::io::json_typed_brief(rs)));
        const detail::reader rr { rs, file, "rope_scaling." };
        const std::string type = rr.string_or(rr.has("rope_type") ? "rope_type" : "type", "");
        if (type != "default")
            r.fail(
                "rope_scaling", cat("is ", kdial::io::json_brief(rs), "; only default (unscaled) RoPE is supported"));
    }
    if (r.has("partial_rotary_factor") && r.number("partial_rotary_factor") != 1.0)
        r.fail("partial_rotary_factor", "is not 1.0; partial rotary embeddings are not supported");

    c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
    c.max_positions = r.integer_or("max_position_embeddings", 1, L::max_positions, 4096);
    c.eos_ids = r.int_list("eos_token_id", 0, c.vocab - 1);
    if (r.has("bos_token_id"))
        c.bos_id = r.integer("bos_token_id", 0, c.vocab - 1);
    c.torch_dtype = r.string_or("torch_dtype", r.string_or("dtype", ""));
    return c;
}

// Reads and parses DIR/config.json: opened only when it is a regular file,
// read up to config_limits::max_file_bytes.
inline model_config load_config(const std::string& dir)
{
    const std::string file = dir + "/config.json";
    return parse_config(kdial::io::read_file_checked(file, "config file", config_limits::max_file_bytes), file);
}

// Floating-point operations (a multiply-add counts 2) of a prefill of T
// tokens from an empty cache with per-layer k (ks[l]), the logits of the
// last row only: the projections, attention scores and values (causal,
// within the sliding window), routers, the experts each token runs, shared
// experts and dense MLP layers, lm_head. Norms, RoPE and softmax are left
// out (under 1 % at every size here). `olmoe bench` divides it by the
// prefill time to report the fraction of the FMA peak.
inline double prefill_flops(const model_config& c, std::size_t T, const std::vector<int>& ks)
{
    const double d = c.hidden, hd = c.head_dim, tq = double(c.heads) * hd, tkv = double(c.kv_heads) * hd;
    // Keys each query attends to, summed over the T positions.
    double keys = 0;
    for (std::size_t p = 0; p < T; ++p)
        keys += double(c.sliding_window ? std::min<std::size_t>(p + 1, std::size_t(*c.sliding_window)) : p + 1);
    double f = 0;
    for (int l = 0; l < c.layers; ++l) {
        f += double(T) * 2.0 * d * (2.0 * tq + 2.0 * tkv); // q, o; k, v
        f += keys * 2.0 * 2.0 * tq; // q.k and p.v over every head
        if (c.is_moe_layer(l)) {
            const int k = ks.empty() ? c.top_k : ks[std::size_t(l) % ks.size()];
            f += double(T) * 2.0 * d * c.experts; // router
            f += double(T) * k * 3.0 * 2.0 * d * c.expert_ffn; // gate, up, down
            f += double(T) * (3.0 * 2.0 * d * c.shared_ffn + (c.shared_gate ? 2.0 * d : 0.0));
        } else
            f += double(T) * 3.0 * 2.0 * d * c.dense_ffn;
    }
    return f + 2.0 * d * c.vocab; // lm_head on the last row
}

} // namespace olmoe
