// Synthetic checkpoints in the exact Hugging Face layout (config.json,
// model.safetensors or sharded model-0000N-of-0000M.safetensors with
// model.safetensors.index.json, and a small byte-level BPE tokenizer.json),
// for tests, benchmarks and the demo: no real weights can be downloaded here.
// Weights come from a counter-based generator (value = f(seed, tensor name,
// index)), so they do not depend on sharding or thread count, and are scaled
// so activations stay near unit size through any number of layers.
// It writes only into a new or empty directory or one holding nothing but
// its own earlier output (listed in a .kdial-synthetic marker), never
// deleting a file it did not write; every file is written atomically.
#pragma once

#include "config.hpp"

#include <kdial/core/dtype.hpp>
#include <kdial/core/error.hpp>
#include <kdial/io/file.hpp>
#include <kdial/io/safetensors_writer.hpp>
#include <kdial/io/tokenizer.hpp>

#include <nlohmann/json.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace olmoe {

struct synthetic_options {
    // tiny | olmoe | tiny-qwen2-moe | qwen2-moe | tiny-mixtral | mixtral | tiny-qwen3-moe | qwen3-moe
    std::string preset = "tiny";
    int layers = 0; // 0: the preset's default
    std::string dtype = "bf16"; // bf16 | f32
    int shards = 1;
    std::uint64_t seed = 1;
};

