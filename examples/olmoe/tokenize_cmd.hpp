// olmoe tokenize / detokenize: a checkpoint's tokenizer.json from the command
// line, as llama.cpp's tokenize tool shows it: the ids of a text with their
// pieces, or the text of a list of ids. The bodies of the two commands; main.cpp
// parses the options and maps usage errors to exit status 2.
#pragma once

#include "gguf_model.hpp" // is_gguf_path
#include "sweep.hpp" // parse_token_ids

#include <kdial/core/error.hpp>
#include <kdial/io/file.hpp>
#include <kdial/io/gguf_tokenizer.hpp>
#include <kdial/io/tokenizer.hpp>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace olmoe {

// The tokenizer of --model: a checkpoint directory's tokenizer.json, or the
// tokenizer.ggml.* metadata of a GGUF file (then `bos`, if given, receives the
// id the file asks to prepend to a prompt: tokenizer.ggml.add_bos_token).
// Errors name the path.
inline kdial::io::bpe_tokenizer load_tokenizer(const std::string& model, std::optional<std::int32_t>* bos = nullptr)
{
    namespace fs = std::filesystem;
    if (is_gguf_path(model)) {
        const auto f = kdial::io::gguf_file::open(model);
        auto g = kdial::io::gguf_tokenizer::from_gguf(f);
        if (!g)
            throw kdial::error(kdial::detail::cat(model, ": no tokenizer.ggml.model (the file holds no tokenizer)"));
        if (bos != nullptr && g->add_bos)
            *bos = g->bos;
        return std::move(g->tok);
    }
    if (!fs::is_directory(model))
        throw kdial::error(
            kdial::detail::cat(model, ": not a directory (--model expects a checkpoint directory or a .gguf file)"));
    const fs::path path = fs::path(model) / "tokenizer.json";
    if (!fs::exists(fs::symlink_status(path)))
        throw kdial::error(kdial::detail::cat(path.string(), ": no such file (the checkpoint has no tokenizer)"));
    return kdial::io::bpe_tokenizer::from_file(path);
}

// A token's bytes, shown between single quotes on one line: well-formed UTF-8
// as is, except \n \r \t \\ \' and the other control characters (\xNN); the
// bytes of an ill-formed part (a character split over tokens) as \xNN each.
inline std::string printable_piece(std::string_view bytes)
{
    std::string out;
    const auto hex = [&](unsigned char b) {
        static constexpr char digits[] = "0123456789ABCDEF";
        out += "\\x";
        out += digits[b >> 4];
        out += digits[b & 15];
    };
    for (std::size_t i = 0; i < bytes.size();) {
        const auto c = kdial::io::utf8_decode(bytes, i);
        if (!c.valid) {
            for (std::size_t k = 0; k < c.size; ++k)
                hex(static_cast<unsigned char>(bytes[i + k]));
        } else if (c.cp == '\n') {
            out += "\\n";
        } else if (c.cp == '\r') {
            out += "\\r";
        } else if (c.cp == '\t') {
            out += "\\t";
        } else if (c.cp == '\\' || c.cp == '\'') {
            out += '\\';
            out += char(c.cp);
        } else if (c.cp < 0x20 || c.cp == 0x7F) {
            hex(static_cast<unsigned char>(c.cp));
        } else {
            out.append(bytes.substr(i, c.size));
        }
        i += c.size;
    }
    return out;
}

inline void check_written(std::FILE* out)
{
    if (std::fflush(out) != 0 || std::ferror(out))
        throw kdial::error("write to the output failed");
}

// tokenize: one line per id, "   id -> 'piece'" (llama.cpp's layout), or with
// ids_only one line "1,2,3" (the form --ids and --tokens take).
inline void print_tokens(
    std::FILE* out, const kdial::io::bpe_tokenizer& tok, const std::vector<std::int32_t>& ids, bool ids_only)
{
    if (ids_only) {
        std::string line;
        for (std::size_t i = 0; i < ids.size(); ++i)
            line += (i ? "," : "") + std::to_string(ids[i]);
        line += '\n';
        std::fputs(line.c_str(), out);
    } else {
        for (const std::int32_t id : ids)
            std::fprintf(out, "%6d -> '%s'\n", int(id), printable_piece(tok.token_bytes(id)).c_str());
    }
    check_written(out);
}

// The ids of a file: integers separated by commas and/or whitespace, each
// an id of the tokenizer (errors name the file and the entry).
inline std::vector<std::int32_t> read_token_ids(const std::string& file, const kdial::io::bpe_tokenizer& tok)
{
    const std::string text = kdial::io::read_file(file, std::size_t(1) << 30);
    return parse_token_ids(text, file, int(tok.id_limit()));
}

// detokenize: exactly the decoded text (U+FFFD for ill-formed UTF-8), no
// newline added, so `olmoe detokenize` of `olmoe tokenize --ids-only` gives
// the (NFC-normalised) text back byte for byte. Throws kdial::error naming an
// id that has no token, before anything is written.
inline void print_text(
    std::FILE* out, const kdial::io::bpe_tokenizer& tok, const std::vector<std::int32_t>& ids, bool skip_special)
{
    const std::string text = tok.decode(ids, skip_special);
    std::fwrite(text.data(), 1, text.size(), out);
    check_written(out);
}

} // namespace olmoe
