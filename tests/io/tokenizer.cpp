// Byte-level BPE tokenizer (tokenizer.json) and its Unicode support: UTF-8
// policy, character classes, NFC, the GPT-2 / Qwen2 split regexes, BPE merge
// order, added tokens, round trips, streaming decode, and load errors.
//
// No HF tokenizers library is available here, so every expected split below
// was derived by hand from the regex semantics of spec §7.2 (alternatives in
// order, greedy quantifiers with backtracking, \s = White_Space); each case
// says which alternative decides it. NFC uses Unicode 9.0 data, as HF's
// normaliser (the Rust crate unicode-normalization-alignments 0.1.12, whose
// UNICODE_VERSION is 9.0.0); it was checked, outside this suite, against
// NormalizationTest.txt 15.0: every line whose characters were all assigned
// by 9.0 (18 288 lines, 91 440 checks) plus NFC(c) == c for the 248 877
// other code points assigned by 9.0, 0 failures; of the 786 lines with later
// characters, 662 checks differ, as they must.
#include <doctest/doctest.h>
#include <kdial/io/tokenizer.hpp>

#include "io_test_util.hpp"

#include <nlohmann/json.hpp>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace kdial::io;
using json = nlohmann::json;

namespace {

std::string u8(char32_t cp)
{
    std::string s;
    utf8_append(s, cp);
    return s;
}

// The byte-level spelling of raw text, e.g. bl(" w") == "Ġw".
std::string bl(std::string_view raw)
{
    return byte_level_encode(raw);
}

std::vector<std::string> strs(const std::vector<std::string_view>& v)
{
    return { v.begin(), v.end() };
}

enum class style { neox, qwen2 };

// A tokenizer.json in the layout HF writes: vocab = the 256 byte symbols
// (id = byte value), then one id per merge result in merge order; merges are
// given in raw text (spelled in the byte-level alphabet here).
json make_tokenizer_json(
    style st, const std::vector<std::pair<std::string, std::string>>& merges, bool merges_as_pairs = false)
{
    json vocab = json::object();
    for (int b = 0; b < 256; ++b)
        vocab[u8(byte_level_chars[std::size_t(b)])] = b;
    int next = 256;
    json jm = json::array();
    for (const auto& [a, b] : merges) {
        const std::string ab = bl(a + b);
        if (!vocab.contains(ab))
            vocab[ab] = next++;
        if (merges_as_pairs)
            jm.push_back(json::array({ bl(a), bl(b) }));
        else
            jm.push_back(bl(a) + " " + bl(b));
    }
    json model = { { "type", "BPE" }, { "dropout", nullptr }, { "unk_token", nullptr }, { "fuse_unk", false },
        { "byte_fallback", false }, { "ignore_merges", false }, { "vocab", vocab }, { "merges", jm } };
    json bytelevel_off
        = { { "type", "ByteLevel" }, { "add_prefix_space", false }, { "trim_offsets", false }, { "use_regex", false } };
    json j = { { "version", "1.0" }, { "truncation", nullptr }, { "padding", nullptr },
        { "normalizer", { { "type", "NFC" } } }, { "post_processor", bytelevel_off }, { "decoder", bytelevel_off },
        { "model", model } };
    auto added = [&](int id, std::string content, bool special, bool normalized) {
        return json { { "id", id }, { "content", content }, { "single_word", false }, { "lstrip", false },
            { "rstrip", false }, { "normalized", normalized }, { "special", special } };
    };
    j["added_tokens"] = json::array();
    if (st == style::neox) {
        j["pre_tokenizer"] = { { "type", "ByteLevel" }, { "add_prefix_space", false }, { "trim_offsets", true },
            { "use_regex", true } };
        // OLMoE's layout (spec §3.4), shifted: <|padding|>, whitespace runs of 24..2 spaces, <|endoftext|>.
        j["added_tokens"].push_back(added(1000, "<|padding|>", true, false));
        for (int n = 24; n >= 2; --n)
            j["added_tokens"].push_back(added(1001 + 24 - n, std::string(std::size_t(n), ' '), false, true));
        j["added_tokens"].push_back(added(1100, "<|endoftext|>", true, false));
        j["added_tokens"].push_back(added(1101, "|||EMAIL_ADDRESS|||", false, true));
    } else {
        j["pre_tokenizer"] = { { "type", "Sequence" },
            { "pretokenizers",
                json::array({ { { "type", "Split" }, { "pattern", { { "Regex", std::string(qwen2_split_pattern) } } },
                                  { "behavior", "Isolated" }, { "invert", false } },
                    bytelevel_off }) } };
        j["added_tokens"].push_back(added(2000, "<|endoftext|>", true, false));
        j["added_tokens"].push_back(added(2001, "<|im_start|>", true, false));
        j["added_tokens"].push_back(added(2002, "<|im_end|>", true, false));
    }
    // Dense ids, as real vocabularies have (sparse ids are tested on their
    // own): the ids between the merges and the added tokens get filler vocab
    // entries (never produced by BPE: no merge builds them).
    std::vector<bool> used(3000, false);
    for (const auto& [k, v] : j["model"]["vocab"].items())
        used[v.get<std::size_t>()] = true;
    int top = 0;
    for (const auto& a : j["added_tokens"]) {
        used[a["id"].get<std::size_t>()] = true;
        top = std::max(top, a["id"].get<int>());
    }
    for (int id = 0; id < top; ++id)
        if (!used[std::size_t(id)])
            j["model"]["vocab"]["<fill_" + std::to_string(id) + ">"] = id;
    return j;
}

bpe_tokenizer make_tokenizer(style st, const std::vector<std::pair<std::string, std::string>>& merges = {})
{
    return bpe_tokenizer::from_json(make_tokenizer_json(st, merges).dump(), "test.json");
}

// Merges that build a few words, so BPE output is not just bytes.
const std::vector<std::pair<std::string, std::string>> word_merges
    = { { "h", "e" }, { "l", "l" }, { "he", "ll" }, { "hell", "o" }, { " ", "w" }, { "o", "r" }, { " w", "or" },
          { " wor", "l" }, { " worl", "d" }, { "\xC3", "\xA9" }, { "a", "b" }, { " ", "t" }, { " t", "he" } };

std::vector<std::int32_t> ids_of(const bpe_tokenizer& t, std::initializer_list<std::string_view> raw_tokens)
{
    std::vector<std::int32_t> v;
    for (auto r : raw_tokens) {
        auto id = t.token_to_id(bl(r));
        REQUIRE_MESSAGE(id.has_value(), "no token for raw ", std::string(r));
        v.push_back(*id);
    }
    return v;
}

} // namespace

