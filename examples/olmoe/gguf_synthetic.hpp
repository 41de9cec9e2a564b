// GGUF output of make-synthetic (--format gguf): a Hugging Face checkpoint
// directory (config.json, safetensors, tokenizer.json) converted to one GGUF
// file the way llama.cpp's converter lays it out: its architecture names and
// metadata keys, tensor names, stacked expert tensors [E, ...], attn_q /
// attn_k rows permuted for the `llama` architecture (Mixtral), and the
// tokenizer as tokenizer.ggml.* metadata. make-synthetic writes the f32
// safetensors checkpoint to a temporary directory and converts it, so the
// GGUF file holds the same weights as the safetensors output of the same
// seed: F32 exactly; F16 / BF16 the values a --dtype f16 / bf16 safetensors
// checkpoint holds; Q8_0 / Q4_0 / Q4_K the f32 values quantised by kdial's
// quantisers (core/blocks.hpp, kernels/quantize.hpp; Q4_K needs rows of a
// multiple of 256 values, so not the tiny presets). As llama.cpp does, 1-D tensors (norms, biases) and the
// routers stay F32; for F16 / BF16 they hold the values rounded to that type,
// so the file equals the --dtype safetensors checkpoint value for value.
#pragma once

#include "config.hpp"
#include "gguf_model.hpp"
#include "synthetic.hpp"

#include <kdial/io/gguf_writer.hpp>
#include <kdial/io/safetensors.hpp>
#include <kdial/core/blocks.hpp>
#include <kdial/kernels/quantize.hpp>

#include <nlohmann/json.hpp>

#include <stdlib.h>

#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace olmoe {

