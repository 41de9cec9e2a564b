// The byte-level BPE tokenizer of a GGUF file's metadata (tokenizer.ggml.*),
// so that one .gguf file is enough to run a model on text.
// Stage: io, in front of the model. The metadata are turned into the
// tokenizer.json that Hugging Face's tokenizers would read for the same
// model, and bpe_tokenizer loads that (one validating code path):
//   - tokenizer.ggml.model must be "gpt2" (byte-level BPE); "llama"
//     (SentencePiece, Mixtral) and others are refused with their name;
//   - tokenizer.ggml.tokens are the vocabulary by id; token_type CONTROL (3)
//     tokens become special added tokens, USER_DEFINED (4) ones non-special
//     added tokens (llama.cpp's converter stores those as plain text), the
//     rest (normal, unknown, unused, byte) the BPE vocabulary;
//   - tokenizer.ggml.merges are the merges, "left right", in rank order;
//   - tokenizer.ggml.pre names the pre-tokenizer: "olmo" (GPT-NeoX / OLMoE
//     tokenizers: GPT-2 split regex, NFC normaliser), "gpt-2" (GPT-2 regex,
//     no normaliser), "qwen2" (Qwen2 split regex, then ByteLevel without a
//     regex, NFC); the normalisers are those of the models' tokenizer.json
//     files, which GGUF does not record.
// Invariants: every failure is a kdial::error naming the file and the key
// (and the token index where one is at fault).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "gguf.hpp"
#include "tokenizer.hpp"

namespace kdial::io {

struct gguf_tokenizer {
    bpe_tokenizer tok;
    std::string pre; // tokenizer.ggml.pre
    std::optional<std::int32_t> bos, eos; // tokenizer.ggml.{bos,eos}_token_id
    bool add_bos = false; // tokenizer.ggml.add_bos_token: prepend bos to a prompt

