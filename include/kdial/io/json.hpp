// The one entry for every JSON file kdial reads (config.json, tokenizer.json,
// model.safetensors.index.json, safetensors headers): a file reader that
// opens only regular files, a strict parser, bounded error briefs, and one
// checked integer conversion.
// Stage: io (untrusted files). Invariants: nothing read here is trusted; every
// failure is a kdial::error naming the file (and field and value where there
// is one); no error message serialises an untrusted value beyond a short,
// fixed-size brief; no input makes the parser or the message builder recurse
// deeper than json_max_depth; reading never blocks on a FIFO or a device.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <unordered_set>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/error.hpp"
#include "file.hpp"

namespace kdial::io {

// Nesting limit for every JSON document io parses (a safetensors header
// needs 3, a tokenizer.json about 6, a config.json about 4).
inline constexpr int json_max_depth = 64;
// Default size limit of a JSON text (the safetensors reference reader's limit
// on a header; tokenizer.json files of large vocabularies are ~10-35 MB).
inline constexpr std::size_t json_max_bytes = 100'000'000;
// Length of the brief of a JSON value in error messages.
inline constexpr std::size_t json_brief_length = 80;

namespace detail {

// Cuts s to at most n bytes without splitting a UTF-8 sequence, marking the cut.
inline std::string brief_cut(std::string_view s, std::size_t n)
{
    if (s.size() <= n)
        return std::string(s);
    std::size_t end = n > 3 ? n - 3 : 0;
    while (end > 0 && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80)
        --end; // back off continuation bytes to the lead byte
    return std::string(s.substr(0, end)) + "...";
}

inline void brief_string(std::string_view s, std::string& out, std::size_t limit)
{
    out += '"';
    for (const char ch : s) {
        if (out.size() >= limit)
            return;
        const auto c = static_cast<unsigned char>(ch);
        if (c == '"' || c == '\\') {
            out += '\\';
            out += ch;
        } else if (c < 0x20 || c == 0x7F) {
            static constexpr char hex[] = "0123456789abcdef";
            out += "\\u00";
            out += hex[c >> 4];
            out += hex[c & 15];
        } else {
            out += ch;
        }
    }
    out += '"';
}

// Appends a rendering of j to out, stopping once out holds `limit` bytes:
// the work is O(limit) whatever the size of j, and the recursion depth is
// bounded by `depth` (containers deeper than that print as [...] / {...}).
inline void brief_into(const nlohmann::json& j, std::string& out, std::size_t limit, int depth)
{
    using json = nlohmann::json;
    if (out.size() >= limit)
        return;
    switch (j.type()) {
    case json::value_t::object:
    case json::value_t::array: {
        const bool obj = j.is_object();
        out += obj ? '{' : '[';
        if (depth <= 0 && !j.empty()) {
            out += "...";
        } else {
            bool first = true;
            for (auto it = j.begin(); it != j.end(); ++it) {
                if (out.size() >= limit)
                    return;
                if (!first)
                    out += ','; // compact, as nlohmann's dump()
                first = false;
                if (obj) {
                    brief_string(it.key(), out, limit);
                    out += ':';
                }
                brief_into(it.value(), out, limit, depth - 1);
            }
        }
        out += obj ? '}' : ']';
        return;
    }
    case json::value_t::string:
        brief_string(j.get_ref<const std::string&>(), out, limit);
        return;
    case json::value_t::binary:
        out += "<binary>";
        return;
    case json::value_t::discarded:
        out += "<discarded>";
        return;
    default: // null, boolean, numbers: short by construction
        out += j.dump();
        return;
    }
}

} // namespace detail

// A short rendering of a JSON value for error messages: at most `limit`
// bytes (cut with "..."), whatever the value's size or depth.
inline std::string json_brief(const nlohmann::json& j, std::size_t limit = json_brief_length)
{
    std::string s;
    detail::brief_into(j, s, limit + 8, 8);
    return detail::brief_cut(s, limit);
}

// "string \"8\"", "boolean true", "number 2.5": a value with its JSON type.
inline std::string json_typed_brief(const nlohmann::json& j)
{
    return std::string(j.is_number() ? "number" : j.type_name()) + " " + json_brief(j);
}

// ---------------------------------------------------------------------------
// The strict parser
// ---------------------------------------------------------------------------

// Parses `text` as JSON with the rules nlohmann does not enforce: no object
// has the same key twice (nlohmann keeps the last silently), no nesting
// deeper than `max_depth`, no text longer than `max_bytes`, no raw NUL. The
// parser and the destructor of nlohmann::json are iterative, and the depth
// limit holds before any value is built deeper. `file_name` and `what`
// ("header", "tokenizer.json", "config") name the document in messages; a
// parse error's text is cut to a brief too (nlohmann quotes the token it last
// read, which can be a whole long string).
inline nlohmann::json parse_json_strict(std::string_view text, std::string_view file_name, std::string_view what,
    int max_depth = json_max_depth, std::size_t max_bytes = json_max_bytes)
{
    using json = nlohmann::json;
    using ::kdial::detail::cat;
    if (text.size() > max_bytes)
        throw error(cat(file_name, ": ", what, " is ", text.size(), " bytes, larger than the limit of ", max_bytes));
    // JSON text never holds a raw NUL, and nlohmann takes one for the end of
    // the input, which would silently drop whatever follows it.
    if (const auto nul = text.find('\0'); nul != std::string_view::npos)
        throw error(cat(file_name, ": ", what, " has a NUL byte at ", what, " offset ", nul));

    struct frame {
        bool object;
        std::string key; // the key being read (objects)
        std::unordered_set<std::string> keys; // keys seen so far (objects)
    };
    std::vector<frame> stack;
    // "model.vocab", "added_tokens[]": the open containers, the innermost one
    // (whose key is being read) included or not.
    const auto path = [&](bool innermost) {
        std::string s;
        for (std::size_t i = 0; i + (innermost ? 0 : 1) < stack.size(); ++i) {
            if (stack[i].object) {
                if (!s.empty())
                    s += '.';
                s += detail::brief_cut(stack[i].key, 40);
            } else {
                s += "[]";
            }
        }
        return s.empty() ? std::string("the top level") : detail::brief_cut(s, 160);
    };
    const json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
        switch (ev) {
        case json::parse_event_t::object_start:
        case json::parse_event_t::array_start:
            if (depth >= max_depth)
                throw error(
                    cat(file_name, ": ", what, " nests deeper than ", max_depth, " levels (at ", path(true), ")"));
            stack.push_back({ ev == json::parse_event_t::object_start, {}, {} });
            break;
        case json::parse_event_t::object_end:
        case json::parse_event_t::array_end:
            if (!stack.empty())
                stack.pop_back();
            break;
        case json::parse_event_t::key:
            if (!stack.empty() && stack.back().object) {
                auto& f = stack.back();
                f.key = parsed.get_ref<const std::string&>();
                if (!f.keys.insert(f.key).second)
                    throw error(
                        cat(file_name, ": ", what, " has the key ", json_brief(parsed), " twice in ", path(false)));
            }
            break;
        default:
            break;
        }
        return true;
    };
    try {
        return json::parse(text.begin(), text.end(), cb);
    } catch (const json::exception& e) {
        throw error(cat(file_name, ": ", what, " is not valid JSON: ", detail::brief_cut(e.what(), 200)));
    }
}

