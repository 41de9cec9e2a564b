// Small tokenizer.json documents for the tokenizer fuzz targets: the 256
// byte symbols (id = byte value), a few merges, and optionally added tokens.
// Stage: io (test support for fuzz/; not installed).
#pragma once

#include <kdial/io/tokenizer.hpp>

#include <nlohmann/json.hpp>

#include <string>
#include <utility>
#include <vector>

namespace kdial::fuzz {

// `qwen2`: the Qwen2 split regex (else GPT-2 / NeoX) and NFC; `added`: three
// added tokens (two special, unnormalised; one normal, normalised).
inline std::string tokenizer_json(bool qwen2, bool added)
{
    using json = nlohmann::json;
    using kdial::io::byte_level_encode;
    json vocab = json::object();
    for (int b = 0; b < 256; ++b)
        vocab[byte_level_encode(std::string(1, char(b)))] = b;
    int next = 256;
    json merges = json::array();
    const std::vector<std::pair<std::string, std::string>> pairs
        = { { "h", "e" }, { "l", "l" }, { "he", "ll" }, { "hell", "o" }, { " ", "w" }, { "o", "r" }, { " w", "or" },
              { "\xC3", "\xA9" }, { "\xCC", "\x81" }, { "a", "\xCC\x81" }, { " ", " " }, { "  ", "  " } };
    for (const auto& [a, b] : pairs) {
        const std::string ab = byte_level_encode(a + b);
        if (!vocab.contains(ab))
            vocab[ab] = next++;
        merges.push_back(byte_level_encode(a) + " " + byte_level_encode(b));
    }
    const json bytelevel = { { "type", "ByteLevel" }, { "add_prefix_space", false }, { "trim_offsets", false },
        { "use_regex", !qwen2 } };
    json pre = bytelevel;
    if (qwen2)
        pre = { { "type", "Sequence" },
            { "pretokenizers",
                json::array({ { { "type", "Split" },
                                  { "pattern", { { "Regex", std::string(kdial::io::qwen2_split_pattern) } } },
                                  { "behavior", "Isolated" }, { "invert", false } },
                    bytelevel }) } };
    json added_tokens = json::array();
    if (added) {
        auto tok = [](int id, const char* content, bool special) {
            return json { { "id", id }, { "content", content }, { "single_word", false }, { "lstrip", false },
                { "rstrip", false }, { "normalized", !special }, { "special", special } };
        };
        added_tokens.push_back(tok(next, "<|endoftext|>", true));
        added_tokens.push_back(tok(next + 1, "<|im_start|>", true));
        added_tokens.push_back(tok(next + 2, "[MASK]", false));
    }
    const json model = { { "type", "BPE" }, { "dropout", nullptr }, { "unk_token", nullptr }, { "fuse_unk", false },
        { "byte_fallback", false }, { "ignore_merges", false }, { "vocab", vocab }, { "merges", merges } };
    const json j = { { "version", "1.0" }, { "added_tokens", added_tokens }, { "normalizer", { { "type", "NFC" } } },
        { "pre_tokenizer", pre }, { "post_processor", bytelevel }, { "decoder", bytelevel }, { "model", model } };
    return j.dump();
}

} // namespace kdial::fuzz
