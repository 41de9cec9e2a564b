// Byte-level BPE tokenizer read from a Hugging Face `tokenizer.json` (the
// GPT-2 / GPT-NeoX / OLMoE and Qwen2 families; spec §3.4, §4.4, §7).
// Stage: io, in front of the model (text <-> token ids). Invariants: the file
// is validated completely at load (every failure is a kdial::error naming the
// file and the JSON field); after that the tokenizer is immutable, and
// encode/decode are const and safe to call from several threads at once (the
// per-piece BPE cache is guarded by a mutex). Results match HF tokenizers'
// pipeline: added tokens -> NFC -> split regex -> byte map -> BPE -> ids ->
// post-processor (the special tokens of its template).
//
// Supported: model BPE (byte_fallback false, no dropout, ignore_merges, merges
// as "a b" or ["a", "b"]); normalizer null / NFC / Sequence of NFC (NFC with
// Unicode 9.0 data, as HF's normaliser: see unicode.hpp); pre_tokenizer
// ByteLevel (add_prefix_space, use_regex) or a Sequence of Split(GPT-2 or
// Qwen2 regex, Isolated or Removed, invert false) stages ending in ByteLevel;
// decoder ByteLevel; post_processor null, ByteLevel (offsets only: adds
// nothing), TemplateProcessing (single and pair templates, special_tokens),
// BertProcessing and RobertaProcessing (cls/sep), or a Sequence of these with
// at most one that adds tokens. Added tokens with lstrip / rstrip /
// single_word set are rejected, as are other regexes: the two known ones are
// hand-written matchers (std::regex has no \p).
//
// encode() applies the post-processor, as HF's encode(text) does by default
// (add_special_tokens=True): the released OLMoE and Qwen2 files have one that
// adds nothing (TemplateProcessing "$A" / "$A $B", or ByteLevel), so their
// ids carry no BOS, exactly as in HF; a file whose template adds e.g. a BOS
// gets it. Pass add_special = false for the plain ids.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "json.hpp"
#include "unicode.hpp"

namespace kdial::io {

// ---------------------------------------------------------------------------
// The GPT-2 byte <-> unicode alphabet (spec §7.1)
// ---------------------------------------------------------------------------

// Bytes 0x21..0x7E, 0xA1..0xAC, 0xAE..0xFF map to the same code point; the
// other 68 bytes, in increasing order, to U+0100, U+0101, ... (0x20 -> U+0120 'Ġ').
inline constexpr std::array<char32_t, 256> byte_level_chars = [] {
    std::array<char32_t, 256> t {};
    char32_t next = 0x100;
    for (int b = 0; b < 256; ++b) {
        const bool same = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        t[b] = same ? char32_t(b) : next++;
    }
    return t;
}();

// Inverse of byte_level_chars over U+0000..U+0143: the byte, or -1.
inline constexpr std::array<std::int16_t, 0x144> byte_level_bytes = [] {
    std::array<std::int16_t, 0x144> t {};
    t.fill(-1);
    for (int b = 0; b < 256; ++b)
        t[byte_level_chars[b]] = static_cast<std::int16_t>(b);
    return t;
}();

// The byte-level alphabet spelling of raw bytes (what vocab keys look like).
inline std::string byte_level_encode(std::string_view bytes)
{
    std::string out;
    out.reserve(bytes.size() * 2);
    for (unsigned char b : bytes)
        utf8_append(out, byte_level_chars[b]);
    return out;
}

// The bytes a token string stands for (ByteLevel decoder): every character
// mapped back through the table; if any character is outside the table (e.g.
// an added token holding raw spaces) the token's own UTF-8 bytes instead.
inline std::string byte_level_decode(std::string_view token)
{
    std::string out;
    out.reserve(token.size());
    for (std::size_t i = 0; i < token.size();) {
        const auto c = utf8_decode(token, i);
        if (!c.valid || c.cp >= byte_level_bytes.size() || byte_level_bytes[c.cp] < 0)
            return std::string(token);
        out.push_back(static_cast<char>(byte_level_bytes[c.cp]));
        i += c.size;
    }
    return out;
}

// ---------------------------------------------------------------------------
// The split regexes (spec §7.2), as hand-written matchers
// ---------------------------------------------------------------------------

enum class split_regex : std::uint8_t {
    gpt2, // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    qwen2, // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|
           // ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
};

inline constexpr std::string_view gpt2_split_pattern
    = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
inline constexpr std::string_view qwen2_split_pattern
    = R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

inline std::optional<split_regex> recognise_split_pattern(std::string_view pattern) noexcept
{
    if (pattern == gpt2_split_pattern)
        return split_regex::gpt2;
    if (pattern == qwen2_split_pattern)
        return split_regex::qwen2;
    return std::nullopt;
}

namespace detail {

using ::kdial::detail::cat;
using ::kdial::detail::check;

// One character of a segment: code point (U+FFFD for an ill-formed subpart,
// whose class is then "other"), its class, and its byte offset.
struct tok_char {
    char32_t cp;
    char_class cls;
    std::uint32_t offset;
};

inline void tok_chars(std::string_view s, std::vector<tok_char>& out)
{
    out.clear();
    for (std::size_t i = 0; i < s.size();) {
        const auto c = utf8_decode(s, i);
        out.push_back({ c.cp, c.valid ? unicode_class(c.cp) : char_class::other, static_cast<std::uint32_t>(i) });
        i += c.size;
    }
}

// Both regexes match at every position (no alternative leaves a gap), so a
// matcher returns the end (in characters, > i) of the match starting at i.
// Semantics: alternatives in order, greedy quantifiers with backtracking, as
// Oniguruma runs them inside HF tokenizers.
struct split_matcher {
    const std::vector<tok_char>& t;

    std::size_t size() const { return t.size(); }
    char32_t cp(std::size_t k) const { return k < t.size() ? t[k].cp : 0; }
    char_class cls(std::size_t k) const { return t[k].cls; }
    std::size_t run(std::size_t k, char_class c) const
    {
        while (k < t.size() && t[k].cls == c)
            ++k;
        return k;
    }
    static bool is_cr_lf(char32_t c) { return c == '\r' || c == '\n'; }

    // 's 't 're 've 'm 'll 'd, optionally case-insensitive; returns the end or 0.
    std::size_t contraction(std::size_t i, bool icase) const
    {
        if (cp(i) != '\'')
            return 0;
        auto fold = [&](char32_t c) -> char32_t {
            if (!icase)
                return c;
            if (c >= 'A' && c <= 'Z')
                return c + ('a' - 'A');
            if (c == 0x17F) // LATIN SMALL LETTER LONG S case-folds to 's' (CaseFolding.txt)
                return 's';
            return c;
        };
        const char32_t a = fold(cp(i + 1)), b = fold(cp(i + 2));
        if (a == 's' || a == 't' || a == 'm' || a == 'd')
            return i + 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
            return i + 3;
        return 0;
    }