namespace gguf_synth {

using kdial::detail::cat;
using kdial::detail::check;
using kdial::io::ggml_type;
using kdial::io::gguf_out_tensor;
using kdial::io::gguf_out_value;

inline ggml_type parse_type(const std::string& dtype)
{
    if (dtype == "f32")
        return ggml_type::f32;
    if (dtype == "f16")
        return ggml_type::f16;
    if (dtype == "bf16")
        return ggml_type::bf16;
    if (dtype == "q8_0")
        return ggml_type::q8_0;
    if (dtype == "q4_0")
        return ggml_type::q4_0;
    if (dtype == "q4_k")
        return ggml_type::q4_k;
    throw kdial::error(
        cat("make-synthetic --format gguf: --dtype must be f32, f16, bf16, q8_0, q4_0 or q4_k, got '", dtype, "'"));
}

// Values -> the bytes of type t ([rows, cols] row-major; q8_0 per row).
inline std::vector<std::byte> encode(const std::vector<float>& v, ggml_type t, std::size_t cols)
{
    std::vector<std::byte> out;
    auto put = [&](const auto& xs) {
        const auto b = std::as_bytes(std::span(xs));
        out.assign(b.begin(), b.end());
    };
    switch (t) {
    case ggml_type::f32:
        put(v);
        break;
    case ggml_type::f16: {
        std::vector<kdial::f16> h(v.size());
        for (std::size_t i = 0; i < v.size(); ++i)
            h[i] = kdial::f16::from_float(v[i]);
        put(h);
        break;
    }
    case ggml_type::bf16: {
        std::vector<kdial::bf16> h(v.size());
        for (std::size_t i = 0; i < v.size(); ++i)
            h[i] = kdial::bf16::from_float(v[i]);
        put(h);
        break;
    }
    case ggml_type::q8_0: {
        const std::size_t rows = v.size() / cols, bpr = kdial::storage_cols<kdial::q8_t>(cols);
        std::vector<kdial::q8_block> q(rows * bpr);
        kdial::quantize_q8(kdial::cmatrix_view<float>(v.data(), rows, cols), q.data(), bpr);
        put(q);
        break;
    }
    case ggml_type::q4_0: {
        const std::size_t rows = v.size() / cols, bpr = kdial::storage_cols<kdial::q4_0_t>(cols);
        std::vector<kdial::q4_0_block> q(rows * bpr);
        kdial::quantize_q4_0(v.data(), cols, rows, cols, q.data(), bpr);
        put(q);
        break;
    }
    case ggml_type::q4_k: {
        check(cols % kdial::qk_k == 0, "make-synthetic: Q4_K needs rows of a multiple of 256 values; a tensor has ",
            cols, " (use a preset with larger sizes, e.g. olmoe)");
        const std::size_t rows = v.size() / cols, bpr = kdial::storage_cols<kdial::q4_k_t>(cols);
        std::vector<kdial::q4_k_block> q(rows * bpr);
        kdial::quantize_q4_k(v.data(), cols, rows, cols, q.data(), bpr);
        put(q);
        break;
    }
    default:
        throw kdial::error("gguf_synth::encode: unsupported type");
    }
    return out;
}

// Rounds values through t (f16 / bf16), for the small tensors kept F32.
inline void round_through(std::vector<float>& v, ggml_type t)
{
    if (t == ggml_type::f16)
        for (auto& x : v)
            x = kdial::f16::from_float(x).to_float();
    else if (t == ggml_type::bf16)
        for (auto& x : v)
            x = kdial::bf16::from_float(x).to_float();
}

// llama.cpp's Q/K permutation for the llama architecture: within each head
// of hd rows, GGUF row 2i + j is HF row j*hd/2 + i.
inline std::vector<float> permute_qk(const std::vector<float>& v, std::size_t heads, std::size_t cols)
{
    std::vector<float> out(v.size());
    const std::size_t hd = v.size() / cols / heads;
    for (std::size_t h = 0; h < heads; ++h)
        for (std::size_t i = 0; i < hd / 2; ++i)
            for (std::size_t j = 0; j < 2; ++j)
                std::copy_n(v.begin() + std::ptrdiff_t((h * hd + j * (hd / 2) + i) * cols), cols,
                    out.begin() + std::ptrdiff_t((h * hd + 2 * i + j) * cols));
    return out;
}

// The tokenizer.json of `dir` as tokenizer.ggml.* metadata.
inline void tokenizer_metadata(
    const std::filesystem::path& file, const model_config& c, kdial::io::gguf_metadata_list& md)
{
    const auto j = nlohmann::json::parse(kdial::io::read_file_checked(file, "tokenizer file"));
    const auto& vocab = j.at("model").at("vocab");
    std::vector<std::string> tokens(std::size_t(c.vocab));
    std::vector<std::int32_t> types(std::size_t(c.vocab), 5); // UNUSED
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
        const int id = it.value().get<int>();
        check(id >= 0 && id < c.vocab, file.string(), ": token id ", id, " outside the vocabulary");
        tokens[std::size_t(id)] = it.key();
        types[std::size_t(id)] = 1; // NORMAL
    }
    for (const auto& a : j.at("added_tokens")) {
        const int id = a.at("id").get<int>();
        check(id >= 0 && id < c.vocab, file.string(), ": added token id ", id, " outside the vocabulary");
        tokens[std::size_t(id)] = a.at("content").get<std::string>();
        types[std::size_t(id)] = a.value("special", false) ? 3 : 4;
    }
    for (std::size_t i = 0; i < tokens.size(); ++i)
        if (types[i] == 5)
            tokens[i] = cat("[PAD", i, "]");
    std::vector<std::string> merges;
    for (const auto& m : j.at("model").at("merges"))
        merges.push_back(
            m.is_string() ? m.get<std::string>() : m.at(0).get<std::string>() + " " + m.at(1).get<std::string>());
    const bool split = j.at("pre_tokenizer").value("type", "") == "Sequence";
    md.emplace_back("tokenizer.ggml.model", gguf_out_value::string("gpt2"));
    md.emplace_back("tokenizer.ggml.pre", gguf_out_value::string(split ? "qwen2" : "olmo"));
    md.emplace_back("tokenizer.ggml.tokens", gguf_out_value::string_array(std::move(tokens)));
    md.emplace_back("tokenizer.ggml.token_type",
        gguf_out_value::array(kdial::io::gguf_type::i32, std::span<const std::int32_t>(types)));
    md.emplace_back("tokenizer.ggml.merges", gguf_out_value::string_array(std::move(merges)));
    if (!c.eos_ids.empty())
        md.emplace_back("tokenizer.ggml.eos_token_id", gguf_out_value::u32(std::uint32_t(c.eos_ids[0])));
    if (c.bos_id)
        md.emplace_back("tokenizer.ggml.bos_token_id", gguf_out_value::u32(std::uint32_t(*c.bos_id)));
    md.emplace_back("tokenizer.ggml.add_bos_token", gguf_out_value::boolean(false));
}

} // namespace gguf_synth

