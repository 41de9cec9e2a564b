// Model configuration read from a Hugging Face config.json: a plain runtime
// struct (the model is data, not a type). One struct serves every supported
// family (olmoe, qwen2_moe, mixtral); family differences are flags and
// optional sizes. Every field Hugging Face honours for the forward pass is
// read or rejected with a clear error naming the file, field and value;
// training-only fields are ignored.
#pragma once

#include <kdial/core/error.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <optional>
#include <string>
#include <vector>

namespace olmoe {

enum class family { olmoe, qwen2_moe, mixtral };

inline const char* family_name(family f)
{
    switch (f) {
    case family::olmoe:
        return "olmoe";
    case family::qwen2_moe:
        return "qwen2_moe";
    case family::mixtral:
        return "mixtral";
    }
    return "?";
}

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
    int dense_ffn = 0; // width of dense MLP layers (qwen2_moe mlp_only_layers)
    int sparse_step = 1; // qwen2_moe decoder_sparse_step
    std::vector<int> mlp_only_layers;
    bool norm_topk_prob = false;
    double rope_theta = 10000.0;
    float rms_norm_eps = 1e-5f;
    bool qk_norm = false; // olmoe: RMSNorm over the whole q / k projection
    bool attention_bias = false; // olmoe: bias on q, k, v and o
    bool qkv_bias = false; // qwen2_moe: bias on q, k, v only
    std::optional<float> clip_qkv;
    std::optional<int> sliding_window; // mixtral: attend to the last W positions
    bool tie_word_embeddings = false;
    int max_positions = 4096;
    std::vector<int> eos_ids;
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

namespace detail {

using json = nlohmann::json;
using kdial::detail::cat;

struct reader {
    const json& j;
    std::string file;

    [[noreturn]] void fail(const std::string& field, const std::string& what) const
    {
        throw kdial::error(cat(file, ": field '", field, "' ", what));
    }
    bool has(const char* f) const { return j.contains(f) && !j.at(f).is_null(); }
    long long integer(const char* f) const
    {
        if (!has(f))
            fail(f, "is missing");
        const json& v = j.at(f);
        if (!v.is_number_integer() && !(v.is_number_float() && std::floor(v.get<double>()) == v.get<double>()))
            fail(f, cat("must be an integer, got ", v.dump()));
        return v.is_number_integer() ? v.get<long long>() : (long long)v.get<double>();
    }
    int positive(const char* f, long long max = 1LL << 30) const
    {
        const long long v = integer(f);
        if (v < 1 || v > max)
            fail(f, cat("must be in [1, ", max, "], got ", v));
        return int(v);
    }
    int positive_or(const char* f, int dflt) const { return has(f) ? positive(f) : dflt; }
    double number(const char* f) const
    {
        if (!has(f))
            fail(f, "is missing");
        const json& v = j.at(f);
        if (!v.is_number())
            fail(f, cat("must be a number, got ", v.dump()));
        const double x = v.get<double>();
        if (!std::isfinite(x))
            fail(f, cat("must be finite, got ", v.dump()));
        return x;
    }
    bool boolean_or(const char* f, bool dflt) const
    {
        if (!has(f))
            return dflt;
        const json& v = j.at(f);
        if (!v.is_boolean())
            fail(f, cat("must be true or false, got ", v.dump()));
        return v.get<bool>();
    }
    std::string string_or(const char* f, const std::string& dflt) const
    {
        if (!has(f))
            return dflt;
        const json& v = j.at(f);
        if (!v.is_string())
            fail(f, cat("must be a string, got ", v.dump()));
        return v.get<std::string>();
    }
    std::vector<int> int_list(const char* f) const
    {
        std::vector<int> out;
        if (!has(f))
            return out;
        const json& v = j.at(f);
        if (v.is_number_integer())
            return { v.get<int>() };
        if (!v.is_array())
            fail(f, cat("must be an integer or a list of integers, got ", v.dump()));
        for (const auto& e : v) {
            if (!e.is_number_integer())
                fail(f, cat("must hold integers, got ", v.dump()));
            out.push_back(e.get<int>());
        }
        return out;
    }
};

} // namespace detail

// Parses config.json text. `file` names the source in error messages.
inline model_config parse_config(const std::string& text, const std::string& file)
{
    using detail::cat;
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        throw kdial::error(cat(file, ": not valid JSON (", e.what(), ")"));
    }
    if (!j.is_object())
        throw kdial::error(cat(file, ": top level must be a JSON object"));
    const detail::reader r { j, file };
    model_config c;
    c.model_type = r.string_or("model_type", "");
    if (c.model_type == "olmoe")
        c.fam = family::olmoe;
    else if (c.model_type == "qwen2_moe")
        c.fam = family::qwen2_moe;
    else if (c.model_type == "mixtral")
        c.fam = family::mixtral;
    else
        r.fail("model_type", cat("is '", c.model_type, "'; supported: olmoe, qwen2_moe, mixtral"));

    c.hidden = r.positive("hidden_size");
    c.layers = r.positive("num_hidden_layers", 4096);
    c.heads = r.positive("num_attention_heads", 4096);
    c.kv_heads = r.positive_or("num_key_value_heads", c.heads);
    if (c.heads % c.kv_heads != 0)
        r.fail("num_key_value_heads", cat("= ", c.kv_heads, " must divide num_attention_heads = ", c.heads));
    if (r.has("head_dim"))
        c.head_dim = r.positive("head_dim");
    else {
        if (c.hidden % c.heads != 0)
            r.fail("hidden_size", cat("= ", c.hidden, " is not a multiple of num_attention_heads = ", c.heads));
        c.head_dim = c.hidden / c.heads;
    }
    if (c.head_dim % 2 != 0)
        r.fail("head_dim", cat("= ", c.head_dim, " must be even for rotary embeddings"));
    c.vocab = r.positive("vocab_size");
    const std::string act = r.string_or("hidden_act", "silu");
    if (act != "silu")
        r.fail("hidden_act", cat("is '", act, "'; only 'silu' is supported"));