TEST_SUITE("io/tokenizer")
{

    // ---------------------------------------------------------------------------
    // Unicode

    TEST_CASE("byte-level table: GPT-2 bytes_to_unicode [io][tokenizer]")
    {
        CHECK(byte_level_chars[' '] == 0x120);
        CHECK(byte_level_chars['\n'] == 0x10A);
        CHECK(byte_level_chars[0x00] == 0x100);
        CHECK(byte_level_chars['!'] == '!');
        CHECK(byte_level_chars[0xAD] == 0x143); // the last of the 68 remapped bytes
        CHECK(byte_level_chars[0xFF] == 0xFF);
        for (int b = 0; b < 256; ++b)
            CHECK(byte_level_bytes[byte_level_chars[std::size_t(b)]] == b);
        CHECK(bl(" hello\n") == "\xC4\xA0hello\xC4\x8A");
        CHECK(byte_level_decode(bl("\xE4\xB8\xAD x")) == "\xE4\xB8\xAD x");
        CHECK(byte_level_decode("   ") == "   "); // raw spaces are outside the table: own bytes
    }

    TEST_CASE("utf8: decode, maximal-subpart U+FFFD policy, incomplete suffix [io][tokenizer]")
    {
        const std::string fffd = u8(0xFFFD);
        CHECK(utf8_decode("\xE4\xB8\xAD", 0).cp == 0x4E2D);
        CHECK(utf8_decode("\xF0\x9F\x91\x8B", 0).cp == 0x1F44B);
        CHECK(utf8_sanitize("a\xE2\x82z") == "a" + fffd + "z"); // truncated 3-byte: one U+FFFD
        CHECK(utf8_sanitize("\xC0\x80") == fffd + fffd); // overlong lead is 1 byte
        CHECK(utf8_sanitize("\xED\xA0\x80") == fffd + fffd + fffd); // surrogate: ED then 2 strays
        CHECK(utf8_sanitize("\xF4\x90\x80\x80") == fffd + fffd + fffd + fffd); // > U+10FFFF
        CHECK(utf8_sanitize("\xFF\xFE") == fffd + fffd);
        CHECK(utf8_sanitize("ok \xC3\xA9") == "ok \xC3\xA9");
        CHECK(utf8_incomplete_suffix("a\xE2\x82") == 2);
        CHECK(utf8_incomplete_suffix("a\xF0\x9F\x91") == 3);
        CHECK(utf8_incomplete_suffix("a\xF0") == 1);
        CHECK(utf8_incomplete_suffix("a\xE2\x82\xAC") == 0); // complete
        CHECK(utf8_incomplete_suffix("a\xE0\x80") == 0); // can never become valid
        CHECK(utf8_incomplete_suffix("\x80\x80") == 0);
        std::string s;
        utf8_append(s, 0xD800);
        CHECK(s == fffd);
    }

    TEST_CASE("unicode classes: letters, numbers, White_Space [io][tokenizer]")
    {
        CHECK(unicode_class(U'a') == char_class::letter);
        CHECK(unicode_class(0xE9) == char_class::letter); // é
        CHECK(unicode_class(0x4E2D) == char_class::letter); // 中
        CHECK(unicode_class(0xAC00) == char_class::letter); // 가
        CHECK(unicode_class(0x02B0) == char_class::letter); // Lm
        CHECK(unicode_class(0x0663) == char_class::number); // Arabic-Indic 3 (Nd)
        CHECK(unicode_class(0x216B) == char_class::number); // Roman numeral twelve (Nl)
        CHECK(unicode_class(0x00BD) == char_class::number); // ½ (No)
        CHECK(unicode_class(0x00A0) == char_class::space);
        CHECK(unicode_class(0x3000) == char_class::space);
        CHECK(unicode_class(0x0085) == char_class::space);
        CHECK(unicode_class(0x200B) == char_class::other); // ZERO WIDTH SPACE is not White_Space
        CHECK(unicode_class(0x0301) == char_class::other); // combining mark (Mn)
        CHECK(unicode_class(0x1F44B) == char_class::other); // emoji (So)
        CHECK(unicode_class(0x10FFFF) == char_class::other);
        CHECK(canonical_combining_class(0x0301) == 230);
        CHECK(canonical_combining_class(0x0323) == 220);
        CHECK(canonical_combining_class('a') == 0);
    }

    TEST_CASE("NFC: composition, Hangul, reordering, exclusions, fast path [io][tokenizer]")
    {
        CHECK(nfc_normalize("e\xCC\x81") == "\xC3\xA9"); // e + U+0301 -> é
        CHECK(nfc_normalize("\xC3\xA9") == "\xC3\xA9"); // already NFC
        CHECK(nfc_normalize(u8(0x1100) + u8(0x1161)) == u8(0xAC00)); // L V -> 가
        CHECK(nfc_normalize(u8(0x1100) + u8(0x1161) + u8(0x11A8)) == u8(0xAC01)); // L V T -> 각
        CHECK(nfc_normalize(u8(0xAC00) + u8(0x11A8)) == u8(0xAC01)); // LV T -> LVT
        CHECK(nfc_normalize(u8(0x212B)) == u8(0x00C5)); // Angstrom sign (singleton)
        CHECK(nfc_normalize(u8(0x1E0B) + u8(0x0323)) == u8(0x1E0D) + u8(0x0307)); // UAX #15: ḋ + dot below
        CHECK(nfc_normalize("a" + u8(0x0301) + u8(0x0323)) == u8(0x1EA1) + u8(0x0301)); // reorder, then compose
        CHECK(nfc_normalize(u8(0x0958)) == u8(0x0915) + u8(0x093C)); // excluded from composition
        CHECK(nfc_normalize(u8(0x0301) + "e") == u8(0x0301) + "e"); // no starter before the mark
        CHECK(nfc_normalize("x\xFF" + u8(0x0301)) == "x\xFF" + u8(0x0301)); // ill-formed byte blocks
        const std::string ascii = "plain ASCII text, 123!";
        CHECK(is_nfc_quick(ascii));
        CHECK(nfc_normalize(ascii) == ascii);
        CHECK_FALSE(is_nfc_quick("e\xCC\x81"));
    }

    TEST_CASE("NFC follows Unicode 9.0 as HF: later marks are unassigned (class 0, never composed) [io][tokenizer]")
    {
        // UCD 15.0 gives U+1DF6 (added in 10.0) class 232, U+1AC1 (14.0) class
        // 230, and U+11938 (13.0) = U+11935 U+11930, a primary composite; with
        // the 9.0 data of HF's normaliser they are unassigned: class 0.
        CHECK(std::string(detail::unicode_tables::normalization_version) == "9.0");
        for (const char32_t c : { 0x1DF6, 0x1DF9, 0x1AC1, 0x1ACE, 0x11930, 0x11935 })
            CHECK(canonical_combining_class(c) == 0);
        // 15.0 data would reorder these (class 220 U+0316 before 232 / 230); 9.0 leaves them.
        const std::string kavyka = "a" + u8(0x1DF6) + u8(0x0316);
        CHECK(nfc_normalize(kavyka) == kavyka);
        const std::string paren = "a" + u8(0x1AC1) + u8(0x0316);
        CHECK(nfc_normalize(paren) == paren);
        // 15.0: a U+1DF6 U+0301 -> reorder (230 < 232), compose: á U+1DF6. 9.0: U+1DF6 is a starter
        // that blocks the acute from the a, and it composes with nothing.
        const std::string blocked = "a" + u8(0x1DF6) + u8(0x0301);
        CHECK(nfc_normalize(blocked) == blocked);
        // 15.0: U+11935 U+11930 -> U+11938 (Dives Akuru O). 9.0: no composition; U+11938 stays too.
        const std::string dives = u8(0x11935) + u8(0x11930);
        CHECK(nfc_normalize(dives) == dives);
        CHECK(is_nfc_quick(dives));
        CHECK(nfc_normalize(u8(0x11938)) == u8(0x11938));
        // Characters assigned by 9.0 still reorder and compose: U+1DFB (9.0, class 230)
        // moves after U+0316; Kaithi U+11099 U+110BA (5.2) composes to U+1109A.
        CHECK(canonical_combining_class(0x1DFB) == 230);
        CHECK(nfc_normalize("a" + u8(0x1DFB) + u8(0x0316)) == "a" + u8(0x0316) + u8(0x1DFB));
        CHECK(nfc_normalize(u8(0x11099) + u8(0x110BA)) == u8(0x1109A));
        CHECK(nfc_normalize("a" + u8(0x0316) + u8(0x0301)) == u8(0xE1) + u8(0x0316));
        // Through the tokenizer (NFC normalizer): the bytes come back unchanged.
        const auto tok = make_tokenizer(style::neox, word_merges);
        for (const auto& s : { kavyka, paren, blocked, dives })
            CHECK(tok.decode_bytes(tok.encode(s)) == s);
        CHECK(tok.decode_bytes(tok.encode("e" + u8(0x0301) + u8(0x1DF6))) == u8(0xE9) + u8(0x1DF6));
    }

    TEST_CASE("NFC: canonical ordering equals a stable insertion sort (reference) on random mark runs [io][tokenizer]")
    {
        // Marks of several classes (1, 10, 202, 220, 230, 240) and starters
        // that compose with some of them; none of these has a decomposition,
        // so NFC(s) == compose(reorder(s)) and NFC(reorder(s)) must equal NFC(s).
        const std::vector<char32_t> pool
            = { 'a', 'e', 'c', 'o', 0x0301, 0x0316, 0x0327, 0x05B0, 0x0334, 0x0345, 0x0300, 0x0323, 0x0308, 0x0304 };
        const auto reference_order = [](std::vector<char32_t> v) { // the textbook insertion sort
            for (std::size_t i = 1; i < v.size(); ++i) {
                const auto cc = canonical_combining_class(v[i]);
                for (std::size_t j = i; cc != 0 && j > 0; --j) {
                    const auto prev = canonical_combining_class(v[j - 1]);
                    if (prev == 0 || prev <= cc)
                        break;
                    std::swap(v[j - 1], v[j]);
                }
            }
            return v;
        };
        std::mt19937 rng(5);
        for (int trial = 0; trial < 2000; ++trial) {
            std::vector<char32_t> v(rng() % 40);
            for (auto& c : v)
                c = pool[rng() % pool.size()];
            std::string s, ordered;
            for (char32_t c : v)
                utf8_append(s, c);
            for (char32_t c : reference_order(v))
                utf8_append(ordered, c);
            const std::string got = nfc_normalize(s);
            REQUIRE_MESSAGE(got == nfc_normalize(ordered), "input ", json(s).dump());
            REQUIRE(nfc_normalize(got) == got); // NFC is idempotent
        }
    }

    TEST_CASE("NFC and encode of a 1 MB adversarial run of marks: O(n log n), correct [io][tokenizer]")
    {
        // "a" + (U+0316 U+0301) x N took 15 s at 160 KB with insertion sort
        // (quadratic). Canonical order puts the N U+0316 (class 220) before
        // the N U+0301 (230); the first U+0301 then composes with 'a' (nothing
        // of class >= 230 blocks it), the others stay.
        const std::size_t n = (1 << 20) / 4;
        std::string s = "a";
        for (std::size_t i = 0; i < n; ++i)
            s += u8(0x0316) + u8(0x0301);
        std::string want = u8(0xE1);
        for (std::size_t i = 0; i < n; ++i)
            want += u8(0x0316);
        for (std::size_t i = 1; i < n; ++i)
            want += u8(0x0301);
        const auto t0 = std::chrono::steady_clock::now();
        const std::string got = nfc_normalize(s);
        const auto t1 = std::chrono::steady_clock::now();
        CHECK(got.size() == want.size());
        CHECK(got == want);
        // Through the tokenizer: the run is one piece of ~1 MB for the split
        // regex, then BPE; decode gives back the NFC text.
        const auto tok = make_tokenizer(style::neox, word_merges);
        const auto ids = tok.encode(s);
        const auto t2 = std::chrono::steady_clock::now();
        CHECK(tok.decode_bytes(ids) == want);
        const auto ms = [](auto d) { return std::chrono::duration<double, std::milli>(d).count(); };
        MESSAGE("1 MB adversarial NFC: " << ms(t1 - t0) << " ms; encode (NFC + split + BPE): " << ms(t2 - t1) << " ms; "
                                         << ids.size() << " ids");
    }

    // ---------------------------------------------------------------------------
    // Pre-tokenisation

    TEST_CASE("split GPT-2 / NeoX regex on tricky strings [io][tokenizer]")
    {
        using V = std::vector<std::string>;
        auto sp = [](std::string_view s) { return strs(split_with_regex(split_regex::gpt2, s)); };
        CHECK(sp("Hello world") == V { "Hello", " world" });
        // Contractions are case-sensitive: 'LL is "'" (punctuation run) then "LL".
        CHECK(sp("I'm don't we'LL") == V { "I", "'m", " don", "'t", " we", "'", "LL" });
        CHECK(sp("'s'") == V { "'s", "'" });
        CHECK(sp("'''s") == V { "'''", "s" }); // the punctuation run wins at position 0
        // \s+(?!\S) gives the last space of a run to the next word.
        CHECK(sp("a  b") == V { "a", " ", " b" });
        CHECK(sp("a   b") == V { "a", "  ", " b" });
        CHECK(sp("a   ") == V { "a", "   " }); // at the end the run stays whole
        CHECK(sp("  leading") == V { " ", " leading" });
        // A newline is not a literal space, so it never prefixes a word.
        CHECK(sp("a\n\nb") == V { "a", "\n", "\n", "b" });
        CHECK(sp("a\nb") == V { "a", "\n", "b" });
        CHECK(sp("x\t\ty") == V { "x", "\t", "\t", "y" });
        CHECK(sp("x \ty") == V { "x", " ", "\t", "y" });
        // Digits stay in runs.
        CHECK(sp("123 4567") == V { "123", " 4567" });
        CHECK(sp("$1.5!!") == V { "$", "1", ".", "5", "!!" });
        CHECK(sp("abc123") == V { "abc", "123" });
        // Non-ASCII letters, CJK, emoji (So and Sk are punctuation here), NBSP.
        CHECK(sp("h\xC3\xA9llo w\xC3\xB6rld") == V { "h\xC3\xA9llo", " w\xC3\xB6rld" });
        CHECK(sp("\xE4\xBD\xA0\xE5\xA5\xBD\xE4\xB8\x96\xE7\x95\x8C")
            == V { "\xE4\xBD\xA0\xE5\xA5\xBD\xE4\xB8\x96\xE7\x95\x8C" });
        const std::string wave = u8(0x1F44B) + u8(0x1F3FD);
        CHECK(sp("hi " + wave + " there") == V { "hi", " " + wave, " there" });
        CHECK(sp("a" + u8(0xA0) + "b") == V { "a", u8(0xA0), "b" }); // NBSP is \s but not the literal ' '
        CHECK(sp("") == V {});
    }

    TEST_CASE("split Qwen2 regex on tricky strings [io][tokenizer]")
    {
        using V = std::vector<std::string>;
        auto sp = [](std::string_view s) { return strs(split_with_regex(split_regex::qwen2, s)); };
        CHECK(sp("Hello world") == V { "Hello", " world" });
        // (?i:...) contractions: any case.
        CHECK(sp("I'M DON'T we'Ll") == V { "I", "'M", " DON", "'T", " we", "'Ll" });
        CHECK(sp("it's") == V { "it", "'s" });
        // U+017F (long s) case-folds to 's' in Unicode, so (?i)'s matches it;
        // this follows from Oniguruma's case folding and is not cross-checked.
        CHECK(sp("it'" + u8(0x17F)) == V { "it", "'" + u8(0x17F) });
        // [^\r\n\p{L}\p{N}]?\p{L}+: one non-letter, non-digit, non-newline char prefixes a word.
        CHECK(sp("'hello") == V { "'hello" });
        CHECK(sp("hello.world") == V { "hello", ".world" });
        CHECK(sp("\tfoo") == V { "\tfoo" });
        CHECK(sp("...abc") == V { "...", "abc" }); // punctuation run first, then the word
        // \p{N}: digits one per piece, and a space before a digit stands alone.
        CHECK(sp("12345") == V { "1", "2", "3", "4", "5" });
        CHECK(sp("x 42") == V { "x", " ", "4", "2" });
        CHECK(sp("abc123") == V { "abc", "1", "2", "3" });
        CHECK(sp("\xD9\xA3\xD9\xA4") == V { "\xD9\xA3", "\xD9\xA4" }); // Arabic-Indic digits
        // ' ?[^\s\p{L}\p{N}]+[\r\n]*': punctuation keeps the newlines after it.
        CHECK(sp("end.\n\nNext") == V { "end", ".\n\n", "Next" });
        CHECK(sp("a !!b") == V { "a", " !!", "b" });
        // \s*[\r\n]+: whitespace up to and including the last newline of the run.
        CHECK(sp("a\n\nb") == V { "a", "\n\n", "b" });
        CHECK(sp("x \n y") == V { "x", " \n", " y" });
        CHECK(sp("x\r\n  y") == V { "x", "\r\n", " ", " y" });
        // \s+(?!\S) and \s+.
        CHECK(sp("a  b") == V { "a", " ", " b" });
        CHECK(sp("a  ") == V { "a", "  " });
        const std::string wave = u8(0x1F44B);
        CHECK(sp("hi " + wave + " there") == V { "hi", " " + wave, " there" });
        CHECK(sp(wave + "x") == V { wave + "x" }); // the emoji is the optional prefix char
    }

    TEST_CASE("pre_tokenize: the configured pipeline, incl. add_prefix_space [io][tokenizer]")
    {
        using V = std::vector<std::string>;
        const auto neox = make_tokenizer(style::neox);
        CHECK(neox.pre_tokenize("a 12") == V { "a", " 12" });
        const auto qwen = make_tokenizer(style::qwen2);
        CHECK(qwen.pre_tokenize("a 12") == V { "a", " ", "1", "2" });

        auto j = make_tokenizer_json(style::neox, {});
        j["pre_tokenizer"]["add_prefix_space"] = true;
        const auto pre = bpe_tokenizer::from_json(j.dump());
        CHECK(pre.pre_tokenize("hi there") == V { " hi", " there" });
        CHECK(pre.pre_tokenize(" hi") == V { " hi" }); // already starts with a space

        // Split with the GPT-2 regex inside a Sequence is recognised too.
        auto k = make_tokenizer_json(style::qwen2, {});
        k["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = std::string(gpt2_split_pattern);
        CHECK(bpe_tokenizer::from_json(k.dump()).pre_tokenize("a 12") == V { "a", " 12" });
    }

    // ---------------------------------------------------------------------------
    // BPE

    TEST_CASE("BPE: lowest rank first, leftmost on ties [io][tokenizer]")
    {
        // b+c has rank 0, a+b rank 1: "abc" -> a|bc -> abc (a+b first would strand c).
        const auto t = make_tokenizer(style::neox, { { "b", "c" }, { "a", "b" }, { "a", "bc" } });
        CHECK(t.encode("abc") == ids_of(t, { "abc" }));
        CHECK(t.encode("abd") == ids_of(t, { "ab", "d" }));

        const auto u = make_tokenizer(style::neox, { { "a", "a" } });
        CHECK(u.encode("aaa") == ids_of(u, { "aa", "a" })); // leftmost pair merges first
        CHECK(u.encode("aaaaa") == ids_of(u, { "aa", "aa", "a" }));
        const auto w = make_tokenizer(style::neox, { { "a", "a" }, { "aa", "aa" } });
        CHECK(w.encode("aaaa") == ids_of(w, { "aaaa" }));
        CHECK(w.encode("aaaaaa") == ids_of(w, { "aaaa", "aa" }));
        // A later, lower-priority merge does not pre-empt an earlier one:
        // rank 0 x+y, rank 1 y+z: "xyz" -> xy|z.
        const auto v = make_tokenizer(style::neox, { { "x", "y" }, { "y", "z" } });
        CHECK(v.encode("xyz") == ids_of(v, { "xy", "z" }));
    }

    TEST_CASE("BPE: words, spaces, multi-byte characters, merge formats [io][tokenizer]")
    {
        const auto t = make_tokenizer(style::neox, word_merges);
        CHECK(t.encode("hello world") == ids_of(t, { "hello", " world" }));
        CHECK(t.encode("hello the") == ids_of(t, { "hello", " the" }));
        CHECK(t.encode("\xC3\xA9") == ids_of(t, { "\xC3\xA9" }));
        CHECK(t.encode("e\xCC\x81") == ids_of(t, { "\xC3\xA9" })); // NFC before BPE
        CHECK(t.decode(t.encode("hello world")) == "hello world");
        CHECK(t.merge_count() == word_merges.size());

        const auto pairs = bpe_tokenizer::from_json(make_tokenizer_json(style::neox, word_merges, true).dump());
        CHECK(pairs.encode("hello world") == t.encode("hello world"));
    }

    TEST_CASE("BPE: ignore_merges emits a whole-vocab piece directly [io][tokenizer]")
    {
        auto j = make_tokenizer_json(style::neox, { { "a", "b" } });
        j["model"]["vocab"][bl("xyz")] = 1102; // the next free id, reachable by no merge
        CHECK(bpe_tokenizer::from_json(j.dump()).encode("xyz") == std::vector<std::int32_t> { 'x', 'y', 'z' });
        j["model"]["ignore_merges"] = true;
        CHECK(bpe_tokenizer::from_json(j.dump()).encode("xyz") == std::vector<std::int32_t> { 1102 });
    }

    // ---------------------------------------------------------------------------
    // Added tokens

    TEST_CASE("added tokens: OLMoE whitespace runs and specials before BPE [io][tokenizer]")
    {
        const auto t = make_tokenizer(style::neox, word_merges);
        const auto sp = [&](int n) { return *t.token_to_id(std::string(std::size_t(n), ' ')); };
        CHECK(sp(2) == 1023);
        CHECK(sp(24) == 1001);
        // "a  b": the 2-space token, then "b" without a leading space.
        CHECK(t.encode("a  b") == std::vector<std::int32_t> { 'a', sp(2), 'b' });
        // A 30-space run: leftmost-longest gives 24 then 6.
        CHECK(t.encode(std::string(30, ' ') + "x") == std::vector<std::int32_t> { sp(24), sp(6), 'x' });
        // A single space is no added token: ordinary BPE.
        CHECK(t.encode("hello world") == ids_of(t, { "hello", " world" }));
        // Special tokens in text: matched by default, plain text otherwise.
        CHECK(t.encode("hello<|endoftext|>") == std::vector<std::int32_t> { ids_of(t, { "hello" })[0], 1100 });
        const auto lit = t.encode("<|endoftext|>", false);
        CHECK(lit.size() > 1);
        CHECK(t.decode(lit) == "<|endoftext|>");
        // Non-special added tokens are matched either way.
        CHECK(t.encode("a|||EMAIL_ADDRESS|||", false) == std::vector<std::int32_t> { 'a', 1101 });
        // Decoding: raw-space token bytes, special skipping.
        const std::vector<std::int32_t> ids { 'a', sp(3), 1100, 'b' };
        CHECK(t.decode(ids) == "a   <|endoftext|>b");
        CHECK(t.decode(ids, true) == "a   b");
        CHECK(t.is_special(1100));
        CHECK_FALSE(t.is_special(sp(3)));
    }

    TEST_CASE("added tokens: leftmost-longest, normalized ones match after NFC [io][tokenizer]")
    {
        auto j = make_tokenizer_json(style::qwen2, {});
        j["added_tokens"].push_back(
            { { "id", 2003 }, { "content", "ab" }, { "special", false }, { "normalized", true } });
        j["added_tokens"].push_back(
            { { "id", 2004 }, { "content", "abc" }, { "special", false }, { "normalized", true } });
        j["added_tokens"].push_back(
            { { "id", 2005 }, { "content", "\xC3\xA9t\xC3\xA9" }, { "special", false }, { "normalized", true } });
        const auto t = bpe_tokenizer::from_json(j.dump());
        CHECK(t.encode("xabcx") == std::vector<std::int32_t> { 'x', 2004, 'x' });
        CHECK(t.encode("xabx") == std::vector<std::int32_t> { 'x', 2003, 'x' });
        CHECK(t.encode("e\xCC\x81te\xCC\x81") == std::vector<std::int32_t> { 2005 }); // NFC first
        // ChatML around ordinary text (Qwen2).
        const auto ids = t.encode("<|im_start|>user\nhi<|im_end|>");
        CHECK(ids == std::vector<std::int32_t> { 2001, 'u', 's', 'e', 'r', '\n', 'h', 'i', 2002 });
        CHECK(t.decode(ids) == "<|im_start|>user\nhi<|im_end|>");
        CHECK(t.decode(ids, true) == "user\nhi");
    }

    // ---------------------------------------------------------------------------
    // Round trips and streaming

    // ---------------------------------------------------------------------------
    // Post-processors (spec of HF's serialisation: processors/template.rs, bert.rs, roberta.rs)

    TEST_CASE("post_processor TemplateProcessing: OLMoE's ($A / $A $B, no specials) adds nothing [io][tokenizer]")
    {
        // The post_processor of allenai/OLMoE-1B-7B-0924 and -0125, as written there.
        auto j = make_tokenizer_json(style::neox, word_merges);
        j["post_processor"] = json::parse(R"({"type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}})");
        const auto t = bpe_tokenizer::from_json(j.dump(), "olmoe.json");
        const auto plain = make_tokenizer(style::neox, word_merges);
        CHECK(t.post_processor_type() == "TemplateProcessing");
        CHECK(t.post_processor_added(false) == 0);
        CHECK(t.post_processor_added(true) == 0);
        CHECK(t.encode("hello world") == ids_of(t, { "hello", " world" }));
        CHECK(t.encode("hello world") == plain.encode("hello world"));
        CHECK(t.encode("hello world", true, false) == t.encode("hello world"));
        auto both = ids_of(t, { "hello" });
        const auto w = ids_of(t, { " world" });
        both.insert(both.end(), w.begin(), w.end());
        CHECK(t.encode_pair("hello", " world") == both);
        CHECK(plain.encode_pair("hello", " world") == both); // no post-processor: A then B
    }

    TEST_CASE("post_processor TemplateProcessing with special tokens: single, pair, add_special off [io][tokenizer]")
    {
        // [BOS] $A [EOS2] with a two-id special, and [BOS] $A $B:1 [BOS]:1.
        auto j = make_tokenizer_json(style::neox, word_merges);
        j["post_processor"] = json::parse(R"({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "two", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}],
            "special_tokens": {
                "<|endoftext|>": {"id": "<|endoftext|>", "ids": [1100], "tokens": ["<|endoftext|>"]},
                "two": {"id": "two", "ids": [1000, 1100], "tokens": ["<|padding|>", "<|endoftext|>"]}}})");
        const auto t = bpe_tokenizer::from_json(j.dump(), "tmpl.json");
        const auto hello = ids_of(t, { "hello" }), world = ids_of(t, { " world" });
        CHECK(t.post_processor_added(false) == 3);
        CHECK(t.post_processor_added(true) == 2);
        std::vector<std::int32_t> want { 1100 };
        want.insert(want.end(), hello.begin(), hello.end());
        want.insert(want.end(), { 1000, 1100 });
        CHECK(t.encode("hello") == want);
        CHECK(t.encode("hello", true, false) == hello);
        CHECK(t.post_process(hello) == want);
        CHECK(t.decode(t.encode("hello"), true) == "hello"); // the added ids are special tokens
        std::vector<std::int32_t> pair { 1100, hello[0], world[0], 1100 };
        CHECK(t.encode_pair("hello", " world") == pair);
        CHECK(t.post_process(hello, world) == pair);
        CHECK(t.encode_pair("hello", " world", true, false) == std::vector<std::int32_t> { hello[0], world[0] });
        // A copy keeps the templates.
        const bpe_tokenizer copy = t;
        CHECK(copy.encode("hello") == want);
    }

    TEST_CASE("post_processor BertProcessing and RobertaProcessing: cls/sep templates [io][tokenizer]")
    {
        auto j = make_tokenizer_json(style::neox, word_merges);
        j["post_processor"] = json::parse(
            R"({"type": "BertProcessing", "sep": ["<|endoftext|>", 1100], "cls": ["<|padding|>", 1000]})");
        const auto bert = bpe_tokenizer::from_json(j.dump(), "bert.json");
        const auto h = ids_of(bert, { "hello" })[0], w = ids_of(bert, { " world" })[0];
        CHECK(bert.post_processor_type() == "BertProcessing");
        CHECK(bert.encode("hello") == std::vector<std::int32_t> { 1000, h, 1100 });
        CHECK(bert.encode_pair("hello", " world") == std::vector<std::int32_t> { 1000, h, 1100, w, 1100 });
        CHECK(bert.post_processor_added(true) == 3);
        j["post_processor"] = json::parse(R"({"type": "RobertaProcessing", "sep": ["<|endoftext|>", 1100],
            "cls": ["<|padding|>", 1000], "trim_offsets": true, "add_prefix_space": false})");
        const auto roberta = bpe_tokenizer::from_json(j.dump(), "roberta.json");
        CHECK(roberta.encode("hello") == std::vector<std::int32_t> { 1000, h, 1100 });
        CHECK(roberta.encode_pair("hello", " world") == std::vector<std::int32_t> { 1000, h, 1100, 1100, w, 1100 });
        CHECK(roberta.encode_pair("hello", " world", true, false) == std::vector<std::int32_t> { h, w });
        CHECK(roberta.post_processor_added(false) == 2);
        CHECK(roberta.post_processor_added(true) == 4);
    }

    TEST_CASE("post_processor ByteLevel, null, and Sequence (Llama 3's ByteLevel + Template) [io][tokenizer]")
    {
        const auto hello = ids_of(make_tokenizer(style::qwen2, word_merges), { "hello" });
        auto j = make_tokenizer_json(style::qwen2, word_merges);
        for (const json& pp : { json(nullptr), json::parse(R"({"type": "ByteLevel", "add_prefix_space": false,
                                    "trim_offsets": false, "use_regex": false})") }) {
            j["post_processor"] = pp;
            const auto t = bpe_tokenizer::from_json(j.dump(), "t.json");
            CHECK(t.encode("hello") == hello);
            CHECK(t.post_processor_added(false) == 0);
            CHECK(t.post_processor_type() == (pp.is_null() ? "null" : "ByteLevel"));
        }
        j.erase("post_processor");
        CHECK(bpe_tokenizer::from_json(j.dump()).encode("hello") == hello);
        j["post_processor"] = json::parse(R"({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "Sequence", "processors": [{"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<|im_start|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [2001], "tokens": ["<|im_start|>"]}}}]}]})");
        const auto t = bpe_tokenizer::from_json(j.dump(), "seq.json");
        CHECK(t.post_processor_type() == "Sequence");
        std::vector<std::int32_t> want { 2001 };
        want.insert(want.end(), hello.begin(), hello.end());
        CHECK(t.encode("hello") == want);
        CHECK(t.encode_pair("hello", "hello") == std::vector<std::int32_t> { 2001, hello[0], 2001, hello[0] });
    }

    TEST_CASE("post_processor errors name the field: template, special_tokens, cls/sep, unknown type [io][tokenizer]")
    {
        const json good_tmpl = json::parse(R"({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1100], "tokens": ["<s>"]}}})");
        const json base = make_tokenizer_json(style::neox, word_merges);
        auto with = [&](const json& pp) {
            auto j = base;
            j["post_processor"] = pp;
            return j.dump();
        };
        CHECK(bpe_tokenizer::from_json(with(good_tmpl)).encode("hello")[0] == 1100);
        auto throws = [&](const json& pp, const char* needle) {
            CHECK_THROWS_WITH_AS(bpe_tokenizer::from_json(with(pp), "pp.json"),
                doctest::Contains((std::string("pp.json: ") + needle).c_str()), kdial::error);
        };
        throws({ { "type", "Foo" } }, "post_processor.type: \"Foo\" is not supported");
        throws(json::parse(R"({"type": "Sequence", "processors": [{"type": "ByteLevel"}, {"type": "Foo"}]})"),
            "post_processor.processors[1].type: \"Foo\" is not supported");
        throws({ { "type", "Sequence" } }, "post_processor.processors: missing");
        {
            json pp = { { "type", "Sequence" }, { "processors", json::array({ good_tmpl, good_tmpl }) } };
            throws(pp, "post_processor.processors[1]: a second post-processor that adds tokens");
        }
        auto tmpl = [&](auto&& edit) {
            json t = good_tmpl;
            edit(t);
            return t;
        };
        throws(tmpl([](json& t) { t.erase("special_tokens"); }), "post_processor.special_tokens: missing");
        throws(tmpl([](json& t) { t.erase("pair"); }), "post_processor.pair: missing");
        throws(tmpl([](json& t) { t["single"] = "[CLS] $A"; }), "post_processor.single: missing or not an array");
        throws(tmpl([](json& t) { t["single"][0]["SpecialToken"]["id"] = "</s>"; }),
            "post_processor.single[0].SpecialToken.id: \"</s>\" is not in post_processor.special_tokens");
        throws(tmpl([](json& t) { t["single"][1]["Sequence"]["id"] = "B"; }),
            "post_processor.single[1].Sequence.id: \"B\" is not the sequence of a single template");
        throws(tmpl([](json& t) { t["pair"][1]["Sequence"]["id"] = "C"; }),
            "post_processor.pair[1].Sequence.id: \"C\" is not a sequence");
        throws(tmpl([](json& t) { t["single"].push_back(t["single"][1]); }),
            "post_processor.single: must use sequence A exactly once, uses it 2 times");
        throws(tmpl([](json& t) { t["pair"].erase(1); }), "post_processor.pair: must use sequence A and sequence B");
        throws(tmpl([](json& t) {
            t["single"][0] = { { "Special", { { "id", "<s>" }, { "type_id", 0 } } } };
        }),
            "post_processor.single[0]: expected {\"Sequence\"");
        throws(tmpl([](json& t) { t["single"][1]["Sequence"]["type_id"] = -1; }),
            "post_processor.single[1].Sequence.type_id: expected an integer in [0, 2^32)");
        throws(tmpl([](json& t) { t["single"][1]["Sequence"].erase("type_id"); }),
            "post_processor.single[1].Sequence.type_id");
        throws(tmpl([](json& t) { t["special_tokens"]["<s>"]["id"] = "<x>"; }),
            "post_processor.special_tokens[\"<s>\"].id: expected the key \"<s>\"");
        throws(tmpl([](json& t) { t["special_tokens"]["<s>"]["tokens"].push_back("x"); }),
            "post_processor.special_tokens[\"<s>\"].tokens: 2 tokens for 1 ids");
        throws(tmpl([](json& t) { t["special_tokens"]["<s>"]["ids"][0] = 99999; }),
            "post_processor.special_tokens[\"<s>\"].ids[0]: id 99999 has no token");
        throws(tmpl([](json& t) { t["special_tokens"]["<s>"]["ids"][0] = "1"; }),
            "post_processor.special_tokens[\"<s>\"].ids[0]: expected a token id");
        throws(json::parse(R"({"type": "BertProcessing", "sep": ["</s>"], "cls": ["<s>", 1100]})"),
            "post_processor.sep: expected [\"token\", id]");
        throws(json::parse(R"({"type": "RobertaProcessing", "sep": ["</s>", 1100], "cls": ["<s>", 5000]})"),
            "post_processor.cls[1]: id 5000 has no token");
        throws(json::parse(R"({"type": "RobertaProcessing", "sep": ["</s>", 1100], "cls": ["<s>", 1000],
            "trim_offsets": "yes"})"),
            "post_processor.trim_offsets: expected true or false");
    }

    TEST_CASE("encode -> decode round trip on random text incl. ill-formed bytes [io][tokenizer]")
    {
        const std::vector<std::string> pool = { "a", "b", "Z", "e", "'", "s", "L", " ", " ", " ", "  ", "\n", "\r\n",
            "\t", "0", "7", ".", "!", "<|endoftext|>", u8(0xE9), u8(0x4E2D), u8(0x1F44B), u8(0x0301), u8(0x1100),
            u8(0x1161), u8(0xA0), u8(0x3000), u8(0x0663), u8(0x212B), "\xFF", "\xC3", "\xE2\x82", "\x80" };
        for (const style st : { style::neox, style::qwen2 }) {
            const auto t = make_tokenizer(st, word_merges);
            std::mt19937 rng(st == style::neox ? 11 : 12);
            for (int trial = 0; trial < 300; ++trial) {
                std::string s;
                const int len = int(rng() % 24);
                for (int k = 0; k < len; ++k)
                    s += pool[rng() % pool.size()];
                const auto ids = t.encode(s);
                for (auto id : ids)
                    REQUIRE(t.is_valid_id(id));
                const std::string want = nfc_normalize(s);
                REQUIRE_MESSAGE(t.decode_bytes(ids) == want, "input ", json(utf8_sanitize(s)).dump());
                REQUIRE(t.decode(ids) == utf8_sanitize(want));
            }
        }
    }

    TEST_CASE("stream decoder holds back a split multi-byte character [io][tokenizer]")
    {
        const auto t = make_tokenizer(style::qwen2); // no merges: one id per byte
        const std::string wave = u8(0x1F44B); // 4 bytes, so 4 ids
        const auto ids = t.encode("hi " + wave + "!");
        REQUIRE(ids.size() == 3 + 4 + 1);
        bpe_stream_decoder d(t);
        std::string got;
        CHECK(d.push(ids[0]) == "h");
        CHECK(d.push(ids[1]) == "i");
        CHECK(d.push(ids[2]) == " ");
        CHECK(d.push(ids[3]).empty());
        CHECK(d.push(ids[4]).empty());
        CHECK(d.push(ids[5]).empty());
        CHECK(d.pending_bytes() == 3);
        CHECK(d.push(ids[6]) == wave);
        CHECK(d.push(ids[7]) == "!");
        CHECK(d.flush().empty());

        // A stray byte is emitted as U+FFFD at once; an unfinished one at flush.
        CHECK(d.push(0xFF) == u8(0xFFFD));
        CHECK(d.push(0xE2).empty());
        CHECK(d.push('a') == u8(0xFFFD) + "a"); // E2 then 'a': the E2 can no longer complete
        CHECK(d.push(0xF0).empty());
        CHECK(d.flush() == u8(0xFFFD));

        // Any id sequence: concatenated output equals decode().
        std::mt19937 rng(5);
        for (int trial = 0; trial < 200; ++trial) {
            std::vector<std::int32_t> seq;
            for (int k = int(rng() % 16); k > 0; --k)
                seq.push_back(std::int32_t(rng() % 256));
            bpe_stream_decoder s(t);
            std::string out;
            for (auto id : seq)
                out += s.push(id);
            out += s.flush();
            REQUIRE(out == t.decode(seq));
        }
    }

    TEST_CASE("encode is safe from several threads (shared cache) [io][tokenizer]")
    {
        const auto t = make_tokenizer(style::neox, word_merges);
        const std::string text = "hello world, hello the world 123 \xC3\xA9t\xC3\xA9  ok\n";
        const auto want = t.encode(text);
        std::vector<std::vector<std::int32_t>> got(4);
        std::vector<std::thread> th;
        for (std::size_t i = 0; i < got.size(); ++i)
            th.emplace_back([&, i] {
                for (int r = 0; r < 200; ++r)
                    got[i] = t.encode(text + std::to_string(r % 7));
            });
        for (auto& x : th)
            x.join();
        for (const auto& g : got)
            CHECK(t.decode(g).substr(0, text.size()) == text);
        const bpe_tokenizer copy = t; // copies get a fresh cache
        CHECK(copy.encode(text) == want);
    }

    // ---------------------------------------------------------------------------
    // Ids and errors

    TEST_CASE("ids: vocab size, holes, bad ids name the id [io][tokenizer]")
    {
        const auto t = make_tokenizer(style::qwen2);
        CHECK(t.vocab_size() == 2003);
        CHECK(t.is_valid_id(0));
        CHECK(t.is_valid_id(2002));
        CHECK(t.is_valid_id(1500)); // a filler entry
        CHECK_FALSE(t.is_valid_id(2003));
        CHECK_FALSE(t.is_valid_id(-1));
        CHECK(t.id_to_token(32) == u8(0x120));
        CHECK(t.id_to_token(2001) == "<|im_start|>");
        CHECK(t.token_to_id("<|im_end|>") == 2002);
        CHECK_FALSE(t.token_to_id("nope").has_value());
        const std::vector<std::int32_t> bad { 'a', 151900 };
        CHECK_THROWS_WITH_AS(t.decode(bad), doctest::Contains("token id 151900 has no token"), kdial::error);
        CHECK_THROWS_WITH_AS(t.id_to_token(-3), doctest::Contains("token id -3"), kdial::error);
        bpe_stream_decoder d(t);
        CHECK_THROWS_AS(d.push(2003), kdial::error);

        // A hole: an added token reusing a vocab id under another string
        // counts as an entry of its own (HF's len(tokenizer)), so n = 2004
        // while ids reach only 2002.
        auto j = make_tokenizer_json(style::qwen2, {});
        j["added_tokens"].push_back(json { { "id", 5 }, { "content", "<|alias|>" }, { "special", true } });
        const auto h = bpe_tokenizer::from_json(j.dump(), "hole.json");
        CHECK(h.vocab_size() == 2004);
        CHECK_FALSE(h.is_valid_id(2003));
        CHECK(h.id_to_token(5) == "<|alias|>");
    }

    TEST_CASE("sparse ids load (HF accepts any id) into a table sized by the entry count [io][tokenizer]")
    {
        // An id-indexed table asked 154 GB for one vocab id of 2147483646, and
        // the fix that bounded ids by the entry count rejected files HF loads
        // (a 463-entry vocab with <|endoftext|> at 50279). Both ways now:
        // the far id loads, and the table holds entries, not ids.
        for (const std::int64_t id : { std::int64_t(2147483646), std::int64_t(25'000'000), std::int64_t(2004) }) {
            auto j = make_tokenizer_json(style::qwen2, {});
            j["model"]["vocab"]["<|far|>"] = id;
            j["added_tokens"].push_back(
                json { { "id", id }, { "content", "<|far|>" }, { "special", true }, { "normalized", false } });
            const auto t = bpe_tokenizer::from_json(j.dump(), "far.json");
            CHECK(t.vocab_size() == 2004);
            CHECK(t.id_limit() == std::size_t(id) + 1);
            CHECK(t.is_valid_id(std::int32_t(id)));
            CHECK(t.is_special(std::int32_t(id)));
            CHECK_FALSE(t.is_valid_id(2003)); // the gap below it
            CHECK_FALSE(t.is_valid_id(std::int32_t(id) - 1));
            // ids() walks the entries: 0..2002 and the far one, ascending.
            const auto entries = t.ids();
            REQUIRE(entries.size() == 2004);
            CHECK(entries[0] == 0);
            CHECK(entries[2002] == 2002);
            CHECK(entries[2003] == std::int32_t(id));
            CHECK(std::is_sorted(entries.begin(), entries.end()));
            CHECK(t.token_to_id("<|far|>") == std::int32_t(id));
            CHECK(t.encode("a<|far|>") == std::vector<std::int32_t> { *t.token_to_id("a"), std::int32_t(id) });
            CHECK(t.decode(std::vector<std::int32_t> { std::int32_t(id), *t.token_to_id("a") }) == "<|far|>a");
            CHECK(t.decode(std::vector<std::int32_t> { std::int32_t(id) }, true).empty());
            kdial::test::check_error([&] { (void)t.id_to_token(2003); },
                { "far.json: token id 2003 has no token (valid ids lie in [0, " + std::to_string(id + 1) + ")" });
        }
        {
            // An added token alone far out (not in the vocab): an entry of its own.
            auto j = make_tokenizer_json(style::qwen2, {});
            j["added_tokens"][1]["id"] = 2147483646;
            const auto t = bpe_tokenizer::from_json(j.dump(), "far.json");
            CHECK(t.vocab_size() == 2003);
            CHECK(t.id_to_token(2147483646) == "<|im_start|>");
            CHECK(t.encode("<|im_start|>") == std::vector<std::int32_t> { 2147483646 });
        }
        for (const char* bad : { "2147483647", "4294967296", "-1", "5.0", "\"5\"", "true", "1e300" }) {
            auto j = make_tokenizer_json(style::qwen2, {});
            j["model"]["vocab"]["<|x|>"] = json::parse(bad);
            kdial::test::check_error([&] { (void)bpe_tokenizer::from_json(j.dump(), "bad.json"); },
                { "bad.json: model.vocab[\"<|x|>\"]: expected a token id" });
        }
        {
            auto j = make_tokenizer_json(style::qwen2, {});
            j["added_tokens"][2]["content"] = std::string(1025, 'a');
            kdial::test::check_error([&] { (void)bpe_tokenizer::from_json(j.dump(), "long.json"); },
                { "long.json: added_tokens[2].content: \"aaaa", "is 1025 bytes, longer than the limit of 1024" });
            j["added_tokens"][2]["content"] = std::string(1024, 'a');
            CHECK(bpe_tokenizer::from_json(j.dump(), "ok.json").encode(std::string(1024, 'a')).size() == 1);
        }
        {
            auto j = make_tokenizer_json(style::qwen2, {});
            j["added_tokens"][0]["id"] = "7";
            kdial::test::check_error([&] { (void)bpe_tokenizer::from_json(j.dump(), "bad.json"); },
                { "bad.json: added_tokens[0].id: expected a token id", "got string \"7\"" });
        }
    }

    TEST_CASE("tokenizer.json: duplicate vocab keys, deep nesting, directory, FIFO, symlink loop [io][tokenizer]")
    {
        const std::string good = make_tokenizer_json(style::qwen2, {}).dump();
        // A duplicate vocab key (last-wins before): the text is edited, as a json object cannot hold one.
        std::string dup = good;
        const auto at = dup.find("\"vocab\":{");
        REQUIRE(at != std::string::npos);
        dup.insert(at + 9, "\"<|im_end|>\":7,\"<|im_end|>\":8,");
        kdial::test::check_error([&] { (void)bpe_tokenizer::from_json(dup, "dup.json"); },
            { "dup.json: tokenizer has the key \"<|im_end|>\" twice in model.vocab" });
        // 100 000 levels of nesting (a stack overflow in the error message before).
        std::string deep = good;
        deep.insert(1, "\"normalizer_x\": " + std::string(100'000, '[') + std::string(100'000, ']') + ",");
        kdial::test::check_error([&] { (void)bpe_tokenizer::from_json(deep, "deep.json"); },
            { "deep.json: tokenizer nests deeper than 64 levels" });

        const kdial::test::temp_dir dir;
        const auto path = dir / "tokenizer.json";
        std::filesystem::create_directory(path);
        kdial::test::check_error(
            [&] { (void)bpe_tokenizer::from_file(path); }, { path.string(), "it is a directory, not a regular file" });
        std::filesystem::remove(path);
        REQUIRE(::mkfifo(path.c_str(), 0600) == 0); // blocked forever in open() before
        kdial::test::check_error([&] { (void)bpe_tokenizer::from_file(path); }, { path.string(), "FIFO" });
        std::filesystem::remove(path);
        std::filesystem::create_symlink(dir / "other.json", dir / "other2.json");
        std::filesystem::create_symlink(dir / "other2.json", dir / "other.json");
        std::filesystem::create_symlink(dir / "other.json", path);
        kdial::test::check_error([&] { (void)bpe_tokenizer::from_file(path); }, { path.string(), "symlink loop" });
        std::filesystem::remove(path);
        kdial::test::write_file(path, good);
        CHECK(bpe_tokenizer::from_file(path).vocab_size() == 2003);
    }

    TEST_CASE("load errors name the file and the field [io][tokenizer]")
    {
        auto throws = [](const json& j, const char* needle) {
            CHECK_THROWS_WITH_AS(
                bpe_tokenizer::from_json(j.dump(), "bad.json"), doctest::Contains(needle), kdial::error);
            CHECK_THROWS_WITH_AS(
                bpe_tokenizer::from_json(j.dump(), "bad.json"), doctest::Contains("bad.json: "), kdial::error);
        };
        const json good = make_tokenizer_json(style::qwen2, { { "a", "b" } });
        CHECK_NOTHROW(bpe_tokenizer::from_json(good.dump()));
        {
            auto j = good;
            j["model"]["type"] = "WordPiece";
            throws(j, "model.type: \"WordPiece\" is not supported");
        }
        {
            auto j = good;
            j["model"]["byte_fallback"] = true;
            throws(j, "model.byte_fallback: true is not supported");
        }
        {
            auto j = good; // Llama 3's regex: not one of the two known patterns
            j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
                = R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
            throws(j, "pre_tokenizer.pretokenizers[0].pattern.Regex: unknown split regex");
        }
        {
            auto j = good;
            j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithNext";
            throws(j, "pre_tokenizer.pretokenizers[0].behavior");
        }
        {
            auto j = good;
            j["pre_tokenizer"] = { { "type", "Whitespace" } };
            throws(j, "pre_tokenizer.type: \"Whitespace\" is not supported");
        }
        for (const json& m : { json("a b c"), json("ab"), json(" b"), json::array({ "a" }), json(42) }) {
            auto j = good;
            j["model"]["merges"] = json::array({ m });
            throws(j, "model.merges[0]: malformed merge");
        }
        {
            auto j = good;
            j["model"]["merges"].push_back("q \xC4\xA0zz");
            throws(j, "model.merges[1]: merge");
        }
        {
            auto j = good;
            j["added_tokens"][0]["lstrip"] = true;
            throws(j, "added_tokens[0].lstrip: true is not supported");
        }
        {
            auto j = good;
            j["normalizer"] = { { "type", "NFKC" } };
            throws(j, "normalizer.type: \"NFKC\" is not supported");
        }
        {
            auto j = good;
            j["normalizer"] = { { "type", "Sequence" },
                { "normalizers", json::array({ { { "type", "NFC" } }, { { "type", "Lowercase" } } }) } };
            throws(j, "normalizer.normalizers[1].type: \"Lowercase\"");
        }
        {
            auto j = good;
            j["decoder"] = { { "type", "WordPiece" } };
            throws(j, "decoder.type");
        }
        {
            auto j = good;
            j["post_processor"] = { { "type", "TemplateProcessing" } };
            throws(j, "post_processor.special_tokens: missing");
        }
        {
            auto j = good;
            j["model"]["vocab"]["dup"] = 5;
            throws(j, "model.vocab: id 5 is used by");
        }
        {
            auto j = good;
            j["model"]["vocab"]["neg"] = -2;
            throws(j, "expected a token id");
        }
        CHECK_THROWS_WITH_AS(bpe_tokenizer::from_json("{not json", "bad.json"),
            doctest::Contains("bad.json: tokenizer is not valid JSON"), kdial::error);
        CHECK_THROWS_WITH_AS(bpe_tokenizer::from_file("/nonexistent/tokenizer.json"),
            doctest::Contains("/nonexistent/tokenizer.json: cannot open"), kdial::error);
    }

    TEST_CASE("from_file reads a tokenizer.json [io][tokenizer]")
    {
        const auto dir = std::filesystem::temp_directory_path()
            / ("kdial_tokenizer_test_" + std::to_string(std::random_device {}()));
        std::filesystem::create_directories(dir);
        const auto path = dir / "tokenizer.json";
        {
            std::ofstream out(path, std::ios::binary);
            out << make_tokenizer_json(style::neox, word_merges).dump(2);
        }
        const auto t = bpe_tokenizer::from_file(path);
        CHECK(t.source_name() == path.string());
        CHECK(t.decode(t.encode("hello world")) == "hello world");
        std::filesystem::remove_all(dir);
    }

} // TEST_SUITE