    // \s+(?!\S)|\s+ at a whitespace character i: a run followed by a
    // non-space gives up its last character (unless that would leave nothing).
    std::size_t space_run(std::size_t i) const
    {
        const std::size_t e = run(i, char_class::space);
        if (e == size() || e - i == 1)
            return e;
        return e - 1;
    }

    std::size_t gpt2(std::size_t i) const
    {
        if (const auto e = contraction(i, false))
            return e;
        // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': an optional literal space,
        // then a run of one class (a space before a space is left to \s).
        std::size_t j = i;
        if (cp(i) == ' ' && i + 1 < size() && cls(i + 1) != char_class::space)
            j = i + 1;
        if (cls(j) != char_class::space)
            return run(j, cls(j));
        return space_run(i);
    }

    std::size_t qwen2(std::size_t i) const
    {
        if (const auto e = contraction(i, true))
            return e;
        const char_class c = cls(i);
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if (c == char_class::letter)
            return run(i, c);
        if (c != char_class::number && !is_cr_lf(cp(i)) && i + 1 < size() && cls(i + 1) == char_class::letter)
            return run(i + 1, char_class::letter);
        // \p{N}: one digit per piece
        if (c == char_class::number)
            return i + 1;
        // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        std::size_t j = i;
        if (cp(i) == ' ' && i + 1 < size() && cls(i + 1) == char_class::other)
            j = i + 1;
        if (cls(j) == char_class::other) {
            std::size_t e = run(j, char_class::other);
            while (e < size() && is_cr_lf(cp(e)))
                ++e;
            return e;
        }
        // '\s*[\r\n]+': the whitespace run up to and including its last CR/LF.
        const std::size_t e = run(i, char_class::space);
        for (std::size_t k = e; k > i; --k)
            if (is_cr_lf(cp(k - 1)))
                return k;
        return space_run(i);
    }
};

} // namespace detail

// Splits `text` with one of the known regexes: the matched pieces in order
// (they tile the text). Ill-formed UTF-8 subparts count as punctuation.
inline std::vector<std::string_view> split_with_regex(split_regex re, std::string_view text)
{
    std::vector<detail::tok_char> chars;
    detail::tok_chars(text, chars);
    const detail::split_matcher m { chars };
    std::vector<std::string_view> out;
    for (std::size_t i = 0; i < chars.size();) {
        const std::size_t e = re == split_regex::gpt2 ? m.gpt2(i) : m.qwen2(i);
        KDIAL_ASSERT(e > i && e <= chars.size());
        const std::size_t b0 = chars[i].offset, b1 = e < chars.size() ? chars[e].offset : text.size();
        out.push_back(text.substr(b0, b1 - b0));
        i = e;
    }
    return out;
}

// ---------------------------------------------------------------------------
// The tokenizer
// ---------------------------------------------------------------------------

// One entry of `added_tokens`.
struct added_token {
    std::int32_t id = 0;
    std::string content;
    bool special = false;
    bool normalized = false;
};

class bpe_tokenizer {
public:
    // Reads a tokenizer.json file (opened only when it is a regular file, at
    // most json_max_bytes); errors name the path.
    static bpe_tokenizer from_file(const std::filesystem::path& path)
    {
        return from_json(read_file_checked(path, "tokenizer file", json_max_bytes), path.string());
    }

    // Parses the text of a tokenizer.json; `source_name` names it in errors.
    static bpe_tokenizer from_json(std::string_view json_text, std::string_view source_name = "tokenizer.json")
    {
        bpe_tokenizer t;
        t.load(json_text, std::string(source_name));
        return t;
    }

    bpe_tokenizer(const bpe_tokenizer& o)
        : bpe_tokenizer(copy_tag {}, o)
    {
    }
    bpe_tokenizer(bpe_tokenizer&&) noexcept = default;
    bpe_tokenizer& operator=(const bpe_tokenizer& o)
    {
        if (this != &o)
            *this = bpe_tokenizer(o);
        return *this;
    }
    bpe_tokenizer& operator=(bpe_tokenizer&&) noexcept = default;

    // Text -> ids. With parse_special, the strings of special added tokens in
    // `text` become their ids (HF's default); without, they are encoded as
    // ordinary text. Non-special added tokens are always matched. With
    // add_special (HF's add_special_tokens, default true) the post-processor's
    // single template is applied: its special tokens (e.g. a BOS) around the
    // text's ids; without, none are added. Ill-formed UTF-8 in `text` is kept
    // byte for byte (each ill-formed subpart is punctuation for the split
    // regex), so with all 256 byte symbols in the vocab, no add_prefix_space
    // and nothing added by the post-processor,
    // decode_bytes(encode(s)) == nfc_normalize(s) for every byte string s.
    std::vector<std::int32_t> encode(std::string_view text, bool parse_special = true, bool add_special = true) const
    {
        std::vector<std::int32_t> ids = encode_plain(text, parse_special);
        if (single_template_.size() == 1) // "$A": nothing to add (the common case)
            return ids;
        return apply_template(single_template_, ids, {}, add_special);
    }

    // A pair of texts -> ids (HF's encode(a, b)): each encoded as by encode()
    // without specials, then joined by the post-processor's pair template
    // (with add_special; else the sequences alone, in the template's order).
    std::vector<std::int32_t> encode_pair(
        std::string_view a, std::string_view b, bool parse_special = true, bool add_special = true) const
    {
        return apply_template(
            pair_template_, encode_plain(a, parse_special), encode_plain(b, parse_special), add_special);
    }

    // The post-processor applied to ids already encoded without specials
    // (encode(s) == post_process(encode(s, ps, false)) for any s and ps).
    std::vector<std::int32_t> post_process(std::span<const std::int32_t> a) const
    {
        return apply_template(single_template_, a, {}, true);
    }
    std::vector<std::int32_t> post_process(std::span<const std::int32_t> a, std::span<const std::int32_t> b) const
    {
        return apply_template(pair_template_, a, b, true);
    }

    // How many ids the post-processor adds to one sequence or to a pair (HF's
    // num_special_tokens_to_add).
    std::size_t post_processor_added(bool pair) const noexcept
    {
        const auto& t = pair ? pair_template_ : single_template_;
        return std::size_t(std::count_if(t.begin(), t.end(), [](std::int32_t x) { return x >= 0; }));
    }

    // The post-processor's type as the file names it ("TemplateProcessing",
    // "Sequence", ...; "null" when absent).
    const std::string& post_processor_type() const noexcept { return post_type_; }

private:
    std::vector<std::int32_t> encode_plain(std::string_view text, bool parse_special) const
    {
        std::vector<std::int32_t> ids;
        scratch sc;
        for_each_added_split(raw_trie_, text, parse_special, ids, [&](std::string_view seg) {
            if (seg.empty())
                return;
            const std::string norm = nfc_ ? nfc_normalize(seg) : std::string(seg);
            for_each_added_split(
                norm_trie_, norm, parse_special, ids, [&](std::string_view s) { encode_segment(s, ids, sc); });
        });
        return ids;
    }