    // The tokenizer.json text equivalent to f's tokenizer metadata.
    static std::string tokenizer_json(const gguf_file& f)
    {
        using ::kdial::detail::cat;
        using ::kdial::detail::check;
        const std::string_view model = f.get_string("tokenizer.ggml.model");
        check(model == "gpt2", f.name(), ": tokenizer.ggml.model is '", detail::gguf_printable(model),
            "'; only 'gpt2' (byte-level BPE) is supported", model == "llama" ? " (SentencePiece is not)" : "");
        check(f.has_key("tokenizer.ggml.pre"), f.name(),
            ": no tokenizer.ggml.pre (the pre-tokenizer is unknown; supported: olmo, gpt-2, qwen2)");
        const std::string pre(f.get_string("tokenizer.ggml.pre"));
        const auto tokens = f.get_strings("tokenizer.ggml.tokens");
        const gguf_value* types = f.find_key("tokenizer.ggml.token_type");
        if (types)
            check(types->type == gguf_type::array && types->count == tokens.size()
                    && (types->elem == gguf_type::i32 || types->elem == gguf_type::u32 || types->elem == gguf_type::i8
                        || types->elem == gguf_type::u8),
                f.name(), ": tokenizer.ggml.token_type is ", types->describe(), ", expected ", tokens.size(),
                " integers (one per token)");

        nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
        nlohmann::ordered_json added = nlohmann::ordered_json::array();
        std::unordered_set<std::string> seen;
        std::vector<std::size_t> added_ids;
        for (std::size_t i = 0; i < tokens.size(); ++i) {
            const std::string_view t = tokens[i];
            const std::int64_t ty = types ? types->int_at(i).value_or(1) : 1;
            check(!t.empty(), f.name(), ": tokenizer.ggml.tokens[", i, "] is empty");
            check(utf8_is_valid(t), f.name(), ": tokenizer.ggml.tokens[", i, "] is not valid UTF-8");
            if (ty == 3 || ty == 4) {
                added.push_back({ { "id", i }, { "content", std::string(t) }, { "single_word", false },
                    { "lstrip", false }, { "rstrip", false }, { "normalized", ty == 4 }, { "special", ty == 3 } });
                added_ids.push_back(i);
                continue;
            }
            check(seen.insert(std::string(t)).second, f.name(), ": tokenizer.ggml.tokens[", i, "] '",
                detail::gguf_printable(t), "' appears twice");
            vocab[std::string(t)] = i;
        }
        // llama.cpp stores added tokens as plain text; their byte-level form
        // is also in the Hugging Face vocabulary (merges may produce it), so
        // it goes there too unless a normal token already has it.
        for (const std::size_t i : added_ids) {
            std::string b = byte_level_encode(tokens[i]);
            if (seen.insert(b).second)
                vocab[std::move(b)] = i;
        }
        nlohmann::ordered_json merges = nlohmann::ordered_json::array();
        if (f.has_key("tokenizer.ggml.merges"))
            for (const auto m : f.get_strings("tokenizer.ggml.merges"))
                merges.push_back(std::string(m));

        const auto byte_level = [](bool use_regex) {
            return nlohmann::ordered_json { { "type", "ByteLevel" }, { "add_prefix_space", false },
                { "trim_offsets", true }, { "use_regex", use_regex } };
        };
        nlohmann::ordered_json pre_tok, normalizer = nullptr;
        if (pre == "olmo" || pre == "gpt-2" || pre == "gpt2") {
            pre_tok = byte_level(true);
            if (pre == "olmo")
                normalizer = { { "type", "NFC" } };
        } else if (pre == "qwen2") {
            nlohmann::ordered_json split
                = { { "type", "Split" }, { "pattern", { { "Regex", std::string(qwen2_split_pattern) } } },
                      { "behavior", "Isolated" }, { "invert", false } };
            pre_tok = { { "type", "Sequence" }, { "pretokenizers", { split, byte_level(false) } } };
            normalizer = { { "type", "NFC" } };
        } else
            throw error(cat(f.name(), ": tokenizer.ggml.pre is '", detail::gguf_printable(pre),
                "'; supported pre-tokenizers: olmo, gpt-2, qwen2"));
        const nlohmann::ordered_json j
            = { { "version", "1.0" }, { "added_tokens", added }, { "normalizer", normalizer },
                  { "pre_tokenizer", pre_tok }, { "post_processor", byte_level(true) }, { "decoder", byte_level(true) },
                  { "model",
                      { { "type", "BPE" }, { "dropout", nullptr }, { "unk_token", nullptr }, { "fuse_unk", false },
                          { "byte_fallback", false }, { "vocab", vocab }, { "merges", merges } } } };
        return j.dump();
    }

    // The tokenizer of f, or nothing when f has no tokenizer.ggml.model.
    static std::optional<gguf_tokenizer> from_gguf(const gguf_file& f)
    {
        if (!f.has_key("tokenizer.ggml.model"))
            return std::nullopt;
        const std::string text = tokenizer_json(f);
        gguf_tokenizer g { bpe_tokenizer::from_json(text, f.name() + " (GGUF tokenizer metadata)"),
            std::string(f.get_string("tokenizer.ggml.pre")), std::nullopt, std::nullopt, false };
        const auto id = [&](const char* key) -> std::optional<std::int32_t> {
            if (!f.has_key(key))
                return std::nullopt;
            const auto v = f.get_int(key, 0, 0x7fffffff);
            ::kdial::detail::check(g.tok.is_valid_id(std::int32_t(v)), f.name(), ": ", key, " = ", v,
                " is not a token id of tokenizer.ggml.tokens");
            return std::int32_t(v);
        };
        g.bos = id("tokenizer.ggml.bos_token_id");
        g.eos = id("tokenizer.ggml.eos_token_id");
        if (f.has_key("tokenizer.ggml.add_bos_token"))
            g.add_bos = f.get_bool("tokenizer.ggml.add_bos_token");
        ::kdial::detail::check(!g.add_bos || g.bos.has_value(), f.name(),
            ": tokenizer.ggml.add_bos_token is true but there is no tokenizer.ggml.bos_token_id");
        return g;
    }
};

} // namespace kdial::io
