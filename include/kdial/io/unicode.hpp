// UTF-8 coding, the character classes of the tokenizer split regexes, and NFC.
// Part of kdial::io (the tokenizer stage in front of the model); no runtime
// dependency: the data comes from unicode_tables.hpp, generated from the UCD by
// tools/gen_unicode_tables.py. Everything is a pure function of its input.
//
// NFC is Hugging Face tokenizers' NFC: its normaliser (the Rust crate
// unicode-normalization-alignments 0.1.12) has Unicode 9.0 tables, so the
// normalisation data here holds the characters assigned by 9.0 only; a later
// character (e.g. U+1DF6, U+1AC1, Dives Akuru U+11930..) has combining class 0,
// no decomposition and composes with nothing. The character classes follow
// the UCD the tables were generated from.
//
// Invalid UTF-8 policy: a "maximal subpart of an ill-formed subsequence"
// (Unicode 15 §3.9, the policy of Rust's String::from_utf8_lossy, which HF
// tokenizers uses) decodes as one U+FFFD with valid == false. utf8_sanitize
// replaces each such subpart with U+FFFD; nfc_normalize keeps the bytes of
// each subpart unchanged and treats it as a starter that never composes.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "unicode_tables.hpp"

namespace kdial::io {

inline constexpr char32_t unicode_replacement_char = 0xFFFD;

// One decoded character: code point, its length in bytes, and whether the
// bytes were well-formed UTF-8 (if not, cp is U+FFFD and size covers one
// maximal ill-formed subpart, >= 1 byte).
struct utf8_char {
    char32_t cp;
    std::uint32_t size;
    bool valid;
};

// Decodes the character starting at s[i] (i < s.size()).
inline utf8_char utf8_decode(std::string_view s, std::size_t i) noexcept
{
    const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
    const unsigned char c0 = b(i);
    if (c0 < 0x80)
        return { c0, 1, true };
    int need;
    char32_t cp;
    unsigned char lo = 0x80, hi = 0xBF; // allowed range of the second byte (Table 3-7)
    if (c0 >= 0xC2 && c0 <= 0xDF) {
        need = 1;
        cp = c0 & 0x1F;
    } else if (c0 >= 0xE0 && c0 <= 0xEF) {
        need = 2;
        cp = c0 & 0x0F;
        if (c0 == 0xE0)
            lo = 0xA0;
        else if (c0 == 0xED)
            hi = 0x9F; // no surrogates
    } else if (c0 >= 0xF0 && c0 <= 0xF4) {
        need = 3;
        cp = c0 & 0x07;
        if (c0 == 0xF0)
            lo = 0x90;
        else if (c0 == 0xF4)
            hi = 0x8F; // <= U+10FFFF
    } else {
        return { unicode_replacement_char, 1, false }; // 80..C1, F5..FF
    }
    std::uint32_t n = 1;
    for (int k = 0; k < need; ++k, ++n) {
        if (i + n >= s.size())
            return { unicode_replacement_char, n, false };
        const unsigned char c = b(i + n);
        if (c < lo || c > hi)
            return { unicode_replacement_char, n, false };
        cp = (cp << 6) | (c & 0x3F);
        lo = 0x80;
        hi = 0xBF;
    }
    return { cp, n, true };
}

// Appends the UTF-8 encoding of cp (a scalar value; surrogates and values
// above U+10FFFF are written as U+FFFD).
inline void utf8_append(std::string& out, char32_t cp)
{
    if ((cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
        cp = unicode_replacement_char;
    if (cp < 0x80) {
        out.push_back(static_cast<char>(cp));
    } else if (cp < 0x800) {
        out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
        out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    } else {
        out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
        out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
}

inline bool utf8_is_valid(std::string_view s) noexcept
{
    for (std::size_t i = 0; i < s.size();) {
        const auto c = utf8_decode(s, i);
        if (!c.valid)
            return false;
        i += c.size;
    }
    return true;
}

// s with every maximal ill-formed subpart replaced by U+FFFD.
inline std::string utf8_sanitize(std::string_view s)
{
    std::string out;
    out.reserve(s.size());
    for (std::size_t i = 0; i < s.size();) {
        const auto c = utf8_decode(s, i);
        if (c.valid)
            out.append(s.substr(i, c.size));
        else
            utf8_append(out, unicode_replacement_char);
        i += c.size;
    }
    return out;
}

// Number of trailing bytes of s that form a well-formed but incomplete UTF-8
// sequence (0..3): the bytes a streaming decoder should hold back. Bytes that
// can no longer become valid are not counted.
inline std::size_t utf8_incomplete_suffix(std::string_view s) noexcept
{
    const std::size_t n = s.size();
    for (std::size_t back = 1; back <= 3 && back <= n; ++back) {
        const auto c0 = static_cast<unsigned char>(s[n - back]);
        if (c0 >= 0x80 && c0 <= 0xBF)
            continue; // continuation byte: look further back for the lead
        if (c0 < 0xC2 || c0 > 0xF4)
            return 0;
        const auto c = utf8_decode(s, n - back);
        // Incomplete and valid so far: the decoder ran off the end.
        return (!c.valid && n - back + c.size == n) ? back : 0;
    }
    return 0;
}

// ---------------------------------------------------------------------------
// Character classes of the split regexes.

enum class char_class : std::uint8_t {
    other = 0, // none of the below
    letter = 1, // \p{L}: general category Lu Ll Lt Lm Lo
    number = 2, // \p{N}: Nd Nl No
    space = 3, // \s: the White_Space property
};

namespace detail {

template <class Row, std::size_t N> const Row* find_range(const Row (&table)[N], char32_t cp) noexcept
{
    const Row* it = std::upper_bound(table, table + N, cp, [](char32_t c, const Row& r) { return c < r.first; });
    if (it == table)
        return nullptr;
    --it;
    return cp <= it->last ? it : nullptr;
}

inline constexpr char_class ascii_class(unsigned char c) noexcept
{
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
        return char_class::letter;
    if (c >= '0' && c <= '9')
        return char_class::number;
    if (c == ' ' || (c >= 0x09 && c <= 0x0D))
        return char_class::space;
    return char_class::other;
}

} // namespace detail

inline char_class unicode_class(char32_t cp) noexcept
{
    if (cp < 0x80)
        return detail::ascii_class(static_cast<unsigned char>(cp));
    const auto* r = detail::find_range(detail::unicode_tables::char_classes, cp);
    return r ? static_cast<char_class>(r->value) : char_class::other;
}

// Canonical combining class by Unicode 9.0 (0 for starters and for code
// points unassigned in 9.0).
inline std::uint8_t canonical_combining_class(char32_t cp) noexcept
{
    if (cp < 0x300)
        return 0;
    const auto* r = detail::find_range(detail::unicode_tables::combining_classes, cp);
    return r ? r->value : 0;
}

// ---------------------------------------------------------------------------
// NFC (Unicode Standard Annex #15): canonical decomposition (Hangul
// algorithmically), canonical ordering by combining class, canonical
// composition with the Full_Composition_Exclusion set removed from the tables.

namespace detail {

inline constexpr char32_t hangul_s_base = 0xAC00, hangul_l_base = 0x1100, hangul_v_base = 0x1161,
                          hangul_t_base = 0x11A7;
inline constexpr int hangul_l_count = 19, hangul_v_count = 21, hangul_t_count = 28,
                     hangul_n_count = hangul_v_count * hangul_t_count, hangul_s_count = hangul_l_count * hangul_n_count;

inline void canonical_decompose(char32_t cp, std::vector<char32_t>& out)
{
    if (cp >= hangul_s_base && cp < hangul_s_base + hangul_s_count) {
        const char32_t s = cp - hangul_s_base;
        out.push_back(hangul_l_base + s / hangul_n_count);
        out.push_back(hangul_v_base + (s % hangul_n_count) / hangul_t_count);
        if (s % hangul_t_count != 0)
            out.push_back(hangul_t_base + s % hangul_t_count);
        return;
    }
    if (cp >= 0xC0) {
        const auto& t = unicode_tables::canonical_decompositions;
        const auto* it = std::lower_bound(std::begin(t), std::end(t), cp,
            [](const unicode_tables::decomposition& d, char32_t c) { return d.cp < c; });
        if (it != std::end(t) && it->cp == cp) {
            canonical_decompose(it->first, out);
            if (it->second != 0)
                canonical_decompose(it->second, out);
            return;
        }
    }
    out.push_back(cp);
}

// The primary composite of a + b, or 0 if none.
inline char32_t canonical_compose(char32_t a, char32_t b) noexcept
{
    if (a >= hangul_l_base && a < hangul_l_base + hangul_l_count && b >= hangul_v_base
        && b < hangul_v_base + hangul_v_count)
        return hangul_s_base + ((a - hangul_l_base) * hangul_v_count + (b - hangul_v_base)) * hangul_t_count;
    if (a >= hangul_s_base && a < hangul_s_base + hangul_s_count && (a - hangul_s_base) % hangul_t_count == 0
        && b > hangul_t_base && b < hangul_t_base + hangul_t_count)
        return a + (b - hangul_t_base);
    const auto& t = unicode_tables::canonical_compositions;
    const auto* it = std::lower_bound(std::begin(t), std::end(t), std::pair { a, b },
        [](const unicode_tables::composition& c, std::pair<char32_t, char32_t> k) {
            return c.first != k.first ? c.first < k.first : c.second < k.second;
        });
    return (it != std::end(t) && it->first == a && it->second == b) ? it->composite : 0;
}

inline bool nfc_quick_check_yes(char32_t cp) noexcept
{
    return cp < 0x300 || !find_range(unicode_tables::nfc_quick_check_not_yes, cp);
}

// NFC of a run of well-formed UTF-8, appended to out. O(n log n) in the
// worst case: each run of non-starters is put in canonical order by a stable
// sort on the combining class (canonical ordering is exactly that, UAX #15
// §1.3), so a long adversarial run of marks costs no more than sorting it.
inline void nfc_append_valid(std::string_view s, std::string& out)
{
    std::vector<char32_t> buf;
    buf.reserve(s.size());
    for (std::size_t i = 0; i < s.size();) {
        const auto c = utf8_decode(s, i);
        canonical_decompose(c.cp, buf);
        i += c.size;
    }
    const std::size_t n = buf.size();
    std::vector<std::uint8_t> ccc(n);
    for (std::size_t i = 0; i < n; ++i)
        ccc[i] = canonical_combining_class(buf[i]);
    // Canonical ordering: a stable sort of each run of non-starters by class.
    std::vector<std::pair<std::uint8_t, char32_t>> run;
    for (std::size_t i = 0; i < n;) {
        if (ccc[i] == 0) {
            ++i;
            continue;
        }
        std::size_t j = i + 1;
        while (j < n && ccc[j] != 0)
            ++j;
        if (!std::is_sorted(ccc.begin() + std::ptrdiff_t(i), ccc.begin() + std::ptrdiff_t(j))) {
            run.clear();
            for (std::size_t k = i; k < j; ++k)
                run.emplace_back(ccc[k], buf[k]);
            std::stable_sort(run.begin(), run.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
            for (std::size_t k = i; k < j; ++k) {
                ccc[k] = run[k - i].first;
                buf[k] = run[k - i].second;
            }
        }
        i = j;
    }
    // Canonical composition. buf[i] and ccc[i] are read before anything at
    // index >= i is written (writes go to w <= i and to the starter < i).
    if (n > 0) {
        std::size_t starter = 0, w = 1;
        bool have_starter = ccc[0] == 0;
        int last_cc = 0; // ccc of the last character kept after the starter (0: adjacent)
        for (std::size_t i = 1; i < n; ++i) {
            const char32_t c = buf[i];
            const int cc = ccc[i];
            if (have_starter && (last_cc < cc || last_cc == 0)) {
                if (const char32_t comp = canonical_compose(buf[starter], c)) {
                    buf[starter] = comp;
                    continue;
                }
            }
            if (cc == 0) {
                starter = w;
                have_starter = true;
                last_cc = 0;
            } else {
                last_cc = cc;
            }
            buf[w++] = c;
        }
        buf.resize(w);
    }
    for (char32_t c : buf)
        utf8_append(out, c);
}

} // namespace detail

// True when s is certainly in NFC (the UAX #15 quick check answered Yes).
// ASCII, and most text in any script, returns true without touching tables
// beyond one binary search per non-ASCII character.
inline bool is_nfc_quick(std::string_view s) noexcept
{
    std::uint8_t last_cc = 0;
    for (std::size_t i = 0; i < s.size();) {
        if (static_cast<unsigned char>(s[i]) < 0x80) {
            last_cc = 0;
            ++i;
            continue;
        }
        const auto c = utf8_decode(s, i);
        i += c.size;
        if (!c.valid) {
            last_cc = 0;
            continue;
        }
        const auto cc = canonical_combining_class(c.cp);
        if ((cc != 0 && last_cc > cc) || !detail::nfc_quick_check_yes(c.cp))
            return false;
        last_cc = cc;
    }
    return true;
}

// Unicode Normalization Form C. Returns s unchanged (one copy) when the quick
// check says it is already NFC; ill-formed subparts are copied through as is.
inline std::string nfc_normalize(std::string_view s)
{
    if (is_nfc_quick(s))
        return std::string(s);
    std::string out;
    out.reserve(s.size() + s.size() / 4);
    std::size_t run = 0; // start of the current well-formed run
    for (std::size_t i = 0; i < s.size();) {
        const auto c = utf8_decode(s, i);
        if (!c.valid) {
            detail::nfc_append_valid(s.substr(run, i - run), out);
            out.append(s.substr(i, c.size));
            run = i + c.size;
        }
        i += c.size;
    }
    detail::nfc_append_valid(s.substr(run), out);
    return out;
}

} // namespace kdial::io