// read_file_checked + parse_json_strict.
inline nlohmann::json read_json_file(const std::filesystem::path& path, std::string_view what,
    std::size_t max_bytes = json_max_bytes, int max_depth = json_max_depth)
{
    const std::string text = read_file_checked(path, what, max_bytes);
    return parse_json_strict(text, path.string(), what, max_depth, max_bytes);
}

// ---------------------------------------------------------------------------
// Checked integers
// ---------------------------------------------------------------------------

// A JSON value as a non-negative integer, or nothing (negative, fractional,
// too large, or not a number).
inline std::optional<std::uint64_t> json_uint(const nlohmann::json& j) noexcept
{
    if (j.is_number_unsigned())
        return j.get<std::uint64_t>();
    if (j.is_number_integer()) {
        const auto v = j.get<std::int64_t>();
        if (v >= 0)
            return static_cast<std::uint64_t>(v);
    }
    return std::nullopt;
}

// A JSON value as an integer in [lo, hi], or nothing: the value must be a JSON
// number with an integral value (2, or 2.0 as some writers store integers);
// strings ("8"), booleans, fractions (2.5), non-finite and out-of-range values
// (1e300, 2^32 for a 32-bit field) give nothing. No conversion is undefined.
inline std::optional<std::int64_t> json_int_in(const nlohmann::json& j, std::int64_t lo, std::int64_t hi) noexcept
{
    if (j.is_number_unsigned()) {
        const std::uint64_t v = j.get<std::uint64_t>();
        if (hi >= 0 && v <= static_cast<std::uint64_t>(hi) && static_cast<std::int64_t>(v) >= lo)
            return static_cast<std::int64_t>(v);
        return std::nullopt;
    }
    if (j.is_number_integer()) {
        const std::int64_t v = j.get<std::int64_t>();
        return v >= lo && v <= hi ? std::optional<std::int64_t>(v) : std::nullopt;
    }
    if (j.is_number_float()) {
        const double d = j.get<double>();
        // Compare as doubles before converting (2^63 is exact; NaN fails every test).
        if (!(d >= -0x1p63 && d < 0x1p63))
            return std::nullopt;
        const auto v = static_cast<std::int64_t>(d);
        if (static_cast<double>(v) != d || v < lo || v > hi)
            return std::nullopt;
        return v;
    }
    return std::nullopt;
}

// The one checked conversion for integer fields of untrusted files: `j` as a
// T in [lo, hi], or a kdial::error "FILE: field 'FIELD' must be an integer in
// [lo, hi], got TYPE VALUE".
template <std::integral T>
T json_integer(const nlohmann::json& j, T lo, T hi, std::string_view file, std::string_view field)
{
    static_assert(sizeof(T) <= sizeof(std::int64_t) && !std::is_same_v<T, std::uint64_t>,
        "json_integer reads values that fit in int64");
    if (const auto v = json_int_in(j, static_cast<std::int64_t>(lo), static_cast<std::int64_t>(hi)))
        return static_cast<T>(*v);
    throw error(::kdial::detail::cat(
        file, ": field '", field, "' must be an integer in [", +lo, ", ", +hi, "], got ", json_typed_brief(j)));
}

} // namespace kdial::io