namespace synth {

inline std::uint64_t splitmix(std::uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

inline std::uint64_t hash_name(const std::string& s)
{
    std::uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s)
        h = (h ^ c) * 1099511628211ull;
    return h;
}

// A standard normal value for (key, index), by Box-Muller on two hashes.
inline float normal(std::uint64_t key, std::uint64_t i)
{
    const std::uint64_t a = splitmix(key ^ (2 * i)), b = splitmix(key ^ (2 * i + 1));
    const double u1 = (double(a >> 11) + 1.0) * (1.0 / 9007199254740993.0);
    const double u2 = double(b >> 11) * (1.0 / 9007199254740992.0);
    return float(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
}

// A small English text the tokenizer's merges are learned from.
inline const char* corpus()
{
    return "the quick brown fox jumps over the lazy dog. a mixture of experts routes every token to a few "
           "experts, and the number of experts per token is a dial that can be turned at run time. the "
           "model reads the text, the router picks the experts, the experts transform the hidden state and "
           "the results are combined. there is one checkpoint for every sparsity level. in the beginning "
           "was the word, and the word was with the model. hello world! this is a test of the tokenizer: "
           "numbers 0123456789, punctuation ,.;:!? and spaces. we run the network on the cpu, token by token, "
           "and measure how the cost falls with k. ";
}

// Byte-level BPE tokenizer.json learned from corpus() with `merges` merges.
// GPT-NeoX / OLMoE style (qwen = false): ids 0 and 1 are <|endoftext|> and
// <|padding|>, then the 256 byte symbols, then the merges; ByteLevel
// pre-tokenizer with the GPT-2 regex. Qwen2 style (qwen = true): bytes, then
// merges, then <|endoftext|>, <|im_start|>, <|im_end|>; Split on the Qwen2
// regex then ByteLevel without a regex. Returns (json text, vocabulary size).
inline std::pair<std::string, int> tokenizer_json(int merges, bool qwen = false)
{
    // GPT-2 byte -> unicode table.
    std::vector<std::string> sym(256);
    auto utf8 = [](unsigned cp) {
        std::string s;
        if (cp < 0x80)
            s += char(cp);
        else {
            s += char(0xC0 | (cp >> 6));
            s += char(0x80 | (cp & 0x3F));
        }
        return s;
    };
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
        const bool keep = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        sym[std::size_t(b)] = utf8(keep ? unsigned(b) : unsigned(0x100 + extra++));
    }
    nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
    int next = qwen ? 0 : 2;
    for (int b = 0; b < 256; ++b)
        vocab[sym[std::size_t(b)]] = next++;
    // Words: a leading space joins the word (as the GPT-2 regex splits).
    std::vector<std::vector<std::string>> words;
    {
        const std::string text = corpus();
        std::string cur;
        for (char c : text) {
            if (c == ' ' && !cur.empty()) {
                std::vector<std::string> w;
                for (unsigned char ch : cur)
                    w.push_back(sym[ch]);
                words.push_back(w);
                cur.clear();
            }
            cur += c;
        }
    }
    nlohmann::ordered_json merge_list = nlohmann::ordered_json::array();
    for (int m = 0; m < merges; ++m) {
        std::map<std::pair<std::string, std::string>, int> counts;
        for (const auto& w : words)
            for (std::size_t i = 0; i + 1 < w.size(); ++i)
                ++counts[{ w[i], w[i + 1] }];
        if (counts.empty())
            break;
        auto best = counts.begin();
        for (auto it = counts.begin(); it != counts.end(); ++it)
            if (it->second > best->second)
                best = it;
        if (best->second < 2)
            break;
        const auto [a, b] = best->first;
        merge_list.push_back(a + " " + b);
        vocab[a + b] = next++;
        for (auto& w : words) {
            std::vector<std::string> out;
            for (std::size_t i = 0; i < w.size(); ++i) {
                if (i + 1 < w.size() && w[i] == a && w[i + 1] == b) {
                    out.push_back(a + b);
                    ++i;
                } else
                    out.push_back(w[i]);
            }
            w = std::move(out);
        }
    }
    auto added = [](int id, const char* content) {
        return nlohmann::ordered_json { { "id", id }, { "content", content }, { "single_word", false },
            { "lstrip", false }, { "rstrip", false }, { "normalized", false }, { "special", true } };
    };
    const nlohmann::ordered_json byte_level
        = { { "type", "ByteLevel" }, { "add_prefix_space", false }, { "trim_offsets", true }, { "use_regex", !qwen } };
    nlohmann::ordered_json added_tokens = { added(0, "<|endoftext|>"), added(1, "<|padding|>") };
    nlohmann::ordered_json pre = byte_level;
    if (qwen) {
        added_tokens = { added(next, "<|endoftext|>"), added(next + 1, "<|im_start|>"), added(next + 2, "<|im_end|>") };
        next += 3;
        nlohmann::ordered_json split = nlohmann::ordered_json::object();
        split["type"] = "Split";
        split["pattern"] = nlohmann::ordered_json::object();
        split["pattern"]["Regex"] = std::string(kdial::io::qwen2_split_pattern);
        split["behavior"] = "Isolated";
        split["invert"] = false;
        pre = nlohmann::ordered_json::object();
        pre["type"] = "Sequence";
        pre["pretokenizers"] = nlohmann::ordered_json::array({ split, byte_level });
    }
    nlohmann::ordered_json j = { { "version", "1.0" }, { "truncation", nullptr }, { "padding", nullptr },
        { "added_tokens", added_tokens }, { "normalizer", { { "type", "NFC" } } }, { "pre_tokenizer", pre },
        { "post_processor", byte_level }, { "decoder", byte_level },
        { "model",
            { { "type", "BPE" }, { "dropout", nullptr }, { "unk_token", nullptr },
                { "continuing_subword_prefix", nullptr }, { "end_of_word_suffix", nullptr }, { "fuse_unk", false },
                { "byte_fallback", false }, { "vocab", vocab }, { "merges", merge_list } } } };
    return { j.dump(1), next };
}

// The marker make-synthetic leaves in its output directory: a first line
// naming it, then the files it wrote, one per line. Only a directory that is
// new, empty, or holds nothing but the files such a marker lists (and their
// ".partial" leftovers) is written into, so a user's checkpoint or any other
// file is never overwritten or deleted.
inline constexpr const char* marker_name = ".kdial-synthetic";
inline constexpr const char* marker_header = "# written by olmoe make-synthetic; it may replace or remove these files";

inline void write_marker(const std::string& dir, const std::set<std::string>& files)
{
    std::string text = std::string(marker_header) + "\n";
    for (const auto& f : files)
        text += f + "\n";
    kdial::io::write_file_atomic(std::filesystem::path(dir) / marker_name, text);
}

// Creates `dir` if needed, checks it may be written (see marker_name),
// removes ".partial" leftovers of listed files and returns the files an
// earlier run listed.
inline std::set<std::string> claim_dir(const std::string& dir)
{
    namespace fs = std::filesystem;
    using kdial::detail::cat;
    using kdial::detail::check;
    std::error_code ec;
    const auto st = fs::status(dir, ec);
    if (!fs::exists(st)) {
        fs::create_directories(dir, ec);
        check(!ec, dir, ": cannot create the directory: ", ec.message());
        return {};
    }
    check(fs::is_directory(st), dir, ": exists and is not a directory");
    std::vector<fs::directory_entry> entries;
    for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec))
        entries.push_back(*it);
    check(!ec, dir, ": cannot list: ", ec.message());
    if (entries.empty())
        return {};
    const fs::path marker = fs::path(dir) / marker_name;
    if (!fs::exists(fs::symlink_status(marker))) {
        std::string some;
        for (std::size_t i = 0; i < entries.size() && i < 3; ++i)
            some += cat(i ? ", " : "", "'", entries[i].path().filename().string(), "'");
        throw kdial::error(cat(dir, ": is not empty (", entries.size(), " entries: ", some,
            entries.size() > 3 ? ", ..." : "", ") and has no ", marker_name,
            " marker, so it was not written by make-synthetic; refusing to write into it (give a new or empty "
            "directory)"));
    }
    const std::string text = kdial::io::read_file(marker, 1 << 20);
    std::set<std::string> listed;
    std::size_t p = 0;
    bool first = true;
    while (p < text.size()) {
        const std::size_t q = std::min(text.find('\n', p), text.size());
        const std::string line = text.substr(p, q - p);
        p = q + 1;
        if (first) {
            check(line == marker_header, marker.string(), ": not a make-synthetic marker (first line '",
                line.substr(0, 80), "'); refusing to write into ", dir);
            first = false;
            continue;
        }
        if (line.empty())
            continue;
        check(line.find('/') == std::string::npos && line != "." && line != ".." && line != marker_name,
            marker.string(), ": lists '", line.substr(0, 80), "', not a plain file name");
        listed.insert(line);
    }
    check(!first, marker.string(), ": empty marker; refusing to write into ", dir);
    std::vector<fs::path> leftovers;
    for (const auto& e : entries) {
        const std::string n = e.path().filename().string();
        if (n == marker_name)
            continue;
        const bool partial = n.size() > 8 && n.ends_with(".partial");
        const std::string base = partial ? n.substr(0, n.size() - 8) : n;
        check(listed.count(base) || (partial && base == marker_name), dir, ": holds '", n,
            "', which make-synthetic did not write (not in ", marker_name, "); refusing to write into it");
        check(fs::is_regular_file(e.symlink_status(ec)), dir, ": '", n,
            "' is not a regular file; make-synthetic only replaces files it wrote; refusing to write into it");
        if (partial)
            leftovers.push_back(e.path());
    }
    for (const auto& l : leftovers) {
        fs::remove(l, ec);
        check(!ec, l.string(), ": cannot remove an interrupted write's leftover: ", ec.message());
    }
    return listed;
}

} // namespace synth