    // Experts.
    const char* ne = c.fam == family::mixtral ? "num_local_experts" : "num_experts";
    if (!r.has(ne) && r.has("num_local_experts"))
        ne = "num_local_experts";
    c.experts = r.positive(ne, 1024);
    c.top_k = r.positive("num_experts_per_tok", 1024);
    if (c.top_k > c.experts)
        r.fail("num_experts_per_tok", cat("= ", c.top_k, " exceeds the expert count ", c.experts));
    switch (c.fam) {
    case family::olmoe:
        c.expert_ffn = r.positive("intermediate_size");
        c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
        c.qk_norm = true;
        c.attention_bias = r.boolean_or("attention_bias", false);
        c.rms_norm_eps = float(r.has("rms_norm_eps") ? r.number("rms_norm_eps") : 1e-5);
        if (r.has("clip_qkv")) {
            const double v = r.number("clip_qkv");
            if (v <= 0)
                r.fail("clip_qkv", cat("must be positive, got ", v));
            c.clip_qkv = float(v);
        }
        break;
    case family::qwen2_moe:
        c.expert_ffn = r.positive("moe_intermediate_size");
        c.dense_ffn = r.positive_or("intermediate_size", 0);
        c.shared_ffn = r.has("shared_expert_intermediate_size") ? int(r.integer("shared_expert_intermediate_size")) : 0;
        if (c.shared_ffn < 0)
            r.fail("shared_expert_intermediate_size", cat("must be >= 0, got ", c.shared_ffn));
        c.shared_gate = c.shared_ffn > 0;
        c.sparse_step = r.positive_or("decoder_sparse_step", 1);
        c.mlp_only_layers = r.int_list("mlp_only_layers");
        for (int l : c.mlp_only_layers)
            if (l < 0 || l >= c.layers)
                r.fail("mlp_only_layers", cat("holds layer ", l, " outside [0, ", c.layers, ")"));
        c.norm_topk_prob = r.boolean_or("norm_topk_prob", false);
        c.qkv_bias = r.boolean_or("qkv_bias", true);
        c.rms_norm_eps = float(r.has("rms_norm_eps") ? r.number("rms_norm_eps") : 1e-6);
        if (r.boolean_or("use_sliding_window", false))
            r.fail("use_sliding_window", "is true; Qwen2-MoE sliding-window attention is not supported");
        for (int i = 0; i < c.layers; ++i)
            if (!c.is_moe_layer(i) && c.dense_ffn <= 0)
                r.fail("intermediate_size", cat("is needed for dense layer ", i, " but is missing"));
        break;
    case family::mixtral:
        c.expert_ffn = r.positive("intermediate_size");
        c.norm_topk_prob = true; // Mixtral always renormalises the chosen weights
        c.rms_norm_eps = float(r.has("rms_norm_eps") ? r.number("rms_norm_eps") : 1e-5);
        if (r.has("sliding_window"))
            c.sliding_window = r.positive("sliding_window");
        break;
    }
    if (!(c.rms_norm_eps > 0))
        r.fail("rms_norm_eps", cat("must be positive, got ", c.rms_norm_eps));

    // Rotary embedding: default RoPE only. v5 configs carry rope_parameters.
    if (r.has("rope_parameters")) {
        const auto& rp = j.at("rope_parameters");
        if (!rp.is_object())
            r.fail("rope_parameters", "must be an object");
        const detail::reader rr { rp, file + ": rope_parameters" };
        const std::string type = rr.string_or("rope_type", "default");
        if (type != "default")
            r.fail("rope_parameters.rope_type", cat("is '", type, "'; only default RoPE is supported"));
        c.rope_theta = rr.has("rope_theta") ? rr.number("rope_theta") : c.rope_theta;
    }
    if (r.has("rope_theta"))
        c.rope_theta = r.number("rope_theta");
    if (!(c.rope_theta > 0))
        r.fail("rope_theta", cat("must be positive, got ", c.rope_theta));
    if (r.has("rope_scaling")) {
        const auto& rs = j.at("rope_scaling");
        const std::string type
            = rs.is_object() ? (rs.contains("rope_type") ? rs.value("rope_type", "") : rs.value("type", "")) : "";
        if (type != "default")
            r.fail("rope_scaling", cat("is ", rs.dump(), "; only default (unscaled) RoPE is supported"));
    }
    if (r.has("partial_rotary_factor") && r.number("partial_rotary_factor") != 1.0)
        r.fail("partial_rotary_factor", "is not 1.0; partial rotary embeddings are not supported");

    c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
    c.max_positions = r.positive_or("max_position_embeddings", 4096);
    c.eos_ids = r.int_list("eos_token_id");
    if (r.has("bos_token_id"))
        c.bos_id = int(r.integer("bos_token_id"));
    c.torch_dtype = r.string_or("torch_dtype", r.string_or("dtype", ""));
    return c;
}

// Reads and parses DIR/config.json.
inline model_config load_config(const std::string& dir)
{
    const std::string file = dir + "/config.json";
    std::ifstream in(file, std::ios::binary);
    if (!in)
        throw kdial::error(kdial::detail::cat(file, ": cannot open (is --model a model directory?)"));
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    return parse_config(text, file);
}

} // namespace olmoe