// Converts the Hugging Face checkpoint in `src` (config.json, safetensors,
// tokenizer.json) to the GGUF file `out` with linear weights of type `dtype`
// (f32 | f16 | bf16 | q8_0); see the header comment.
inline void convert_to_gguf(const std::string& src, const std::filesystem::path& out, const std::string& dtype,
    const std::function<void(std::size_t, std::size_t)>& progress = {})
{
    using namespace gguf_synth;
    const ggml_type wt = parse_type(dtype);
    const model_config c = load_config(src);
    const auto ck = kdial::io::safetensors_checkpoint::open(src);
    const bool mix = c.fam == family::mixtral;
    const std::string fam = family_name(c.fam); // (by name: builds with and without the qwen3_moe family)
    const bool qwen = fam == "qwen2_moe" || fam == "qwen3_moe";
    const std::string arch = fam == "olmoe" ? "olmoe"
        : fam == "qwen2_moe"                ? "qwen2moe"
        : fam == "qwen3_moe"                ? "qwen3moe"
                                            : "llama";
    const std::string A = arch + ".";
    kdial::io::gguf_metadata_list md;
    md.emplace_back("general.architecture", gguf_out_value::string(arch));
    md.emplace_back("general.name", gguf_out_value::string("kdial synthetic"));
    md.emplace_back(A + "block_count", gguf_out_value::u32(std::uint32_t(c.layers)));
    md.emplace_back(A + "context_length", gguf_out_value::u32(std::uint32_t(c.max_positions)));
    md.emplace_back(A + "embedding_length", gguf_out_value::u32(std::uint32_t(c.hidden)));
    md.emplace_back(A + "attention.head_count", gguf_out_value::u32(std::uint32_t(c.heads)));
    md.emplace_back(A + "attention.head_count_kv", gguf_out_value::u32(std::uint32_t(c.kv_heads)));
    md.emplace_back(A + "attention.key_length", gguf_out_value::u32(std::uint32_t(c.head_dim)));
    md.emplace_back(A + "attention.value_length", gguf_out_value::u32(std::uint32_t(c.head_dim)));
    md.emplace_back(A + "rope.dimension_count", gguf_out_value::u32(std::uint32_t(c.head_dim)));
    md.emplace_back(A + "rope.freq_base", gguf_out_value::f32(float(c.rope_theta)));
    md.emplace_back(A + "attention.layer_norm_rms_epsilon", gguf_out_value::f32(c.rms_norm_eps));
    md.emplace_back(A + "expert_count", gguf_out_value::u32(std::uint32_t(c.experts)));
    md.emplace_back(A + "expert_used_count", gguf_out_value::u32(std::uint32_t(c.top_k)));
    md.emplace_back(A + "expert_weights_norm", gguf_out_value::boolean(c.norm_topk_prob));
    if (qwen) {
        md.emplace_back(A + "expert_feed_forward_length", gguf_out_value::u32(std::uint32_t(c.expert_ffn)));
        if (c.dense_ffn > 0)
            md.emplace_back(A + "feed_forward_length", gguf_out_value::u32(std::uint32_t(c.dense_ffn)));
        if (c.shared_ffn > 0)
            md.emplace_back(A + "expert_shared_feed_forward_length", gguf_out_value::u32(std::uint32_t(c.shared_ffn)));
    } else
        md.emplace_back(A + "feed_forward_length", gguf_out_value::u32(std::uint32_t(c.expert_ffn)));
    if (c.clip_qkv)
        md.emplace_back(A + "attention.clamp_kqv", gguf_out_value::f32(*c.clip_qkv));
    if (c.sliding_window)
        md.emplace_back(A + "attention.sliding_window", gguf_out_value::u32(std::uint32_t(*c.sliding_window)));
    md.emplace_back("general.file_type",
        gguf_out_value::u32(wt == ggml_type::f32 ? 0
                : wt == ggml_type::f16           ? 1
                : wt == ggml_type::q8_0          ? 7
                                                 : 32));
    tokenizer_metadata(std::filesystem::path(src) / "tokenizer.json", c, md);

    // The tensors: GGUF name, dims (ne[0] first), type, and how to make the bytes.
    std::vector<gguf_out_tensor> ts;
    std::size_t total = 0, done = 0;
    const auto read = [&ck](const std::string& n) { return ck.read_floats(n); };
    // A matrix or stack of matrices [.., rows, cols] from HF tensors (concatenated).
    auto weight = [&](std::string name, std::vector<std::string> hf, std::vector<std::uint64_t> ne,
                      std::size_t permute_heads = 0) {
        const std::size_t cols = std::size_t(ne[0]);
        ts.push_back({ std::move(name), wt, std::move(ne), {}, [=, &read, &done, &progress, &total] {
                          std::vector<float> v;
                          for (const auto& n : hf) {
                              auto x = read(n);
                              if (permute_heads)
                                  x = permute_qk(x, permute_heads, cols);
                              v.insert(v.end(), x.begin(), x.end());
                          }
                          done += v.size();
                          if (progress)
                              progress(done, total);
                          return encode(v, wt, cols);
                      } });
        std::size_t n = 1;
        for (auto d : ts.back().ne)
            n *= std::size_t(d);
        total += n;
    };
    // A small tensor kept F32 (values rounded through the weight type).
    auto small = [&](std::string name, const std::string& hf, std::vector<std::uint64_t> ne) {
        ts.push_back({ std::move(name), ggml_type::f32, std::move(ne), {}, [=, &read] {
                          auto v = read(hf);
                          round_through(v, wt);
                          return encode(v, ggml_type::f32, v.size());
                      } });
    };
    const std::uint64_t d = std::uint64_t(c.hidden), V = std::uint64_t(c.vocab), hd = std::uint64_t(c.head_dim),
                        qw = std::uint64_t(c.heads) * hd, kw = std::uint64_t(c.kv_heads) * hd,
                        E = std::uint64_t(c.experts), F = std::uint64_t(c.expert_ffn), Fs = std::uint64_t(c.shared_ffn),
                        Fd = std::uint64_t(c.dense_ffn);
    weight("token_embd.weight", { "model.embed_tokens.weight" }, { d, V });
    for (int l = 0; l < c.layers; ++l) {
        const std::string p = cat("model.layers.", l, "."), g = cat("blk.", l, ".");
        small(g + "attn_norm.weight", p + "input_layernorm.weight", { d });
        weight(g + "attn_q.weight", { p + "self_attn.q_proj.weight" }, { d, qw }, mix ? std::size_t(c.heads) : 0);
        weight(g + "attn_k.weight", { p + "self_attn.k_proj.weight" }, { d, kw }, mix ? std::size_t(c.kv_heads) : 0);
        weight(g + "attn_v.weight", { p + "self_attn.v_proj.weight" }, { d, kw });
        weight(g + "attn_output.weight", { p + "self_attn.o_proj.weight" }, { qw, d });
        if (c.attention_bias || c.qkv_bias) {
            small(g + "attn_q.bias", p + "self_attn.q_proj.bias", { qw });
            small(g + "attn_k.bias", p + "self_attn.k_proj.bias", { kw });
            small(g + "attn_v.bias", p + "self_attn.v_proj.bias", { kw });
        }
        if (c.attention_bias)
            small(g + "attn_output.bias", p + "self_attn.o_proj.bias", { d });
        if (c.qk_norm) {
            small(g + "attn_q_norm.weight", p + "self_attn.q_norm.weight", { gguf_detail::qk_norm_width(c, qw) });
            small(g + "attn_k_norm.weight", p + "self_attn.k_norm.weight", { gguf_detail::qk_norm_width(c, kw) });
        }
        small(g + "ffn_norm.weight", p + "post_attention_layernorm.weight", { d });
        if (!c.is_moe_layer(l)) {
            weight(g + "ffn_gate.weight", { p + "mlp.gate_proj.weight" }, { d, Fd });
            weight(g + "ffn_up.weight", { p + "mlp.up_proj.weight" }, { d, Fd });
            weight(g + "ffn_down.weight", { p + "mlp.down_proj.weight" }, { Fd, d });
            continue;
        }
        const std::string moe = p + (mix ? "block_sparse_moe." : "mlp.");
        small(g + "ffn_gate_inp.weight", moe + "gate.weight", { d, E });
        std::vector<std::string> gate, up, down;
        for (std::uint64_t e = 0; e < E; ++e) {
            const std::string ep = cat(moe, "experts.", e, ".");
            gate.push_back(ep + (mix ? "w1.weight" : "gate_proj.weight"));
            up.push_back(ep + (mix ? "w3.weight" : "up_proj.weight"));
            down.push_back(ep + (mix ? "w2.weight" : "down_proj.weight"));
        }
        weight(g + "ffn_gate_exps.weight", gate, { d, F, E });
        weight(g + "ffn_up_exps.weight", up, { d, F, E });
        weight(g + "ffn_down_exps.weight", down, { F, d, E });
        if (Fs > 0) {
            weight(g + "ffn_gate_shexp.weight", { p + "mlp.shared_expert.gate_proj.weight" }, { d, Fs });
            weight(g + "ffn_up_shexp.weight", { p + "mlp.shared_expert.up_proj.weight" }, { d, Fs });
            weight(g + "ffn_down_shexp.weight", { p + "mlp.shared_expert.down_proj.weight" }, { Fs, d });
            if (c.shared_gate)
                small(g + "ffn_gate_inp_shexp.weight", p + "mlp.shared_expert_gate.weight", { d });
        }
    }
    small("output_norm.weight", "model.norm.weight", { d });
    if (ck.has("lm_head.weight"))
        weight("output.weight", { "lm_head.weight" }, { d, V });
    kdial::io::write_gguf(out, md, ts);
}