    // A template's entries: >= 0 a special token id, else one of these.
    static constexpr std::int32_t seq_a = -1, seq_b = -2;

    static std::vector<std::int32_t> apply_template(const std::vector<std::int32_t>& tmpl,
        std::span<const std::int32_t> a, std::span<const std::int32_t> b, bool add_special)
    {
        std::vector<std::int32_t> out;
        out.reserve(a.size() + b.size() + tmpl.size());
        for (const std::int32_t x : tmpl) {
            if (x == seq_a)
                out.insert(out.end(), a.begin(), a.end());
            else if (x == seq_b)
                out.insert(out.end(), b.begin(), b.end());
            else if (add_special)
                out.push_back(x);
        }
        return out;
    }

public:
    // The pieces the pre-tokenizer makes of one segment (no added-token
    // matching, no normalisation): the input of BPE, before the byte map.
    std::vector<std::string> pre_tokenize(std::string_view segment) const
    {
        std::vector<std::string> pieces;
        scratch sc;
        run_pre_tokenizer(segment, pieces, sc);
        return pieces;
    }

    // Ids -> the bytes they stand for, concatenated (no UTF-8 repair).
    std::string decode_bytes(std::span<const std::int32_t> ids, bool skip_special = false) const
    {
        std::string out;
        for (const std::int32_t id : ids) {
            const auto& e = entry(id);
            if (!(skip_special && e.special))
                out += e.bytes;
        }
        return out;
    }

    // Ids -> text; ill-formed UTF-8 (e.g. a multi-byte character cut between
    // the ids given) becomes U+FFFD per maximal subpart. Throws kdial::error on
    // an id without a token (see is_valid_id). skip_special drops special
    // added tokens.
    std::string decode(std::span<const std::int32_t> ids, bool skip_special = false) const
    {
        return utf8_sanitize(decode_bytes(ids, skip_special));
    }

    // The number of entries: distinct token strings of the vocab and the
    // added tokens (HF's len(tokenizer)). Ids need not be dense: HF accepts
    // any ids (a small vocab with its specials at 50279, say), so an id can
    // exceed it, and an id below it can be a hole; model embeddings are
    // often larger still (padded rows).
    std::size_t vocab_size() const noexcept { return n_tokens_; }
    // One past the largest id that has a token (0 for an empty tokenizer).
    std::size_t id_limit() const noexcept { return entry_ids_.empty() ? 0 : std::size_t(entry_ids_.back()) + 1; }
    bool is_valid_id(std::int32_t id) const noexcept { return find_entry(id) != nullptr; }
    // Every id that has a token, ascending (the way to walk a vocabulary
    // whose ids have gaps).
    std::span<const std::int32_t> ids() const noexcept { return entry_ids_; }
    bool is_special(std::int32_t id) const noexcept
    {
        const id_entry* e = find_entry(id);
        return e && e->special;
    }
    // The token string of an id (added-token content, else the vocab key in
    // the byte-level alphabet); throws on an invalid id.
    const std::string& id_to_token(std::int32_t id) const { return entry(id).token; }
    // The bytes one token decodes to; throws on an invalid id.
    const std::string& token_bytes(std::int32_t id) const { return entry(id).bytes; }
    // Added tokens first, then the vocab (the spelling is the byte-level one).
    std::optional<std::int32_t> token_to_id(std::string_view token) const
    {
        for (const auto& a : added_)
            if (a.content == token)
                return a.id;
        if (auto it = vocab_.find(std::string(token)); it != vocab_.end())
            return it->second;
        return std::nullopt;
    }
    const std::vector<added_token>& added_tokens() const noexcept { return added_; }
    std::size_t merge_count() const noexcept { return merges_.size(); }
    const std::string& source_name() const noexcept { return source_; }

private:
    struct id_entry {
        std::string token;
        std::string bytes;
        bool special = false;
    };
    struct merge_info {
        std::uint32_t rank;
        std::int32_t id;
    };
    // Byte trie for leftmost-longest matching of added tokens.
    struct trie {
        struct node {
            std::vector<std::pair<unsigned char, std::int32_t>> next; // sorted by byte
            std::int32_t token = -1; // index into added_
        };
        std::vector<node> nodes { 1 };
        std::array<bool, 256> first {};

        void insert(std::string_view s, std::int32_t token)
        {
            std::int32_t n = 0;
            for (unsigned char b : s) {
                auto& nx = nodes[std::size_t(n)].next;
                auto it = std::lower_bound(
                    nx.begin(), nx.end(), b, [](const auto& p, unsigned char x) { return p.first < x; });
                if (it == nx.end() || it->first != b) {
                    const auto child = static_cast<std::int32_t>(nodes.size());
                    it = nx.insert(it, { b, child });
                    nodes.emplace_back();
                }
                n = it->second;
            }
            first[static_cast<unsigned char>(s[0])] = true;
            if (nodes[std::size_t(n)].token < 0) // first entry with this content wins
                nodes[std::size_t(n)].token = token;
        }
        bool empty() const noexcept { return nodes.size() == 1; }
    };
    enum class stage_kind : std::uint8_t { prefix_space, split };
    struct pre_stage {
        stage_kind kind;
        split_regex regex = split_regex::gpt2;
        bool removed = false; // Split behavior "Removed" (else "Isolated")
    };
    struct scratch {
        std::vector<detail::tok_char> chars;
        std::vector<std::string> pieces, next;
    };
    struct bpe_cache {
        std::mutex mu;
        std::unordered_map<std::string, std::vector<std::int32_t>> map;
    };
    // Pieces longer than this are not cached; the cache stops growing at
    // cache_capacity entries (HF's policy too: no eviction, bounded memory).
    static constexpr std::size_t cache_max_piece = 256;
    static constexpr std::size_t cache_capacity = 1 << 16;
    // Added tokens are matched by walking a trie from every candidate byte,
    // so a token of L bytes can cost L steps per byte of text: L is bounded
    // (real added tokens are special markers and whitespace runs, < 100 bytes).
    static constexpr std::size_t max_added_token_bytes = 1024;

    std::string source_;
    std::unordered_map<std::string, std::int32_t> vocab_; // byte-level spelling -> id
    std::unordered_map<std::uint64_t, merge_info> merges_; // (left id << 32 | right id)
    std::array<std::int32_t, 256> byte_id_ {}; // id of each single-byte symbol, or -1
    // The tokens by id, compact (memory follows the entry count, not the
    // largest id): entry_ids_ sorted, id_entries_[i] the token of entry_ids_[i].
    std::vector<std::int32_t> entry_ids_;
    std::vector<id_entry> id_entries_;
    std::size_t n_tokens_ = 0;
    std::vector<added_token> added_;
    trie raw_trie_, norm_trie_;
    std::vector<pre_stage> stages_;
    bool nfc_ = false;
    bool ignore_merges_ = false;
    std::int32_t unk_id_ = -1;
    // The post-processor as templates (Bert and Roberta are written as one).
    std::vector<std::int32_t> single_template_ { seq_a }, pair_template_ { seq_a, seq_b };
    std::string post_type_ = "null";
    std::unique_ptr<bpe_cache> cache_ = std::make_unique<bpe_cache>();