// Writes a synthetic checkpoint to `dir`; `progress(done, total)` is called
// as tensors are generated. Returns the config written.
inline model_config make_synthetic(const std::string& dir, const synthetic_options& o,
    const std::function<void(std::size_t, std::size_t)>& progress = {})
{
    using kdial::detail::cat;
    using kdial::detail::check;
    namespace fs = std::filesystem;
    check(o.dtype == "bf16" || o.dtype == "f32" || o.dtype == "f16",
        "make-synthetic: --dtype must be bf16, f16 or f32, got '", o.dtype, "'");
    check(o.shards >= 1 && o.shards <= 64, "make-synthetic: --shards must be in [1, 64], got ", o.shards);
    check(o.layers >= 0 && o.layers <= 64, "make-synthetic: --layers must be in [1, 64], got ", o.layers);
    const bool qwen3 = o.preset == "qwen3-moe" || o.preset == "tiny-qwen3-moe";
    const bool qwen = qwen3 || o.preset == "qwen2-moe" || o.preset == "tiny-qwen2-moe";
    const bool tiny = o.preset.rfind("tiny", 0) == 0;
    const auto [tok_json, tok_vocab] = synth::tokenizer_json(tiny ? 120 : 400, qwen);
    const char* torch_dtype = o.dtype == "bf16" ? "bfloat16" : o.dtype == "f16" ? "float16" : "float32";
    nlohmann::ordered_json cfg;
    if (o.preset == "tiny" || o.preset == "olmoe") {
        cfg = { { "architectures", { "OlmoeForCausalLM" } }, { "model_type", "olmoe" },
            { "hidden_size", tiny ? 64 : 2048 }, { "intermediate_size", tiny ? 32 : 1024 },
            { "num_hidden_layers",
                o.layers   ? o.layers
                    : tiny ? 2
                           : 16 },
            { "num_attention_heads", tiny ? 4 : 16 }, { "num_key_value_heads", tiny ? 4 : 16 },
            { "num_experts", tiny ? 8 : 64 }, { "num_experts_per_tok", tiny ? 4 : 8 }, { "norm_topk_prob", false },
            { "rope_theta", 10000.0 }, { "rope_scaling", nullptr }, { "clip_qkv", nullptr },
            { "attention_bias", false }, { "hidden_act", "silu" },
            { "vocab_size", tiny ? (tok_vocab + 63) / 64 * 64 : 50304 }, { "max_position_embeddings", 4096 },
            { "tie_word_embeddings", false }, { "eos_token_id", 0 }, { "pad_token_id", 1 }, { "bos_token_id", nullptr },
            { "router_aux_loss_coef", 0.01 }, { "output_router_logits", false }, { "torch_dtype", torch_dtype } };
    } else if (qwen3) {
        // Qwen3-30B-A3B's sizes (head_dim 128 given explicitly: 32 x 128 != 2048;
        // GQA 32 / 4; 128 experts top-8 of width 768, renormalised), 4 layers by
        // default. tiny: head_dim 24 != 64 / 4, GQA 4 / 2, MoE in every second
        // layer (decoder_sparse_step 2) except layer 3 (mlp_only_layers).
        const int layers = o.layers ? o.layers : tiny ? 6 : 4;
        cfg = { { "architectures", { "Qwen3MoeForCausalLM" } }, { "model_type", "qwen3_moe" },
            { "hidden_size", tiny ? 64 : 2048 }, { "intermediate_size", tiny ? 96 : 6144 },
            { "moe_intermediate_size", tiny ? 32 : 768 }, { "num_hidden_layers", layers },
            { "num_attention_heads", tiny ? 4 : 32 }, { "num_key_value_heads", tiny ? 2 : 4 },
            { "head_dim", tiny ? 24 : 128 }, { "num_experts", tiny ? 8 : 128 }, { "num_experts_per_tok", tiny ? 4 : 8 },
            { "norm_topk_prob", true }, { "decoder_sparse_step", tiny ? 2 : 1 },
            { "mlp_only_layers",
                tiny && layers > 3 ? nlohmann::ordered_json::array({ 3 }) : nlohmann::ordered_json::array() },
            { "attention_bias", false }, { "attention_dropout", 0.0 }, { "rope_theta", 1000000.0 },
            { "rope_scaling", nullptr }, { "rms_norm_eps", 1e-6 }, { "hidden_act", "silu" },
            { "use_sliding_window", false }, { "sliding_window", nullptr }, { "max_window_layers", layers },
            { "vocab_size", tiny ? (tok_vocab + 63) / 64 * 64 : 151936 }, { "max_position_embeddings", 40960 },
            { "tie_word_embeddings", false }, { "bos_token_id", tok_vocab - 3 }, { "eos_token_id", tok_vocab - 1 },
            { "router_aux_loss_coef", 0.001 }, { "output_router_logits", false }, { "torch_dtype", torch_dtype } };
    } else if (qwen) {
        // tiny: a dense MLP layer mixed in (mlp_only_layers) and renormalised routing.
        cfg = { { "architectures", { "Qwen2MoeForCausalLM" } }, { "model_type", "qwen2_moe" },
            { "hidden_size", tiny ? 64 : 2048 }, { "intermediate_size", tiny ? 128 : 5632 },
            { "moe_intermediate_size", tiny ? 32 : 1408 }, { "shared_expert_intermediate_size", tiny ? 96 : 5632 },
            { "num_hidden_layers",
                o.layers   ? o.layers
                    : tiny ? 3
                           : 24 },
            { "num_attention_heads", tiny ? 4 : 16 }, { "num_key_value_heads", tiny ? 4 : 16 },
            { "num_experts", tiny ? 8 : 60 }, { "num_experts_per_tok", tiny ? 2 : 4 }, { "norm_topk_prob", tiny },
            { "decoder_sparse_step", 1 },
            { "mlp_only_layers", tiny ? nlohmann::ordered_json::array({ 1 }) : nlohmann::ordered_json::array() },
            { "rope_theta", 1000000.0 }, { "rms_norm_eps", 1e-6 }, { "hidden_act", "silu" },
            { "use_sliding_window", false }, { "sliding_window", 32768 }, { "max_window_layers", 21 },
            { "vocab_size", tiny ? (tok_vocab + 63) / 64 * 64 : 151936 }, { "max_position_embeddings", 8192 },
            { "tie_word_embeddings", false }, { "bos_token_id", tok_vocab - 3 }, { "eos_token_id", tok_vocab - 3 },
            { "router_aux_loss_coef", 0.001 }, { "output_router_logits", false }, { "torch_dtype", torch_dtype } };
    } else if (o.preset == "mixtral" || o.preset == "tiny-mixtral") {
        // tiny: GQA (8 query heads on 2 kv heads) and a sliding window of 8.
        cfg = { { "architectures", { "MixtralForCausalLM" } }, { "model_type", "mixtral" },
            { "hidden_size", tiny ? 64 : 4096 }, { "intermediate_size", tiny ? 48 : 14336 },
            { "num_hidden_layers",
                o.layers   ? o.layers
                    : tiny ? 2
                           : 32 },
            { "num_attention_heads", tiny ? 8 : 32 }, { "num_key_value_heads", tiny ? 2 : 8 },
            { "num_local_experts", tiny ? 4 : 8 }, { "num_experts_per_tok", 2 }, { "rope_theta", 1000000.0 },
            { "rms_norm_eps", 1e-5 }, { "hidden_act", "silu" },
            { "sliding_window", tiny ? nlohmann::ordered_json(8) : nlohmann::ordered_json(nullptr) },
            { "vocab_size", tiny ? (tok_vocab + 63) / 64 * 64 : 32000 }, { "max_position_embeddings", 32768 },
            { "tie_word_embeddings", false }, { "bos_token_id", 1 }, { "eos_token_id", 0 },
            { "router_aux_loss_coef", 0.02 }, { "output_router_logits", false }, { "torch_dtype", torch_dtype } };
    } else
        throw kdial::error(cat("make-synthetic: unknown --preset '", o.preset,
            "' (tiny, olmoe, tiny-qwen2-moe, qwen2-moe, tiny-mixtral, mixtral, tiny-qwen3-moe, qwen3-moe)"));
    const model_config c = parse_config(cfg.dump(), "synthetic config");

    // The tensor list, in Hugging Face names, with an init scale each.
    struct spec {
        std::string name;
        std::vector<std::size_t> shape;
        float scale; // standard deviation
        float offset; // added (norm weights sit around 1)
    };
    std::vector<spec> specs;
    const std::size_t d = std::size_t(c.hidden), V = std::size_t(c.vocab), F = std::size_t(c.expert_ffn),
                      qw = std::size_t(c.heads * c.head_dim), kw = std::size_t(c.kv_heads * c.head_dim);
    const float sd = 1.0f / std::sqrt(float(d));
    specs.push_back({ "model.embed_tokens.weight", { V, d }, 1.0f, 0.0f });
    const std::string moe = c.fam == family::mixtral ? "block_sparse_moe" : "mlp";
    auto mlp = [&](const std::string& pre, std::size_t width, const char* g, const char* u, const char* dn) {
        specs.push_back({ pre + g, { width, d }, sd, 0.0f });
        specs.push_back({ pre + u, { width, d }, sd, 0.0f });
        specs.push_back({ pre + dn, { d, width }, 1.0f / std::sqrt(float(width)), 0.0f });
    };
    for (int l = 0; l < c.layers; ++l) {
        const std::string p = cat("model.layers.", l, ".");
        specs.push_back({ p + "input_layernorm.weight", { d }, 0.1f, 1.0f });
        specs.push_back({ p + "self_attn.q_proj.weight", { qw, d }, sd, 0.0f });
        specs.push_back({ p + "self_attn.k_proj.weight", { kw, d }, sd, 0.0f });
        specs.push_back({ p + "self_attn.v_proj.weight", { kw, d }, sd, 0.0f });
        specs.push_back({ p + "self_attn.o_proj.weight", { d, qw }, 1.0f / std::sqrt(float(qw)), 0.0f });
        if (c.qkv_bias || c.attention_bias) {
            specs.push_back({ p + "self_attn.q_proj.bias", { qw }, 0.1f, 0.0f });
            specs.push_back({ p + "self_attn.k_proj.bias", { kw }, 0.1f, 0.0f });
            specs.push_back({ p + "self_attn.v_proj.bias", { kw }, 0.1f, 0.0f });
        }
        if (c.attention_bias)
            specs.push_back({ p + "self_attn.o_proj.bias", { d }, 0.1f, 0.0f });
        if (c.qk_norm) {
            const std::size_t hd = std::size_t(c.head_dim);
            specs.push_back({ p + "self_attn.q_norm.weight", { c.qk_norm_per_head ? hd : qw }, 0.1f, 1.0f });
            specs.push_back({ p + "self_attn.k_norm.weight", { c.qk_norm_per_head ? hd : kw }, 0.1f, 1.0f });
        }
        specs.push_back({ p + "post_attention_layernorm.weight", { d }, 0.1f, 1.0f });
        if (!c.is_moe_layer(l)) {
            mlp(p + "mlp.", std::size_t(c.dense_ffn), "gate_proj.weight", "up_proj.weight", "down_proj.weight");
            continue;
        }
        specs.push_back({ p + moe + ".gate.weight", { std::size_t(c.experts), d }, 3.0f * sd, 0.0f });
        for (int e = 0; e < c.experts; ++e) {
            const std::string ep = cat(p, moe, ".experts.", e, ".");
            if (c.fam == family::mixtral)
                mlp(ep, F, "w1.weight", "w3.weight", "w2.weight");
            else
                mlp(ep, F, "gate_proj.weight", "up_proj.weight", "down_proj.weight");
        }
        if (c.shared_ffn > 0) {
            mlp(p + "mlp.shared_expert.", std::size_t(c.shared_ffn), "gate_proj.weight", "up_proj.weight",
                "down_proj.weight");
            specs.push_back({ p + "mlp.shared_expert_gate.weight", { 1, d }, sd, 0.0f });
        }
    }
    specs.push_back({ "model.norm.weight", { d }, 0.1f, 1.0f });
    specs.push_back({ "lm_head.weight", { V, d }, 2.0f * sd, 0.0f });

    // The files this run writes; the directory must be new, empty or hold
    // only an earlier run's files (listed in its marker).
    const int S = o.shards;
    std::vector<std::string> shard_files;
    for (int sh = 0; sh < S; ++sh)
        shard_files.push_back(S == 1 ? std::string("model.safetensors")
                                     : cat("model-", std::string(5 - std::to_string(sh + 1).size(), '0'), sh + 1,
                                         "-of-", std::string(5 - std::to_string(S).size(), '0'), S, ".safetensors"));
    std::set<std::string> ours(shard_files.begin(), shard_files.end());
    ours.insert({ "config.json", "tokenizer.json" });
    if (S > 1)
        ours.insert("model.safetensors.index.json");
    const std::set<std::string> earlier = synth::claim_dir(dir);
    std::set<std::string> both = earlier;
    both.insert(ours.begin(), ours.end());
    synth::write_marker(dir, both); // covers this run's files should it be interrupted
    const bool bf = o.dtype == "bf16", half = o.dtype == "f16";
    std::size_t total_bytes = 0, elem = bf || half ? 2 : 4;
    for (const auto& s : specs) {
        std::size_t n = 1;
        for (auto x : s.shape)
            n *= x;
        total_bytes += n * elem;
    }
    // Shards: consecutive tensors, about total / shards bytes each.
    std::vector<int> shard_of(specs.size());
    {
        std::size_t acc = 0;
        for (std::size_t i = 0; i < specs.size(); ++i) {
            std::size_t n = elem;
            for (auto x : specs[i].shape)
                n *= x;
            shard_of[i] = std::min(S - 1, int(double(acc) / double(total_bytes) * S));
            acc += n;
        }
    }
    nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
    std::size_t done = 0;
    for (int sh = 0; sh < S; ++sh) {
        const std::string& file = shard_files[std::size_t(sh)];
        std::vector<std::vector<float>> f32s;
        std::vector<std::vector<kdial::bf16>> bf16s;
        std::vector<std::vector<kdial::f16>> f16s;
        std::vector<kdial::io::tensor_data> tensors;
        for (std::size_t i = 0; i < specs.size(); ++i) {
            if (shard_of[i] != sh)
                continue;
            const auto& s = specs[i];
            std::size_t n = 1;
            for (auto x : s.shape)
                n *= x;
            const std::uint64_t key = synth::hash_name(s.name) ^ synth::splitmix(o.seed);
            std::vector<float> v(n);
            tbb::parallel_for(tbb::blocked_range<std::size_t>(0, n, std::size_t(1) << 14),
                [&](const tbb::blocked_range<std::size_t>& r) {
                    for (std::size_t j = r.begin(); j != r.end(); ++j)
                        v[j] = s.offset + s.scale * synth::normal(key, j);
                });
            // Special tokens and padded vocabulary rows never win the argmax
            // (so the demo's generation does not stop at once).
            if (s.name == "lm_head.weight")
                for (std::size_t row = 0; row < s.shape[0]; ++row)
                    if ((!qwen && row < 2) || (qwen && row + 3 >= std::size_t(tok_vocab))
                        || row >= std::size_t(tok_vocab))
                        std::fill(v.begin() + std::ptrdiff_t(row * s.shape[1]),
                            v.begin() + std::ptrdiff_t((row + 1) * s.shape[1]), 0.0f);
            if (half) {
                std::vector<kdial::f16> h(n);
                for (std::size_t j = 0; j < n; ++j)
                    h[j] = kdial::f16::from_float(v[j]);
                f16s.push_back(std::move(h));
                tensors.push_back({ s.name, kdial::io::st_dtype::f16, s.shape, std::as_bytes(std::span(f16s.back())) });
            } else if (bf) {
                std::vector<kdial::bf16> b(n);
                for (std::size_t j = 0; j < n; ++j)
                    b[j] = kdial::bf16::from_float(v[j]);
                bf16s.push_back(std::move(b));
                tensors.push_back(kdial::io::make_tensor(s.name, s.shape, std::span<const kdial::bf16>(bf16s.back())));
            } else {
                f32s.push_back(std::move(v));
                tensors.push_back(kdial::io::make_tensor(s.name, s.shape, std::span<const float>(f32s.back())));
            }
            weight_map[s.name] = file;
            done += n * elem;
            if (progress)
                progress(done, total_bytes);
        }
        kdial::io::write_safetensors(fs::path(dir) / file, tensors, { { "format", "pt" } });
    }
    if (S > 1) {
        nlohmann::ordered_json index
            = { { "metadata", { { "total_size", total_bytes } } }, { "weight_map", weight_map } };
        kdial::io::write_file_atomic(fs::path(dir) / "model.safetensors.index.json", index.dump(2) + "\n");
    }
    kdial::io::write_file_atomic(fs::path(dir) / "config.json", cfg.dump(2) + "\n");
    kdial::io::write_file_atomic(fs::path(dir) / "tokenizer.json", tok_json + "\n");
    // An earlier run's files this run did not rewrite (other shard names, an
    // index no longer needed): only names the marker lists are removed.
    for (const auto& n : earlier)
        if (!ours.count(n)) {
            std::error_code ec;
            fs::remove(fs::path(dir) / n, ec);
            check(!ec, (fs::path(dir) / n).string(), ": cannot remove a stale file: ", ec.message());
        }
    synth::write_marker(dir, ours);
    return c;
}

} // namespace olmoe