// make-synthetic --format gguf: the synthetic checkpoint of `o` (f32) in a
// temporary directory, converted to DIR/model.gguf with linear weights of
// type o.dtype. DIR follows make-synthetic's rules (new, empty, or holding
// only its own earlier output).
inline model_config make_synthetic_gguf(const std::string& dir, const synthetic_options& o,
    const std::function<void(std::size_t, std::size_t)>& progress = {})
{
    namespace fs = std::filesystem;
    gguf_synth::parse_type(o.dtype); // before any work
    const std::set<std::string> earlier = synth::claim_dir(dir);
    std::set<std::string> both = earlier;
    both.insert("model.gguf");
    synth::write_marker(dir, both);
    std::string tmpl = (fs::temp_directory_path() / "kdial-gguf-src-XXXXXX").string();
    kdial::detail::check(::mkdtemp(tmpl.data()) != nullptr, tmpl, ": cannot create a temporary directory");
    struct cleanup {
        std::string d;
        ~cleanup()
        {
            std::error_code ec;
            fs::remove_all(d, ec);
        }
    } guard { tmpl };
    synthetic_options so = o;
    so.dtype = "f32";
    so.shards = 1;
    const model_config c = make_synthetic(tmpl + "/hf", so, [&](std::size_t a, std::size_t b) {
        if (progress)
            progress(a, 2 * b);
    });
    convert_to_gguf(tmpl + "/hf", fs::path(dir) / "model.gguf", o.dtype, [&](std::size_t a, std::size_t b) {
        if (progress)
            progress(b + a, 2 * b);
    });
    for (const auto& n : earlier)
        if (n != "model.gguf") {
            std::error_code ec;
            fs::remove(fs::path(dir) / n, ec);
        }
    synth::write_marker(dir, { "model.gguf" });
    return c;
}

} // namespace olmoe