    struct copy_tag { };
    bpe_tokenizer() = default;
    bpe_tokenizer(copy_tag, const bpe_tokenizer& o)
        : source_(o.source_)
        , vocab_(o.vocab_)
        , merges_(o.merges_)
        , byte_id_(o.byte_id_)
        , entry_ids_(o.entry_ids_)
        , id_entries_(o.id_entries_)
        , n_tokens_(o.n_tokens_)
        , added_(o.added_)
        , raw_trie_(o.raw_trie_)
        , norm_trie_(o.norm_trie_)
        , stages_(o.stages_)
        , nfc_(o.nfc_)
        , ignore_merges_(o.ignore_merges_)
        , unk_id_(o.unk_id_)
        , single_template_(o.single_template_)
        , pair_template_(o.pair_template_)
        , post_type_(o.post_type_)
    {
    }

    const id_entry* find_entry(std::int32_t id) const noexcept
    {
        const auto it = std::lower_bound(entry_ids_.begin(), entry_ids_.end(), id);
        return it != entry_ids_.end() && *it == id ? &id_entries_[std::size_t(it - entry_ids_.begin())] : nullptr;
    }
    const id_entry& entry(std::int32_t id) const
    {
        const id_entry* e = find_entry(id);
        detail::check(e != nullptr, source_, ": token id ", id, " has no token (valid ids lie in [0, ", id_limit(),
            ") and are defined by model.vocab or added_tokens)");
        return *e;
    }

    // Splits `text` on the added tokens of `t` (leftmost-longest): matched
    // spans append their id to `ids`, the text between goes to `f` in order.
    template <class F>
    void for_each_added_split(
        const trie& t, std::string_view text, bool parse_special, std::vector<std::int32_t>& ids, F&& f) const
    {
        if (t.empty()) {
            f(text);
            return;
        }
        std::size_t start = 0;
        for (std::size_t i = 0; i < text.size();) {
            if (!t.first[static_cast<unsigned char>(text[i])]) {
                ++i;
                continue;
            }
            std::int32_t n = 0, best = -1;
            std::size_t best_end = 0;
            for (std::size_t k = i; k < text.size(); ++k) {
                const auto& nx = t.nodes[std::size_t(n)].next;
                const auto b = static_cast<unsigned char>(text[k]);
                auto it = std::lower_bound(
                    nx.begin(), nx.end(), b, [](const auto& p, unsigned char x) { return p.first < x; });
                if (it == nx.end() || it->first != b)
                    break;
                n = it->second;
                const std::int32_t tok = t.nodes[std::size_t(n)].token;
                if (tok >= 0 && (parse_special || !added_[std::size_t(tok)].special)) {
                    best = tok;
                    best_end = k + 1;
                }
            }
            if (best < 0) {
                ++i;
                continue;
            }
            f(text.substr(start, i - start));
            ids.push_back(added_[std::size_t(best)].id);
            i = start = best_end;
        }
        f(text.substr(start));
    }

    void run_pre_tokenizer(std::string_view segment, std::vector<std::string>& pieces, scratch& sc) const
    {
        pieces.clear();
        if (segment.empty())
            return;
        pieces.emplace_back(segment);
        for (const auto& st : stages_) {
            if (st.kind == stage_kind::prefix_space) {
                for (auto& p : pieces)
                    if (p.empty() || p[0] != ' ')
                        p.insert(p.begin(), ' ');
                continue;
            }
            sc.next.clear();
            for (const auto& p : pieces) {
                detail::tok_chars(p, sc.chars);
                const detail::split_matcher m { sc.chars };
                for (std::size_t i = 0; i < sc.chars.size();) {
                    const std::size_t e = st.regex == split_regex::gpt2 ? m.gpt2(i) : m.qwen2(i);
                    const std::size_t b0 = sc.chars[i].offset, b1 = e < sc.chars.size() ? sc.chars[e].offset : p.size();
                    if (!st.removed) // the regexes leave no gaps, so Removed keeps nothing
                        sc.next.emplace_back(p, b0, b1 - b0);
                    i = e;
                }
            }
            std::swap(pieces, sc.next);
        }
    }

    void encode_segment(std::string_view segment, std::vector<std::int32_t>& ids, scratch& sc) const
    {
        if (segment.empty())
            return;
        std::vector<std::string> pieces;
        run_pre_tokenizer(segment, pieces, sc);
        for (const auto& p : pieces)
            encode_piece(p, ids);
    }

    void encode_piece(const std::string& piece, std::vector<std::int32_t>& ids) const
    {
        if (piece.empty())
            return;
        const bool cacheable = piece.size() <= cache_max_piece;
        if (cacheable) {
            std::lock_guard lock(cache_->mu);
            if (auto it = cache_->map.find(piece); it != cache_->map.end()) {
                ids.insert(ids.end(), it->second.begin(), it->second.end());
                return;
            }
        }
        std::vector<std::int32_t> out;
        bpe(piece, out);
        ids.insert(ids.end(), out.begin(), out.end());
        if (cacheable) {
            std::lock_guard lock(cache_->mu);
            if (cache_->map.size() < cache_capacity)
                cache_->map.emplace(piece, std::move(out));
        }
    }

