// The hardened JSON entry (kdial/io/json.hpp): the regular-file reader (no
// such file, directory, FIFO, symlink loop, size limit), the strict parser
// (100 000-level nesting must not crash, duplicate keys named with their
// path, size limit, NUL), bounded briefs, and the checked integer conversion.
// Every adversarial input is generated here, small, in a temporary directory.
#include <doctest/doctest.h>
#include <kdial/io/json.hpp>

#include "io_test_util.hpp"

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <string>

using namespace kdial::io;
using kdial::test::check_error;
using kdial::test::error_of;
using kdial::test::temp_dir;
using kdial::test::write_file;
using json = nlohmann::json;

namespace {

// "[[[ ... ]]]" with `levels` arrays around `inner`.
std::string nested(std::size_t levels, std::string_view inner = "0")
{
    return std::string(levels, '[') + std::string(inner) + std::string(levels, ']');
}

} // namespace

TEST_SUITE("io/json")
{
    TEST_CASE("strict parser: 100 000 levels of nesting is an error, not a stack overflow [io][json]")
    {
        std::string objects;
        for (int i = 0; i < 100'000; ++i)
            objects += "{\"a\": ";
        for (const std::string& text : { nested(100'000), "{\"model_type\": " + nested(100'000) + "}",
                 objects + "1" + std::string(100'000, '}'), objects, std::string(100'000, '[') }) {
            const std::string msg = error_of([&] { (void)parse_json_strict(text, "deep.json", "config"); });
            CHECK_MESSAGE(msg.find("deep.json: config nests deeper than 64 levels") != std::string::npos, msg);
            CHECK(msg.size() < 400); // the message is a brief, never the value
        }
        // The limit itself: 64 levels parse, 65 do not.
        CHECK(parse_json_strict(nested(64), "ok.json", "x").is_array());
        check_error([&] { (void)parse_json_strict(nested(65), "d.json", "x"); }, { "d.json", "deeper than 64" });
        // The path of the too-deep value is named.
        check_error([&] { (void)parse_json_strict("{\"a\": {\"b\": " + nested(80) + "}}", "d.json", "x"); },
            { "d.json", "(at a.b[]" });
    }

    TEST_CASE("strict parser: duplicate keys are named with their path [io][json]")
    {
        check_error([] { (void)parse_json_strict(R"({"a": 1, "a": 2})", "dup.json", "config"); },
            { "dup.json: config has the key \"a\" twice in the top level" });
        check_error(
            [] { (void)parse_json_strict(R"({"model": {"vocab": {"x": 1, "y": 2, "x": 3}}})", "t.json", "tok"); },
            { "t.json", "\"x\" twice in model.vocab" });
        check_error([] { (void)parse_json_strict(R"({"l": [{"k": 1}, {"k": 1, "k": 2}]})", "t.json", "tok"); },
            { "\"k\" twice in l[]" });
        // The same key in sibling objects is fine.
        CHECK(parse_json_strict(R"({"a": {"k": 1}, "b": {"k": 2}})", "ok.json", "x")["b"]["k"] == 2);
    }

    TEST_CASE("strict parser: size limit, NUL, bounded parse errors [io][json]")
    {
        check_error([] { (void)parse_json_strict("[1, 2, 3]", "big.json", "config", 64, 8); },
            { "big.json: config is 9 bytes, larger than the limit of 8" });
        check_error([] { (void)parse_json_strict(std::string("{\"a\": 1}\0{}", 11), "nul.json", "x"); },
            { "nul.json", "NUL byte at x offset 8" });
        // An unterminated 1 MB string: nlohmann quotes its last token; the message stays short.
        const std::string text = "{\"a\": \"" + std::string(1 << 20, 'x');
        const std::string msg = error_of([&] { (void)parse_json_strict(text, "long.json", "config"); });
        CHECK_MESSAGE(msg.find("long.json: config is not valid JSON") == 0, msg);
        CHECK(msg.size() < 400);
    }

    TEST_CASE("json_brief is bounded for huge and deep values [io][json]")
    {
        const json big_string = std::string(1 << 20, 'y');
        CHECK(json_brief(big_string).size() <= json_brief_length);
        CHECK(json_brief(big_string).ends_with("..."));
        json deep = 1;
        for (int i = 0; i < 10'000; ++i) // built by hand: deeper than the parser would allow
            deep = json::array({ std::move(deep) });
        const std::string b = json_brief(deep);
        CHECK(b.size() <= json_brief_length);
        CHECK(b.starts_with("[[[[["));
        json wide = json::array();
        for (int i = 0; i < 100'000; ++i)
            wide.push_back(i);
        CHECK(json_brief(wide).size() <= json_brief_length);
        CHECK(json_brief(json { { "k", "a\"b\n" } }) == R"({"k":"a\"b\u000a"})");
        // A cut never splits a UTF-8 sequence.
        const std::string e = json_brief(json(std::string(200, '\xC3') + "")); // not valid UTF-8 on purpose
        CHECK(e.size() <= json_brief_length);
        std::string accents;
        for (int i = 0; i < 100; ++i)
            accents += "\xC3\xA9";
        const std::string a = json_brief(json(accents));
        const std::size_t dots = a.size() - 3;
        CHECK(a.substr(dots) == "...");
        CHECK((dots - 1) % 2 == 0); // '"' + whole two-byte characters
    }

    TEST_CASE("json_integer: type, integral value and range, with the value in the message [io][json]")
    {
        auto get = [](const json& v) { return json_integer<int>(v, 1, 1 << 20, "config.json", "hidden_size"); };
        CHECK(get(json(64)) == 64);
        CHECK(get(json(64u)) == 64);
        CHECK(get(json(64.0)) == 64); // some writers store integers as floats
        CHECK(get(json(1 << 20)) == (1 << 20));
        const auto bad = [&](const json& v, std::string_view shown) {
            check_error([&] { (void)get(v); },
                { "config.json: field 'hidden_size' must be an integer in [1, 1048576], got ", shown });
        };
        bad(json::parse("1e300"), "number 1e+300");
        bad(json(2.5), "number 2.5");
        bad(json("8"), "string \"8\"");
        bad(json(true), "boolean true");
        bad(json(nullptr), "null");
        bad(json(std::uint64_t(1) << 32), "number 4294967296");
        bad(json(std::uint64_t(-1)), "number 18446744073709551615");
        bad(json(-1), "number -1");
        bad(json(0), "number 0");
        bad(json((1 << 20) + 1), "number 1048577");
        bad(json::array({ 1 }), "array [1]");
        bad(json(std::nan("")), "number null"); // nlohmann prints NaN as null
        bad(json(1e19), "number 1e+19");
        // int64 fields: the edges of the range convert exactly.
        CHECK(json_integer<std::int64_t>(json(INT64_MAX), 0, INT64_MAX, "f", "x") == INT64_MAX);
        CHECK_FALSE(json_int_in(json(0x1p63), INT64_MIN, INT64_MAX).has_value());
        CHECK(json_int_in(json(-0x1p63), INT64_MIN, INT64_MAX) == INT64_MIN);
    }

    TEST_CASE("read_file_checked: regular files only, clear errors naming the path [io][json]")
    {
        const temp_dir dir;
        write_file(dir / "ok.json", "{\"a\": 1}");
        CHECK(read_json_file(dir / "ok.json", "config")["a"] == 1);

        check_error([&] { (void)read_file_checked(dir / "none.json", "config file"); },
            { (dir / "none.json").string(), "cannot open config file: no such file or directory" });
        check_error([&] { (void)read_file_checked(dir.path, "config file"); },
            { dir.path.string(), "cannot open config file: it is a directory, not a regular file" });

        // A FIFO: must not block (nothing writes to it) and says what it is.
        const auto fifo = dir / "fifo.json";
        REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
        check_error([&] { (void)read_file_checked(fifo, "tokenizer file"); },
            { fifo.string(), "it is a FIFO (named pipe), not a regular file" });

        // A symlink loop: "symlink loop", not "not found".
        std::filesystem::create_symlink(dir / "loop_b", dir / "loop_a");
        std::filesystem::create_symlink(dir / "loop_a", dir / "loop_b");
        check_error([&] { (void)read_file_checked(dir / "loop_a", "config file"); },
            { (dir / "loop_a").string(), "symlink loop" });

        // A symlink to a regular file is followed.
        std::filesystem::create_symlink(dir / "ok.json", dir / "link.json");
        CHECK(read_file_checked(dir / "link.json", "config file") == "{\"a\": 1}");

        // A character device.
        check_error(
            [&] { (void)read_file_checked("/dev/null", "config file"); }, { "/dev/null", "it is a character device" });

        // Size limit, before anything is read.
        write_file(dir / "big.json", std::string(100, ' '));
        check_error([&] { (void)read_file_checked(dir / "big.json", "config file", 99); },
            { (dir / "big.json").string(), "100 bytes, larger than the limit of 99" });
        CHECK(read_file_checked(dir / "big.json", "config file", 100).size() == 100);

        // Permission denied (root reads everything, so only checked as a user).
        write_file(dir / "secret.json", "{}");
        std::filesystem::permissions(dir / "secret.json", std::filesystem::perms::none);
        if (::geteuid() != 0)
            check_error([&] { (void)read_file_checked(dir / "secret.json", "config file"); },
                { (dir / "secret.json").string(), "permission denied" });

        // A path through a regular file.
        check_error([&] { (void)read_file_checked(dir / "ok.json" / "x", "config file"); }, { "not a directory" });
    }
}

#include <kdial/io/safetensors.hpp>

TEST_SUITE("io/json")
{
    TEST_CASE("checkpoint files through the same open: symlink loop, FIFO, deep index [io][json]")
    {
        const temp_dir dir;
        // A looping model.safetensors is opened (and named), not reported as missing.
        std::filesystem::create_symlink(dir / "model.safetensors", dir / "model.safetensors");
        check_error([&] { (void)safetensors_checkpoint::open(dir.path); },
            { (dir / "model.safetensors").string(), "symlink loop" });
        std::filesystem::remove(dir / "model.safetensors");
        REQUIRE(::mkfifo((dir / "model.safetensors.index.json").c_str(), 0600) == 0);
        check_error([&] { (void)safetensors_checkpoint::open(dir.path); },
            { (dir / "model.safetensors.index.json").string(), "FIFO" });
        std::filesystem::remove(dir / "model.safetensors.index.json");
        write_file(dir / "model.safetensors.index.json", "{\"weight_map\": " + nested(100'000) + "}");
        check_error([&] { (void)safetensors_checkpoint::open(dir.path); },
            { (dir / "model.safetensors.index.json").string(), "index nests deeper than 64 levels" });
        // A shard that loops.
        write_file(dir / "model.safetensors.index.json", R"({"weight_map": {"w": "a.safetensors"}})");
        std::filesystem::create_symlink(dir / "a.safetensors", dir / "a.safetensors");
        check_error([&] { (void)safetensors_checkpoint::open(dir.path); },
            { (dir / "a.safetensors").string(), "symlink loop" });
    }
}