    // BPE over one piece (raw bytes): one symbol per byte, then repeatedly
    // merge the adjacent pair of lowest rank, leftmost first on equal rank
    // (a heap of (rank, position) as HF's Word::merge_all).
    void bpe(std::string_view piece, std::vector<std::int32_t>& out) const
    {
        if (ignore_merges_) {
            if (auto it = vocab_.find(byte_level_encode(piece)); it != vocab_.end()) {
                out.push_back(it->second);
                return;
            }
        }
        const std::size_t n = piece.size();
        if (n == 0)
            return;
        std::vector<std::int32_t> sym(n), prev(n), next(n);
        for (std::size_t k = 0; k < n; ++k) {
            sym[k] = byte_id_[static_cast<unsigned char>(piece[k])];
            prev[k] = static_cast<std::int32_t>(k) - 1;
            next[k] = k + 1 < n ? static_cast<std::int32_t>(k + 1) : -1;
        }
        struct cand {
            std::uint32_t rank;
            std::int32_t pos;
            bool operator>(const cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
        };
        std::priority_queue<cand, std::vector<cand>, std::greater<>> heap;
        auto rank_of = [&](std::int32_t a, std::int32_t b) -> const merge_info* {
            if (a < 0 || b < 0)
                return nullptr;
            auto it = merges_.find((std::uint64_t(std::uint32_t(a)) << 32) | std::uint32_t(b));
            return it == merges_.end() ? nullptr : &it->second;
        };
        auto push = [&](std::int32_t pos) {
            if (pos < 0 || next[std::size_t(pos)] < 0)
                return;
            if (const auto* m = rank_of(sym[std::size_t(pos)], sym[std::size_t(next[std::size_t(pos)])]))
                heap.push({ m->rank, pos });
        };
        for (std::size_t k = 0; k + 1 < n; ++k)
            push(static_cast<std::int32_t>(k));
        std::vector<bool> dead(n, false);
        while (!heap.empty()) {
            const cand c = heap.top();
            heap.pop();
            const auto p = std::size_t(c.pos);
            if (dead[p] || next[p] < 0)
                continue;
            const auto q = std::size_t(next[p]);
            const auto* m = rank_of(sym[p], sym[q]);
            if (!m || m->rank != c.rank) // stale: the pair changed since it was queued
                continue;
            sym[p] = m->id;
            dead[q] = true;
            next[p] = next[q];
            if (next[q] >= 0)
                prev[std::size_t(next[q])] = c.pos;
            push(prev[p]);
            push(c.pos);
        }
        for (std::int32_t k = 0; k >= 0; k = next[std::size_t(k)]) {
            if (sym[std::size_t(k)] >= 0)
                out.push_back(sym[std::size_t(k)]);
            else if (unk_id_ >= 0) // a byte missing from the vocab (HF: unk, or dropped without one)
                out.push_back(unk_id_);
        }
    }

    // ---- loading ---------------------------------------------------------

    using json = nlohmann::json;

    [[noreturn]] void fail(std::string_view field, const std::string& what) const
    {
        throw error(detail::cat(source_, ": ", field, ": ", what));
    }
    static std::string brief(const json& j) { return json_brief(j); }
    // obj[key] if present and not null.
    static const json* member(const json& obj, const char* key)
    {
        if (!obj.is_object())
            return nullptr;
        auto it = obj.find(key);
        return (it == obj.end() || it->is_null()) ? nullptr : &*it;
    }
    bool get_bool(const json& obj, const char* key, std::string_view where, bool dflt) const
    {
        const json* v = member(obj, key);
        if (!v)
            return dflt;
        if (!v->is_boolean())
            fail(detail::cat(where, ".", key), "expected true or false, got " + brief(*v));
        return v->get<bool>();
    }
    std::string get_type(const json& obj, std::string_view where) const
    {
        if (!obj.is_object())
            fail(where, "expected an object, got " + brief(obj));
        const json* t = member(obj, "type");
        if (!t || !t->is_string())
            fail(detail::cat(where, ".type"), "missing or not a string");
        return t->get<std::string>();
    }
    // A token id through the checked conversion: an integer in [0, 2^31 - 2]
    // (ids are further bounded by the entry count in build_id_table).
    static std::optional<std::int32_t> id_of(const json& v) noexcept
    {
        if (!v.is_number_integer()) // ids are written as integers; 5.0 is not an id
            return std::nullopt;
        const auto id = json_int_in(v, 0, INT32_MAX - 1);
        return id ? std::optional<std::int32_t>(static_cast<std::int32_t>(*id)) : std::nullopt;
    }
    std::int32_t get_id(const json& v, std::string_view where) const
    {
        const auto id = id_of(v);
        if (!id)
            fail(where, "expected a token id (integer in [0, 2^31 - 1)), got " + json_typed_brief(v));
        return *id;
    }

    void load(std::string_view text, std::string source)
    {
        source_ = std::move(source);
        // Depth, size and duplicate keys (in model.vocab too) checked here.
        const json root = parse_json_strict(text, source_, "tokenizer", json_max_depth, json_max_bytes);
        if (!root.is_object())
            fail("(document)", detail::cat("expected a JSON object, got ", root.type_name()));
        load_model(root);
        load_added_tokens(root);
        load_normalizer(root);
        load_pre_tokenizer(root);
        load_decoder(root);
        build_id_table();
        load_post_processor(root); // after the id table: its special ids are checked against it
    }

    void load_model(const json& root)
    {
        const json* model = member(root, "model");
        if (!model)
            fail("model", "missing");
        const std::string type = get_type(*model, "model");
        if (type != "BPE")
            fail("model.type", brief(json(type)) + " is not supported (only \"BPE\")");
        if (get_bool(*model, "byte_fallback", "model", false))
            fail("model.byte_fallback", "true is not supported (byte-level BPE needs no byte fallback)");
        if (const json* d = member(*model, "dropout"))
            if (!(d->is_number() && d->get<double>() == 0.0))
                fail("model.dropout", brief(*d) + " is not supported (BPE dropout is random; use null)");
        for (const char* key : { "continuing_subword_prefix", "end_of_word_suffix" })
            if (const json* v = member(*model, key))
                if (!(v->is_string() && v->get_ref<const std::string&>().empty()))
                    fail(detail::cat("model.", key), brief(*v) + " is not supported (null or \"\" only)");
        ignore_merges_ = get_bool(*model, "ignore_merges", "model", false);

        const json* vocab = member(*model, "vocab");
        if (!vocab || !vocab->is_object())
            fail("model.vocab", "missing or not an object of token -> id");
        vocab_.reserve(vocab->size());
        for (const auto& [tok, v] : vocab->items()) {
            const auto id = id_of(v);
            if (!id)
                fail(detail::cat("model.vocab[", brief(json(tok)), "]"),
                    "expected a token id (integer in [0, 2^31 - 1)), got " + json_typed_brief(v));
            vocab_.emplace(tok, *id);
        }

        if (const json* unk = member(*model, "unk_token")) {
            if (!unk->is_string())
                fail("model.unk_token", "expected a string or null, got " + brief(*unk));
            auto it = vocab_.find(unk->get<std::string>());
            if (it == vocab_.end())
                fail("model.unk_token", brief(*unk) + " is not in model.vocab");
            unk_id_ = it->second;
            if (get_bool(*model, "fuse_unk", "model", false))
                fail("model.fuse_unk", "true is not supported");
        }
        for (int b = 0; b < 256; ++b) {
            std::string s;
            utf8_append(s, byte_level_chars[std::size_t(b)]);
            auto it = vocab_.find(s);
            byte_id_[std::size_t(b)] = it == vocab_.end() ? -1 : it->second;
        }

        const json* merges = member(*model, "merges");
        if (!merges || !merges->is_array())
            fail("model.merges", "missing or not an array");
        merges_.reserve(merges->size());
        std::uint32_t rank = 0;
        for (const auto& m : *merges) {
            const std::string where = detail::cat("model.merges[", rank, "]");
            std::string a, b;
            if (m.is_string()) { // "a b": exactly one space (HF splits on ' ' and wants 2 parts)
                const auto& s = m.get_ref<const std::string&>();
                const auto sp = s.find(' ');
                if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos || sp == 0
                    || sp + 1 == s.size())
                    fail(where, "malformed merge " + brief(m) + " (expected \"left right\" with one space)");
                a = s.substr(0, sp);
                b = s.substr(sp + 1);
            } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
                a = m[0].get<std::string>();
                b = m[1].get<std::string>();
                if (a.empty() || b.empty())
                    fail(where, "malformed merge " + brief(m) + " (empty side)");
            } else {
                fail(where, "malformed merge " + brief(m) + " (expected \"left right\" or [\"left\", \"right\"])");
            }
            const auto ia = vocab_.find(a), ib = vocab_.find(b), iab = vocab_.find(a + b);
            if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end())
                fail(where,
                    "merge " + brief(m) + ": "
                        + brief(json(ia == vocab_.end() ? a
                                : ib == vocab_.end()    ? b
                                                        : a + b))
                        + " is not in model.vocab");
            // A repeated pair keeps its last rank, as HF's HashMap collect does.
            merges_.insert_or_assign((std::uint64_t(std::uint32_t(ia->second)) << 32) | std::uint32_t(ib->second),
                merge_info { rank, iab->second });
            ++rank;
        }
    }

    void load_added_tokens(const json& root)
    {
        const json* list = member(root, "added_tokens");
        if (!list)
            return;
        if (!list->is_array())
            fail("added_tokens", "expected an array");
        for (std::size_t i = 0; i < list->size(); ++i) {
            const json& t = (*list)[i];
            const std::string where = detail::cat("added_tokens[", i, "]");
            if (!t.is_object())
                fail(where, "expected an object, got " + brief(t));
            added_token a;
            const json* id = member(t, "id");
            if (!id)
                fail(where + ".id", "missing");
            a.id = get_id(*id, where + ".id");
            const json* content = member(t, "content");
            if (!content || !content->is_string() || content->get_ref<const std::string&>().empty())
                fail(where + ".content", "missing, empty or not a string");
            a.content = content->get<std::string>();
            if (!utf8_is_valid(a.content))
                fail(where + ".content", "is not valid UTF-8");
            if (a.content.size() > max_added_token_bytes)
                fail(where + ".content",
                    detail::cat(brief(json(a.content)), " is ", a.content.size(), " bytes, longer than the limit of ",
                        max_added_token_bytes, " (matching costs up to that per byte of text)"));
            a.special = get_bool(t, "special", where, false);
            a.normalized = get_bool(t, "normalized", where, !a.special); // HF's default: !special
            for (const char* key : { "lstrip", "rstrip", "single_word" })
                if (get_bool(t, key, where, false))
                    fail(detail::cat(where, ".", key),
                        detail::cat("true is not supported (token ", brief(json(a.content)), ")"));
            added_.push_back(std::move(a));
        }
    }

    void load_normalizer(const json& root)
    {
        const json* n = member(root, "normalizer");
        if (!n)
            return;
        const std::string type = get_type(*n, "normalizer");
        auto unsupported = [&](std::string_view where, const std::string& t) {
            fail(where, brief(json(t)) + " is not supported (null, NFC, or a Sequence of NFC only)");
        };
        if (type == "NFC") {
            nfc_ = true;
        } else if (type == "Sequence") {
            const json* list = member(*n, "normalizers");
            if (!list || !list->is_array())
                fail("normalizer.normalizers", "missing or not an array");
            for (std::size_t i = 0; i < list->size(); ++i) {
                const std::string where = detail::cat("normalizer.normalizers[", i, "]");
                const std::string t = get_type((*list)[i], where);
                if (t != "NFC")
                    unsupported(where + ".type", t);
                nfc_ = true;
            }
        } else {
            unsupported("normalizer.type", type);
        }
    }

    void load_pre_tokenizer(const json& root)
    {
        const json* p = member(root, "pre_tokenizer");
        if (!p)
            fail("pre_tokenizer", "missing (a ByteLevel pre-tokenizer is required)");
        std::vector<std::pair<const json*, std::string>> list;
        if (get_type(*p, "pre_tokenizer") == "Sequence") {
            const json* items = member(*p, "pretokenizers");
            if (!items || !items->is_array() || items->empty())
                fail("pre_tokenizer.pretokenizers", "missing, empty or not an array");
            for (std::size_t i = 0; i < items->size(); ++i)
                list.emplace_back(&(*items)[i], detail::cat("pre_tokenizer.pretokenizers[", i, "]"));
        } else {
            list.emplace_back(p, "pre_tokenizer");
        }
        for (std::size_t i = 0; i < list.size(); ++i) {
            const json& st = *list[i].first;
            const std::string& where = list[i].second;
            const std::string type = get_type(st, where);
            if (type == "ByteLevel") {
                if (i + 1 != list.size())
                    fail(where, "ByteLevel must be the last pre-tokenizer (it maps bytes to the BPE alphabet)");
                // HF's ByteLevel defaults: add_prefix_space true, use_regex true.
                if (get_bool(st, "add_prefix_space", where, true))
                    stages_.push_back({ stage_kind::prefix_space });
                if (get_bool(st, "use_regex", where, true))
                    stages_.push_back({ stage_kind::split, split_regex::gpt2, false });
            } else if (type == "Split") {
                const json* pat = member(st, "pattern");
                const json* re = pat ? member(*pat, "Regex") : nullptr;
                if (!re || !re->is_string())
                    fail(where + ".pattern", "expected {\"Regex\": \"...\"}, got " + (pat ? brief(*pat) : "nothing"));
                const auto known = recognise_split_pattern(re->get_ref<const std::string&>());
                if (!known)
                    fail(where + ".pattern.Regex",
                        "unknown split regex " + brief(*re)
                            + " (only the GPT-2 and Qwen2 patterns are implemented, as hand-written matchers)");
                const json* beh = member(st, "behavior");
                const std::string behavior = beh && beh->is_string() ? beh->get<std::string>() : "";
                if (behavior != "Isolated" && behavior != "Removed")
                    fail(where + ".behavior",
                        (beh ? brief(*beh) : std::string("missing")) + " is not supported (Isolated or Removed only)");
                if (get_bool(st, "invert", where, false))
                    fail(where + ".invert", "true is not supported");
                stages_.push_back({ stage_kind::split, *known, behavior == "Removed" });
            } else {
                fail(where + ".type",
                    brief(json(type)) + " is not supported (ByteLevel, or a Sequence of Split then ByteLevel)");
            }
            if (i + 1 == list.size() && type != "ByteLevel")
                fail(where, "the last pre-tokenizer must be ByteLevel (the vocabulary is byte-level)");
        }
    }

    void load_decoder(const json& root)
    {
        const json* d = member(root, "decoder");
        if (!d)
            fail("decoder", "missing (ByteLevel expected)");
        if (const std::string t = get_type(*d, "decoder"); t != "ByteLevel")
            fail("decoder.type", brief(json(t)) + " is not supported (ByteLevel only)");
    }

    // post_processor: null, one processor, or a Sequence (nested ones are
    // flattened) applied in order, as HF runs them. ByteLevel only adjusts
    // offsets; at most one processor may add tokens, since HF hands the next
    // one the pieces of the previous one's output (a Template then sees a
    // "pair" of a special token and the text).
    void load_post_processor(const json& root)
    {
        const json* p = member(root, "post_processor");
        if (!p)
            return;
        post_type_ = get_type(*p, "post_processor");
        std::string adder; // where the processor that adds tokens is
        load_post_processor_item(*p, "post_processor", adder);
    }

    void load_post_processor_item(const json& p, const std::string& where, std::string& adder)
    {
        const std::string type = get_type(p, where);
        if (type == "Sequence") {
            const json* list = member(p, "processors");
            if (!list || !list->is_array())
                fail(where + ".processors", "missing or not an array");
            for (std::size_t i = 0; i < list->size(); ++i)
                load_post_processor_item((*list)[i], detail::cat(where, ".processors[", i, "]"), adder);
            return;
        }
        if (type == "ByteLevel") { // trim_offsets / add_prefix_space / use_regex: offsets only
            for (const char* key : { "add_prefix_space", "trim_offsets", "use_regex" })
                (void)get_bool(p, key, where, false);
            return;
        }
        std::vector<std::int32_t> single, pair;
        if (type == "TemplateProcessing") {
            load_template_processing(p, where, single, pair);
        } else if (type == "BertProcessing" || type == "RobertaProcessing") {
            // HF's fixed templates: [CLS] $A [SEP] and [CLS] $A [SEP] $B [SEP]
            // (Roberta: [CLS] $A [SEP] [SEP] $B [SEP]); type ids are not kept.
            const std::int32_t cls = special_pair(p, "cls", where), sep = special_pair(p, "sep", where);
            if (type == "RobertaProcessing")
                for (const char* key : { "trim_offsets", "add_prefix_space" }) // offsets only
                    (void)get_bool(p, key, where, true);
            single = { cls, seq_a, sep };
            pair = type == "BertProcessing" ? std::vector<std::int32_t> { cls, seq_a, sep, seq_b, sep }
                                            : std::vector<std::int32_t> { cls, seq_a, sep, sep, seq_b, sep };
        } else {
            fail(where + ".type",
                brief(json(type))
                    + " is not supported (null, ByteLevel, TemplateProcessing, BertProcessing, RobertaProcessing, "
                      "or a Sequence of these)");
        }
        const bool adds = std::any_of(single.begin(), single.end(), [](std::int32_t x) { return x >= 0; })
            || std::any_of(pair.begin(), pair.end(), [](std::int32_t x) { return x >= 0; });
        if (!adds) // "$A" / "$A $B" (OLMoE's): the identity
            return;
        if (!adder.empty())
            fail(where,
                detail::cat("a second post-processor that adds tokens (after ", adder,
                    ") is not supported: HF would give it the pieces of the first one's output"));
        adder = where;
        single_template_ = std::move(single);
        pair_template_ = std::move(pair);
    }

    // A special token of Bert/RobertaProcessing: ["token", id] with a valid id.
    std::int32_t special_pair(const json& p, const char* key, const std::string& where) const
    {
        const std::string w = detail::cat(where, ".", key);
        const json* v = member(p, key);
        if (!v || !v->is_array() || v->size() != 2 || !(*v)[0].is_string())
            fail(w, "expected [\"token\", id], got " + (v ? brief(*v) : std::string("nothing")));
        return checked_special_id((*v)[1], w + "[1]");
    }

    // A token id that a post-processor adds: it must name an entry of this
    // tokenizer (HF adds ids unchecked; an id without a token would reach the
    // model and fail decoding).
    std::int32_t checked_special_id(const json& v, const std::string& where) const
    {
        const std::int32_t id = get_id(v, where);
        if (!is_valid_id(id))
            fail(where,
                detail::cat("id ", id, " has no token in this tokenizer (valid ids lie in [0, ", id_limit(),
                    ") and are defined by model.vocab or added_tokens)"));
        return id;
    }

    // TemplateProcessing (HF's serialisation): "single" and "pair" are arrays
    // of {"Sequence": {"id": "A"|"B", "type_id": n}} and {"SpecialToken":
    // {"id": name, "type_id": n}}; "special_tokens" maps each name to {"id":
    // name, "ids": [...], "tokens": [...]} (ids and tokens of equal length;
    // the ids are what is added). All three fields are required, as HF's
    // deserialiser requires them. Stricter than HF: the single template uses
    // A exactly once and no B, the pair template A and B once each (HF would
    // panic or duplicate), a map key equals its "id", every id is valid.
    void load_template_processing(const json& p, const std::string& where, std::vector<std::int32_t>& single,
        std::vector<std::int32_t>& pair) const
    {
        const json* st = member(p, "special_tokens");
        if (!st || !st->is_object())
            fail(where + ".special_tokens", "missing or not an object of name -> {\"id\", \"ids\", \"tokens\"}");
        std::unordered_map<std::string, std::vector<std::int32_t>> specials;
        for (const auto& [name, v] : st->items()) {
            const std::string w = detail::cat(where, ".special_tokens[", brief(json(name)), "]");
            if (!v.is_object())
                fail(w, "expected an object {\"id\", \"ids\", \"tokens\"}, got " + brief(v));
            const json* id = member(v, "id");
            if (!id || !id->is_string() || id->get_ref<const std::string&>() != name)
                fail(w + ".id",
                    "expected the key " + brief(json(name)) + ", got " + (id ? brief(*id) : std::string("nothing")));
            const json* ids = member(v, "ids");
            const json* tokens = member(v, "tokens");
            if (!ids || !ids->is_array())
                fail(w + ".ids", "missing or not an array of token ids");
            if (!tokens || !tokens->is_array())
                fail(w + ".tokens", "missing or not an array of strings");
            if (ids->size() != tokens->size())
                fail(w + ".tokens",
                    detail::cat(tokens->size(), " tokens for ", ids->size(), " ids (they must have the same length)"));
            std::vector<std::int32_t> list;
            for (std::size_t k = 0; k < ids->size(); ++k) {
                list.push_back(checked_special_id((*ids)[k], detail::cat(w, ".ids[", k, "]")));
                if (!(*tokens)[k].is_string())
                    fail(detail::cat(w, ".tokens[", k, "]"), "expected a string, got " + brief((*tokens)[k]));
            }
            specials.emplace(name, std::move(list));
        }
        single = parse_template(p, "single", where, specials, false);
        pair = parse_template(p, "pair", where, specials, true);
    }

    std::vector<std::int32_t> parse_template(const json& p, const char* key, const std::string& where,
        const std::unordered_map<std::string, std::vector<std::int32_t>>& specials, bool is_pair) const
    {
        const std::string w = detail::cat(where, ".", key);
        const json* t = member(p, key);
        if (!t || !t->is_array())
            fail(w, "missing or not an array of {\"Sequence\": ...} / {\"SpecialToken\": ...} pieces");
        std::vector<std::int32_t> out;
        int count_a = 0, count_b = 0;
        for (std::size_t k = 0; k < t->size(); ++k) {
            const json& piece = (*t)[k];
            const std::string pw = detail::cat(w, "[", k, "]");
            if (!piece.is_object() || piece.size() != 1
                || !(piece.contains("Sequence") || piece.contains("SpecialToken")))
                fail(pw,
                    "expected {\"Sequence\": {\"id\", \"type_id\"}} or {\"SpecialToken\": {\"id\", \"type_id\"}}, got "
                        + brief(piece));
            const bool is_seq = piece.contains("Sequence");
            const json& body = is_seq ? piece["Sequence"] : piece["SpecialToken"];
            const std::string bw = pw + (is_seq ? ".Sequence" : ".SpecialToken");
            if (!body.is_object())
                fail(bw, "expected an object {\"id\", \"type_id\"}, got " + brief(body));
            const json* type_id = member(body, "type_id");
            if (!type_id || !type_id->is_number_integer() || !json_int_in(*type_id, 0, UINT32_MAX))
                fail(bw + ".type_id",
                    "expected an integer in [0, 2^32), got " + (type_id ? json_typed_brief(*type_id) : "nothing"));
            const json* id = member(body, "id");
            if (!id || !id->is_string())
                fail(bw + ".id", "missing or not a string");
            const auto& name = id->get_ref<const std::string&>();
            if (is_seq) {
                if (name == "A") {
                    ++count_a;
                    out.push_back(seq_a);
                } else if (name == "B" && is_pair) {
                    ++count_b;
                    out.push_back(seq_b);
                } else {
                    fail(bw + ".id",
                        brief(*id)
                            + (is_pair ? " is not a sequence (\"A\" or \"B\")"
                                       : " is not the sequence of a single template (\"A\")"));
                }
            } else {
                const auto it = specials.find(name);
                if (it == specials.end())
                    fail(bw + ".id", brief(*id) + " is not in " + where + ".special_tokens");
                out.insert(out.end(), it->second.begin(), it->second.end());
            }
        }
        if (count_a != 1 || count_b != (is_pair ? 1 : 0))
            fail(w,
                is_pair ? detail::cat(
                    "must use sequence A and sequence B once each, uses A ", count_a, " and B ", count_b, " times")
                        : detail::cat("must use sequence A exactly once, uses it ", count_a, " times"));
        return out;
    }

    // The id table holds one entry per id that has a token, sorted by id, so
    // its size follows the file whatever the ids are (a table indexed by id
    // asked 154 GB for one id near 2^31). n_tokens_ = the number of distinct
    // token strings of the vocab and the added tokens (HF's
    // get_vocab_size(true), len(tokenizer)).
    void build_id_table()
    {
        {
            std::unordered_set<std::string_view> extra; // added contents not in the vocab
            for (const auto& a : added_)
                if (vocab_.find(a.content) == vocab_.end())
                    extra.insert(a.content);
            n_tokens_ = vocab_.size() + extra.size();
        }
        std::vector<std::pair<std::int32_t, const std::string*>> by_id;
        by_id.reserve(vocab_.size() + added_.size());
        for (const auto& [tok, id] : vocab_)
            by_id.emplace_back(id, &tok);
        const auto by_first = [](const auto& l, const auto& r) { return l.first < r.first; };
        std::sort(by_id.begin(), by_id.end(), by_first);
        for (std::size_t i = 1; i < by_id.size(); ++i)
            if (by_id[i].first == by_id[i - 1].first)
                fail("model.vocab",
                    detail::cat("id ", by_id[i].first, " is used by ", brief(json(*by_id[i - 1].second)), " and ",
                        brief(json(*by_id[i].second))));
        const std::size_t nv = by_id.size();
        for (const auto& a : added_) { // an added id the vocab lacks is an entry of its own
            const auto it = std::lower_bound(by_id.begin(), by_id.begin() + std::ptrdiff_t(nv),
                std::pair<std::int32_t, const std::string*>(a.id, nullptr), by_first);
            if (it == by_id.begin() + std::ptrdiff_t(nv) || it->first != a.id)
                by_id.emplace_back(a.id, &a.content);
        }
        // Added ids in order; two added tokens on one id keep one entry (the
        // later one's content wins below, as before).
        std::stable_sort(by_id.begin(), by_id.end(), by_first);
        by_id.erase(
            std::unique(by_id.begin(), by_id.end(), [](const auto& l, const auto& r) { return l.first == r.first; }),
            by_id.end());
        entry_ids_.resize(by_id.size());
        id_entries_.assign(by_id.size(), id_entry {});
        for (std::size_t i = 0; i < by_id.size(); ++i) {
            entry_ids_[i] = by_id[i].first;
            id_entries_[i].token = *by_id[i].second;
        }
        for (std::size_t i = 0; i < added_.size(); ++i) {
            const auto& a = added_[i];
            auto& e = id_entries_[std::size_t(
                std::lower_bound(entry_ids_.begin(), entry_ids_.end(), a.id) - entry_ids_.begin())];
            e.token = a.content; // the added content wins for decoding (spec §7.4)
            e.special = a.special;
            const auto idx = static_cast<std::int32_t>(i);
            if (a.normalized)
                norm_trie_.insert(nfc_ ? nfc_normalize(a.content) : a.content, idx);
            else
                raw_trie_.insert(a.content, idx);
        }
        for (auto& e : id_entries_)
            e.bytes = byte_level_decode(e.token);
    }
};

// Decodes a stream of ids to text piece by piece: push() returns the text
// that is complete so far and holds back a trailing UTF-8 sequence that is
// well-formed but incomplete (a character split over tokens) until the next
// id completes it; ill-formed bytes are emitted as U+FFFD right away.
// Concatenating every push() and flush() equals decode() of all the ids.
class bpe_stream_decoder {
public:
    explicit bpe_stream_decoder(const bpe_tokenizer& tok, bool skip_special = false) noexcept
        : tok_(&tok)
        , skip_special_(skip_special)
    {
    }

    // Throws kdial::error (naming the id) on an invalid id; nothing is consumed then.
    std::string push(std::int32_t id)
    {
        const std::string& bytes = tok_->token_bytes(id);
        if (skip_special_ && tok_->is_special(id))
            return {};
        pending_ += bytes;
        const std::size_t hold = utf8_incomplete_suffix(pending_);
        std::string out = utf8_sanitize(std::string_view(pending_).substr(0, pending_.size() - hold));
        pending_.erase(0, pending_.size() - hold);
        return out;
    }

    // The held-back bytes (an incomplete sequence becomes U+FFFD); resets.
    std::string flush()
    {
        std::string out = utf8_sanitize(pending_);
        pending_.clear();
        return out;
    }

    // Bytes currently held back (0..3).
    std::size_t pending_bytes() const noexcept { return pending_.size(); }

private:
    const bpe_tokenizer* tok_;
    bool skip_special_;
    std::string pending_;
};

} // namespace kdial::io
