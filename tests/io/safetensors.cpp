// safetensors: round trips through the writer, F16 conversion, checkpoints
// (single file and sharded), and every malformed input the reader must reject
// with a message naming the file, the tensor and the value.
#include <doctest/doctest.h>
#include <kdial/io/safetensors.hpp>
#include <kdial/io/safetensors_writer.hpp>

#include "io/io_test_util.hpp"

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using namespace kdial;
using namespace kdial::io;
using kdial::test::check_error;
using kdial::test::temp_dir;
using kdial::test::write_file;

namespace {

// A raw file image: 8-byte length, the header text as given (no padding),
// then `data_bytes` bytes 0, 1, 2, ...
std::vector<std::byte> raw_st(std::string_view header, std::size_t data_bytes)
{
    std::vector<std::byte> out(8 + header.size() + data_bytes);
    const std::uint64_t n = header.size();
    for (int i = 0; i < 8; ++i)
        out[static_cast<std::size_t>(i)] = static_cast<std::byte>((n >> (8 * i)) & 0xff);
    std::memcpy(out.data() + 8, header.data(), header.size());
    for (std::size_t i = 0; i < data_bytes; ++i)
        out[8 + header.size() + i] = static_cast<std::byte>(i & 0xff);
    return out;
}

std::vector<std::uint16_t> half_bits(std::initializer_list<std::uint16_t> v)
{
    return v;
}

struct sample {
    std::vector<float> f32 = { 1.0f, -2.5f, 3.25f, 0.0f, -0.0f, 1e-30f }; // [2, 3]
    std::vector<bf16> b16; // [4]
    std::vector<std::uint16_t> f16 = half_bits({ 0x3c00, 0xc000, 0x7bff, 0x0001, 0x03ff, 0x7c00, 0xfc00, 0x8000 });
    std::vector<std::int32_t> i32 = { 7, -7, 1 << 30 };
    sample()
    {
        for (float x : { 1.0f, -0.5f, 3.0e38f, std::numeric_limits<float>::infinity() })
            b16.push_back(bf16::from_float(x));
    }
    std::vector<tensor_data> tensors() const
    {
        return { make_tensor("layer.0.w", { 2, 3 }, std::span<const float>(f32)),
            make_tensor("emb", { 4 }, std::span<const bf16>(b16)),
            { "half", st_dtype::f16, { 8 }, std::as_bytes(std::span<const std::uint16_t>(f16)) },
            { "ints", st_dtype::i32, { 3 }, std::as_bytes(std::span<const std::int32_t>(i32)) },
            { "scalar", st_dtype::f32, {}, std::as_bytes(std::span<const float>(f32).first(1)) },
            { "empty", st_dtype::f32, { 0, 5 }, {} } };
    }
};

} // namespace

TEST_SUITE("io")
{

    TEST_CASE("half_to_float: specials, subnormals and every bit pattern [io][safetensors]")
    {
        CHECK(half_to_float(0x3c00) == 1.0f);
        CHECK(half_to_float(0xc000) == -2.0f);
        CHECK(half_to_float(0x7bff) == 65504.0f);
        CHECK(half_to_float(0x0400) == 0x1p-14f); // smallest normal
        CHECK(half_to_float(0x0001) == 0x1p-24f); // smallest subnormal
        CHECK(half_to_float(0x03ff) == 1023.0f * 0x1p-24f); // largest subnormal
        CHECK(half_to_float(0x8001) == -0x1p-24f);
        CHECK(std::bit_cast<std::uint32_t>(half_to_float(0x0000)) == 0x00000000u);
        CHECK(std::bit_cast<std::uint32_t>(half_to_float(0x8000)) == 0x80000000u);
        CHECK(half_to_float(0x7c00) == std::numeric_limits<float>::infinity());
        CHECK(half_to_float(0xfc00) == -std::numeric_limits<float>::infinity());
        CHECK(std::isnan(half_to_float(0x7e00)));
        CHECK(std::isnan(half_to_float(0x7c01)));
        CHECK(std::isnan(half_to_float(0xfe00)));
        // Every pattern against an independent formula: (-1)^s * 2^(e-15) * (1 + m/1024), or the subnormal form.
        for (std::uint32_t h = 0; h < 0x10000u; ++h) {
            const float got = half_to_float(static_cast<std::uint16_t>(h));
            const int e = static_cast<int>((h >> 10) & 0x1f);
            const int m = static_cast<int>(h & 0x3ff);
            const float sign = (h & 0x8000u) ? -1.0f : 1.0f;
            if (e == 31) {
                CHECK((m == 0 ? std::isinf(got) : std::isnan(got)));
                continue;
            }
            const double want = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, e - 25);
            if (static_cast<float>(sign * want) != got) {
                FAIL_CHECK("half 0x" << std::hex << h << " -> " << got << ", want " << sign * want);
                break;
            }
        }
// _Float16 in C++: GCC 12 on x86 only (aarch64 from GCC 13), clang.
#if defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__i386__) || defined(__clang__) || __GNUC__ >= 13)
        for (std::uint32_t h = 0; h < 0x10000u; ++h) {
            const auto x = std::bit_cast<_Float16>(static_cast<std::uint16_t>(h));
            const float want = static_cast<float>(x);
            const float got = half_to_float(static_cast<std::uint16_t>(h));
            if (!(std::isnan(want) ? std::isnan(got)
                                   : std::bit_cast<std::uint32_t>(want) == std::bit_cast<std::uint32_t>(got))) {
                FAIL_CHECK("half 0x" << std::hex << h << " differs from _Float16");
                break;
            }
        }
#endif
    }

    TEST_CASE("dtype strings: every name parses back, unknown strings do not [io][safetensors]")
    {
        for (int i = 0; i <= static_cast<int>(st_dtype::u64); ++i) {
            const auto t = static_cast<st_dtype>(i);
            CHECK(parse_st_dtype(st_dtype_name(t)) == t);
            CHECK(st_dtype_size(t) >= 1);
        }
        CHECK_FALSE(parse_st_dtype("F7").has_value());
        CHECK_FALSE(parse_st_dtype("f32").has_value());
        CHECK_FALSE(parse_st_dtype("").has_value());
        CHECK(weight_dtype(st_dtype::bf16) == kdial::dtype::bf16);
        CHECK_FALSE(weight_dtype(st_dtype::f16).has_value());
    }

    TEST_CASE("write then read: f32, bf16, f16, i32, scalar and empty tensors, metadata [io][safetensors]")
    {
        temp_dir dir;
        const sample s;
        const auto path = dir / "model.safetensors";
        write_safetensors(path, s.tensors(), { { "format", "pt" }, { "note", "kdial test" } });
        CHECK_FALSE(std::filesystem::exists(dir / "model.safetensors.partial"));

        const auto f = safetensors_file::open(path);
        CHECK(f.name() == path.string());
        CHECK(f.size() == 6);
        const std::vector<std::string_view> want_names = { "emb", "empty", "half", "ints", "layer.0.w", "scalar" };
        CHECK(f.names() == want_names);
        CHECK(f.metadata().at("format") == "pt");
        CHECK(f.metadata().at("note") == "kdial test");
        CHECK(f.has("emb"));
        CHECK_FALSE(f.has("nope"));
        CHECK(f.find("nope") == nullptr);

        // Layout of the reference writer: N % 8 == 0 and each tensor aligned to its element size.
        CHECK(f.header().header_size % 8 == 0);
        CHECK(f.header().data_offset % 8 == 0);
        for (const auto& t : f.tensors()) {
            CHECK(t.begin % st_dtype_size(t.dtype) == 0);
            CHECK(t.bytes.size() == t.numel() * st_dtype_size(t.dtype));
            CHECK(t.bytes.data() == f.bytes().data() + f.header().data_offset + t.begin);
        }
        // Header text: sorted keys, padded with spaces.
        const std::string_view text(reinterpret_cast<const char*>(f.bytes().data()) + 8, f.header().header_size);
        CHECK(text.find("\"__metadata__\"") < text.find("\"emb\""));
        CHECK(text.find("\"emb\"") < text.find("\"layer.0.w\""));
        CHECK(text.find_last_not_of(' ') == text.find_last_of('}'));

        const auto& w = f.expect("layer.0.w", { 2, 3 });
        CHECK(w.dtype == st_dtype::f32);
        CHECK(w.rank() == 2);
        const auto wv = f.view<float>("layer.0.w");
        CHECK(std::vector<float>(wv.begin(), wv.end()) == s.f32);
        const auto wm = f.matrix<float>("layer.0.w");
        CHECK(wm.rows == 2);
        CHECK(wm.cols == 3);
        CHECK(wm(1, 2) == 1e-30f);
        CHECK(f.read_floats("layer.0.w") == s.f32);

        const auto ev = f.view<bf16>("emb");
        REQUIRE(ev.size() == 4);
        for (std::size_t i = 0; i < 4; ++i)
            CHECK(ev[i].bits == s.b16[i].bits);
        const auto ef = f.read_floats("emb");
        CHECK(ef[0] == 1.0f);
        CHECK(ef[1] == -0.5f);
        CHECK(ef[2] == s.b16[2].to_float());
        CHECK(std::isinf(ef[3]));

        const auto hv = f.view<std::uint16_t>("half");
        CHECK(std::vector<std::uint16_t>(hv.begin(), hv.end()) == s.f16);
        const auto hf = f.read_floats("half");
        CHECK(hf
            == std::vector<float> { 1.0f, -2.0f, 65504.0f, 0x1p-24f, 1023 * 0x1p-24f,
                std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(), -0.0f });
        CHECK(std::signbit(hf[7]));

        CHECK(f.info("ints").dtype == st_dtype::i32);
        CHECK(f.info("ints").bytes.size() == 12);
        CHECK(f.expect("scalar", {}).numel() == 1);
        CHECK(f.read_floats("scalar") == std::vector<float> { 1.0f });
        CHECK(f.expect("empty", { 0, 5 }).numel() == 0);
        CHECK(f.view<float>("empty").empty());
        CHECK(f.read_floats("empty").empty());

        // A moved file keeps its mapping and views.
        const float* before = f.view<float>("layer.0.w").data();
        auto moved = std::move(const_cast<safetensors_file&>(f));
        CHECK(moved.view<float>("layer.0.w").data() == before);
        CHECK(moved.read_floats("layer.0.w") == s.f32);

        // encode_safetensors gives the same bytes as the file.
        const auto image = encode_safetensors(s.tensors(), { { "format", "pt" }, { "note", "kdial test" } });
        CHECK(std::equal(image.begin(), image.end(), moved.bytes().begin(), moved.bytes().end()));
    }

    TEST_CASE("typed access errors name the file, tensor, dtype and shape [io][safetensors][errors]")
    {
        temp_dir dir;
        const sample s;
        const auto path = dir / "m.safetensors";
        write_safetensors(path, s.tensors());
        const auto f = safetensors_file::open(path);
        const std::string p = path.string();
        check_error([&] { (void)f.info("missing.weight"); }, { p, "'missing.weight'" });
        check_error([&] { (void)f.view<float>("emb"); }, { p, "'emb'", "BF16", "F32" });
        check_error([&] { (void)f.view<bf16>("layer.0.w"); }, { p, "'layer.0.w'", "F32", "BF16" });
        check_error([&] { (void)f.view<std::uint16_t>("emb"); }, { p, "'emb'", "F16" });
        check_error([&] { (void)f.matrix<bf16>("emb"); }, { p, "'emb'", "[4]", "2 dims" });
        check_error([&] { (void)f.read_floats("ints"); }, { p, "'ints'", "I32" });
        std::vector<float> small(5);
        check_error([&] { f.read_floats("layer.0.w", small); }, { p, "'layer.0.w'", "6 elements", "[2, 3]", "5" });
        check_error([&] { (void)f.expect("layer.0.w", { 3, 2 }); }, { p, "'layer.0.w'", "[2, 3]", "expected [3, 2]" });
        check_error([&] { (void)f.expect("layer.0.w", { 2, 3, 1 }); }, { p, "expected [2, 3, 1]" });
        check_error([&] { (void)f.expect("scalar", { 1 }); }, { p, "'scalar'", "shape []", "expected [1]" });
    }

    TEST_CASE("misaligned data: view<T> throws, read_floats copies [io][safetensors]")
    {
        // N = 29 puts the data area at file offset 37, so no tensor is 2- or 4-byte aligned.
        const std::string header
            = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1],"data_offsets":[8,10]},"c":{"dtype":"F16","shape":[1],"data_offsets":[10,12]}})";
        std::string padded = header;
        std::vector<std::byte> img;
        // Pad with spaces until 8 + N is odd.
        while ((8 + padded.size()) % 2 == 0)
            padded += ' ';
        std::vector<float> vals = { 1.5f, -3.0f };
        const std::uint16_t b = bf16::from_float(2.0f).bits, h = 0x3c00;
        img = raw_st(padded, 12);
        std::memcpy(img.data() + 8 + padded.size(), vals.data(), 8);
        std::memcpy(img.data() + 8 + padded.size() + 8, &b, 2);
        std::memcpy(img.data() + 8 + padded.size() + 10, &h, 2);
        // A buffer whose start is 8-aligned, so file offsets decide the alignment.
        std::vector<double> storage((img.size() + 7) / 8);
        auto* base = reinterpret_cast<std::byte*>(storage.data());
        std::memcpy(base, img.data(), img.size());
        const auto f = safetensors_file::from_memory({ base, img.size() }, "odd.safetensors");
        check_error([&] { (void)f.view<float>("a"); }, { "odd.safetensors", "'a'", "aligned", "read_floats" });
        check_error([&] { (void)f.view<bf16>("b"); }, { "odd.safetensors", "'b'", "aligned" });
        check_error([&] { (void)f.view<std::uint16_t>("c"); }, { "odd.safetensors", "'c'", "aligned" });
        CHECK(f.read_floats("a") == vals);
        CHECK(f.read_floats("b") == std::vector<float> { 2.0f });
        CHECK(f.read_floats("c") == std::vector<float> { 1.0f });
    }

    TEST_CASE("malformed headers are rejected with the file, tensor and value named [io][safetensors][errors]")
    {
        const char* F = "bad.safetensors";
        const auto parse = [&](std::string_view header, std::size_t data) {
            const auto img = raw_st(header, data);
            return [img, F] { (void)parse_header(img.data(), img.size(), F); };
        };
        // {e1,e2,...} (built with += : GCC 12 -Wrestrict misfires on "{" + std::string)
        const auto obj = [](const auto&... e) {
            std::string s = "{";
            ((s += e, s += ','), ...);
            s.back() = '}';
            return s;
        };
        const auto entry
            = [](std::string_view name, std::string_view dtype, std::string_view shape, std::string_view offsets) {
                  return kdial::detail::cat(
                      "\"", name, "\":{\"dtype\":", dtype, ",\"shape\":", shape, ",\"data_offsets\":", offsets, "}");
              };
        const auto one = [&](std::string_view dtype, std::string_view shape, std::string_view offsets) {
            return obj(entry("t", dtype, shape, offsets));
        };

        SUBCASE("file and header length")
        {
            const std::vector<std::byte> tiny(3);
            check_error([&] { (void)parse_header(tiny.data(), tiny.size(), F); }, { F, "3 bytes", "shorter than" });
            check_error([&] { (void)parse_header(nullptr, 0, F); }, { F, "0 bytes" });
            auto img = raw_st("{}", 0);
            img[0] = std::byte { 50 }; // N = 50 > 2 bytes present
            check_error(
                [&] { (void)parse_header(img.data(), img.size(), F); }, { F, "header length 50", "end of the file" });
            img[0] = std::byte { 0 };
            img[3] = std::byte { 0x10 }; // N = 0x10000000 = 268435456 > 100 MB
            check_error([&] { (void)parse_header(img.data(), img.size(), F); }, { F, "268435456", "limit" });
            std::vector<std::byte> huge(8, std::byte { 0xff }); // N = 2^64 - 1
            check_error([&] { (void)parse_header(huge.data(), huge.size(), F); }, { F, "18446744073709551615" });
        }
        SUBCASE("not a JSON object")
        {
            check_error(parse("", 0), { F, "does not start with '{'" });
            check_error(parse("[1,2]", 0), { F, "does not start with '{'" });
            check_error(parse(" {}", 0), { F, "does not start with '{'" });
            check_error(parse("{not json", 0), { F, "not valid JSON" });
            check_error(parse("{} x", 0), { F, "not valid JSON" });
            check_error(parse("{\"a\xff\":1}", 0), { F, "not valid JSON" }); // invalid UTF-8
            // nlohmann stops at a NUL byte, so anything after one would be ignored.
            check_error(parse(std::string_view("{}\0\0\0", 5), 0), { F, "NUL byte at header offset 2" });
            check_error(parse(std::string_view("{}\0{\"t\":5}", 10), 0), { F, "NUL byte" });
            std::string deep = "{\"t\":";
            for (int i = 0; i < 100; ++i)
                deep += "[";
            check_error(parse(deep, 0), { F, "nests deeper" });
        }
        SUBCASE("duplicate names")
        {
            const std::string h = obj(entry("a", "\"F32\"", "[1]", "[0,4]"), entry("a", "\"F32\"", "[1]", "[4,8]"));
            check_error(parse(h, 8), { F, "\"a\"", "twice" });
            check_error(parse(R"({"t":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4),
                { F, "\"dtype\"", "twice" });
            // Escapes decode to the same key.
            check_error(
                parse(
                    R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"\u0061":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                    8),
                { F, "\"a\"", "twice" });
        }
        SUBCASE("entry fields")
        {
            check_error(parse(R"({"t":5})", 0), { F, "'t'", "entry is number", "expected an object" });
            check_error(parse(R"({"t":{"shape":[1],"data_offsets":[0,4]}})", 4), { F, "'t'", "no \"dtype\"" });
            check_error(parse(R"({"t":{"dtype":"F32","data_offsets":[0,4]}})", 4), { F, "'t'", "no \"shape\"" });
            check_error(parse(R"({"t":{"dtype":"F32","shape":[1]}})", 4), { F, "'t'", "no \"data_offsets\"" });
            check_error(parse(one("4", "[1]", "[0,4]"), 4), { F, "'t'", "dtype is number 4" });
            check_error(parse(one("\"F7\"", "[1]", "[0,4]"), 4), { F, "'t'", "unknown dtype \"F7\"" });
            check_error(parse(one("\"f32\"", "[1]", "[0,4]"), 4), { F, "'t'", "unknown dtype \"f32\"" });
            check_error(parse(one("\"F32\"", "{}", "[0,4]"), 4), { F, "'t'", "shape is object" });
            check_error(parse(one("\"F32\"", "[2,-1]", "[0,4]"), 4), { F, "'t'", "shape[1] is -1" });
            check_error(parse(one("\"F32\"", "[1.5]", "[0,4]"), 4), { F, "'t'", "shape[0] is 1.5" });
            check_error(parse(one("\"F32\"", "[1.0]", "[0,4]"), 4), { F, "'t'", "shape[0] is 1.0" });
            check_error(parse(one("\"F32\"", "[\"3\"]", "[0,4]"), 4), { F, "'t'", "shape[0] is \"3\"" });
            check_error(parse(one("\"F32\"", "[null]", "[0,4]"), 4), { F, "'t'", "shape[0] is null" });
            check_error(parse(one("\"F32\"", "[99999999999999999999999]", "[0,4]"), 4), { F, "'t'", "shape[0]" });
            check_error(parse(one("\"F32\"", "[4294967296,4294967296,2]", "[0,4]"), 4),
                { F, "'t'", "overflows the element count" });
            check_error(
                parse(one("\"F32\"", "[4611686018427387904]", "[0,4]"), 4), { F, "'t'", "overflows the byte count" });
            check_error(parse(one("\"F32\"", "[1]", "4"), 4), { F, "'t'", "data_offsets is 4", "[begin, end]" });
            check_error(parse(one("\"F32\"", "[1]", "[0,4,8]"), 8), { F, "'t'", "[0,4,8]" });
            check_error(parse(one("\"F32\"", "[1]", "[0]"), 4), { F, "'t'", "[0]" });
            check_error(parse(one("\"F32\"", "[1]", "[-4,0]"), 4), { F, "'t'", "[-4,0]", "non-negative" });
            check_error(parse(one("\"F32\"", "[1]", "[0,4.0]"), 4), { F, "'t'", "non-negative" });
            check_error(parse(one("\"F32\"", "[0]", "[4,0]"), 4), { F, "'t'", "[4, 0]", "begin > end" });
            check_error(parse(one("\"F32\"", "[2]", "[0,8]"), 4), { F, "'t'", "end 8", "data area of 4 bytes" });
            check_error(parse(one("\"F32\"", "[2]", "[0,4]"), 4),
                { F, "'t'", "[0, 4)", "hold 4 bytes", "[2]", "F32", "needs 8" });
            check_error(parse(one("\"BF16\"", "[3]", "[0,4]"), 4), { F, "'t'", "BF16", "needs 6" });
        }
        SUBCASE("layout of the data area")
        {
            const std::string overlap
                = obj(entry("a", "\"F32\"", "[2]", "[0,8]"), entry("b", "\"F32\"", "[2]", "[4,12]"));
            check_error(parse(overlap, 12), { F, "'b'", "[4, 12)", "overlaps", "'a'", "[0, 8)" });
            const std::string same = obj(entry("a", "\"F32\"", "[1]", "[0,4]"), entry("b", "\"F32\"", "[1]", "[0,4]"));
            check_error(parse(same, 4), { F, "overlaps" });
            const std::string gap = obj(entry("a", "\"F32\"", "[1]", "[0,4]"), entry("b", "\"F32\"", "[1]", "[8,12]"));
            check_error(parse(gap, 12), { F, "gap of 4 bytes", "'a'", "'b'" });
            check_error(
                parse(one("\"F32\"", "[1]", "[4,8]"), 8), { F, "'t'", "begins at data offset 4", "must begin at 0" });
            check_error(
                parse(one("\"F32\"", "[1]", "[0,4]"), 6), { F, "data area is 6 bytes", "end at 4", "2 trailing" });
            check_error(parse("{}", 1), { F, "data area is 1 bytes", "1 trailing" });
            // Zero-sized tensors may sit anywhere inside the tiling, even together.
            const std::string zeros = obj(entry("a", "\"F32\"", "[1]", "[0,4]"), entry("z1", "\"F32\"", "[0]", "[4,4]"),
                entry("z2", "\"I64\"", "[3,0]", "[4,4]"), entry("z0", "\"U8\"", "[0]", "[0,0]"));
            const auto img = raw_st(zeros, 4);
            CHECK(parse_header(img.data(), img.size(), F).tensors.size() == 4);
        }
        SUBCASE("__metadata__")
        {
            check_error(parse(R"({"__metadata__":[1]})", 0), { F, "__metadata__ is array" });
            check_error(parse(R"({"__metadata__":{"format":1}})", 0), { F, "__metadata__", "\"format\"", "number 1" });
            const auto img = raw_st(R"({"__metadata__":{"format":"pt"}})", 0);
            const auto h = parse_header(img.data(), img.size(), F);
            CHECK(h.tensors.empty());
            CHECK(h.metadata.at("format") == "pt");
        }
        SUBCASE("every dtype string is accepted with its size")
        {
            for (int i = 0; i <= static_cast<int>(st_dtype::u64); ++i) {
                const auto t = static_cast<st_dtype>(i);
                const std::size_t n = 3 * st_dtype_size(t);
                const auto img = raw_st(
                    one(kdial::detail::cat("\"", st_dtype_name(t), "\""), "[3]", kdial::detail::cat("[0,", n, "]")), n);
                const auto h = parse_header(img.data(), img.size(), F);
                REQUIRE(h.tensors.size() == 1);
                CHECK(h.tensors[0].dtype == t);
            }
        }
    }

    TEST_CASE("opening files: missing, a directory, too short [io][safetensors][errors]")
    {
        temp_dir dir;
        check_error([&] { (void)safetensors_file::open(dir / "nope.safetensors"); },
            { (dir / "nope.safetensors").string(), "no such file" });
        check_error([&] { (void)safetensors_file::open(dir.path); }, { dir.path.string(), "not a regular file" });
        write_file(dir / "empty.safetensors", std::string_view());
        check_error([&] { (void)safetensors_file::open(dir / "empty.safetensors"); },
            { (dir / "empty.safetensors").string(), "0 bytes" });
        write_file(dir / "bad.safetensors",
            std::span<const std::byte>(raw_st(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4)));
        check_error([&] { (void)safetensors_file::open(dir / "bad.safetensors"); },
            { (dir / "bad.safetensors").string(), "'w'", "needs 8" });
    }

    TEST_CASE("writer rejects inconsistent tensors before writing [io][safetensors][errors]")
    {
        temp_dir dir;
        const std::vector<float> v(4);
        const auto path = dir / "w.safetensors";
        check_error(
            [&] { write_safetensors(path, std::vector { make_tensor("a", { 3 }, std::span<const float>(v)) }); },
            { path.string(), "'a'", "16 bytes", "needs 12" });
        check_error(
            [&] {
                write_safetensors(path,
                    std::vector { make_tensor("a", { 4 }, std::span<const float>(v)),
                        make_tensor("a", { 4 }, std::span<const float>(v)) });
            },
            { path.string(), "'a'", "twice" });
        check_error(
            [&] {
                write_safetensors(path, std::vector { make_tensor("__metadata__", { 4 }, std::span<const float>(v)) });
            },
            { "__metadata__" });
        check_error(
            [&] { write_safetensors(path, std::vector { make_tensor("bad\xff", { 4 }, std::span<const float>(v)) }); },
            { path.string(), "cannot encode the header" });
        check_error([&] { write_safetensors(path, {}, { { "k", "v\xfe" } }); }, { path.string(), "cannot encode" });
        CHECK_FALSE(std::filesystem::exists(path));
        CHECK_FALSE(std::filesystem::exists(dir / "w.safetensors.partial"));
        check_error([&] { write_safetensors(dir / "none" / "x.safetensors", {}); },
            { "x.safetensors.partial", "cannot create" });
    }

    TEST_CASE("checkpoint: single file, sharded with an index, lookups across shards [io][safetensors][checkpoint]")
    {
        const sample s;
        SUBCASE("single file")
        {
            temp_dir dir;
            write_safetensors(dir / "model.safetensors", s.tensors());
            for (const auto& p : { dir.path, dir / "model.safetensors" }) {
                const auto c = safetensors_checkpoint::open(p);
                CHECK(c.size() == 6);
                CHECK(c.files().size() == 1);
                CHECK(c.index_path().empty());
                CHECK_FALSE(c.total_size().has_value());
                CHECK(c.has("layer.0.w"));
                CHECK(c.read_floats("layer.0.w") == s.f32);
                CHECK(c.find("emb").file == &c.files()[0]);
                check_error([&] { (void)c.find("x"); }, { "model.safetensors", "'x'" });
            }
        }
        SUBCASE("sharded")
        {
            temp_dir dir;
            const auto ts = s.tensors();
            write_safetensors(dir / "model-00001-of-00002.safetensors", std::span(ts).first(3));
            write_safetensors(dir / "model-00002-of-00002.safetensors", std::span(ts).subspan(3));
            std::string wm;
            std::uint64_t total = 0;
            for (std::size_t i = 0; i < ts.size(); ++i) {
                wm += kdial::detail::cat(
                    i ? "," : "", "\"", ts[i].name, "\":\"model-0000", i < 3 ? 1 : 2, "-of-00002.safetensors\"");
                total += ts[i].bytes.size();
            }
            write_file(dir / "model.safetensors.index.json",
                kdial::detail::cat("{\"metadata\":{\"total_size\":", total, "},\"weight_map\":{", wm, "}}"));
            for (const auto& p : { dir.path, dir / "model.safetensors.index.json" }) {
                const auto c = safetensors_checkpoint::open(p);
                CHECK(c.size() == 6);
                CHECK(c.files().size() == 2);
                CHECK(c.index_path() == dir / "model.safetensors.index.json");
                CHECK(c.total_size() == total);
                CHECK(c.tensor_bytes() == total);
                const std::vector<std::string_view> want = { "emb", "empty", "half", "ints", "layer.0.w", "scalar" };
                CHECK(c.names() == want);
                CHECK(c.find("layer.0.w").file->name().ends_with("model-00001-of-00002.safetensors"));
                CHECK(c.find("ints").file->name().ends_with("model-00002-of-00002.safetensors"));
                CHECK(c.find("ints").info->dtype == st_dtype::i32);
                CHECK(c.read_floats("layer.0.w") == s.f32);
                CHECK(c.read_floats("half")[0] == 1.0f);
                CHECK(c.view<bf16>("emb")[1].to_float() == -0.5f);
                CHECK(c.matrix<float>("layer.0.w")(0, 1) == -2.5f);
                CHECK(c.expect("emb", { 4 }).dtype == st_dtype::bf16);
                check_error(
                    [&] {
                        (void)c.expect("emb", { 2, 2 });
                    },
                    { "model-00001-of-00002.safetensors", "'emb'", "[4]", "[2, 2]" });
                check_error([&] { (void)c.info("nope"); }, { "model.safetensors.index.json", "'nope'" });
            }
            // A single file wins over the index, as in transformers.
            write_safetensors(dir / "model.safetensors", std::span(ts).first(1));
            CHECK(safetensors_checkpoint::open(dir.path).size() == 1);
        }
    }

    TEST_CASE("checkpoint: malformed index and inconsistent shards are rejected [io][safetensors][checkpoint][errors]")
    {
        temp_dir dir;
        const std::vector<float> v = { 1, 2 };
        write_safetensors(dir / "a.safetensors", std::vector { make_tensor("x", { 2 }, std::span<const float>(v)) });
        const auto idx = dir / "model.safetensors.index.json";
        const std::string I = idx.string();
        const auto with_index = [&](std::string_view text) {
            write_file(idx, text);
            return [&] { (void)safetensors_checkpoint::open(dir.path); };
        };
        check_error(with_index("{\"weight_map\": {"), { I, "not valid JSON" });
        check_error(with_index("[]"), { I, "index is JSON array" });
        check_error(with_index("{}"), { I, "no \"weight_map\"" });
        check_error(with_index(R"({"weight_map":[]})"), { I, "weight_map is array" });
        check_error(with_index(R"({"weight_map":{"x":3}})"), { I, "'x'", "number 3" });
        check_error(with_index(R"({"weight_map":{"x":"../a.safetensors"}})"),
            { I, "'x'", "../a.safetensors", "plain file name" });
        check_error(with_index(R"({"weight_map":{"x":""}})"), { I, "'x'", "plain file name" });
        check_error(with_index(R"({"weight_map":{"x":"a.safetensors","x":"a.safetensors"}})"), { I, "\"x\"", "twice" });
        check_error(with_index(R"({"metadata":{"total_size":-1},"weight_map":{"x":"a.safetensors"}})"),
            { I, "total_size", "-1" });
        check_error(
            with_index(R"({"metadata":"big","weight_map":{"x":"a.safetensors"}})"), { I, "metadata is string" });
        check_error(with_index(R"({"weight_map":{"x":"a.safetensors","y":"b.safetensors"}})"),
            { I, "shard 'b.safetensors'", "'y'", "does not exist" });
        check_error(with_index(R"({"weight_map":{"x":"a.safetensors","y":"a.safetensors"}})"),
            { I, "'y'", "'a.safetensors'", "no such tensor" });
        // A corrupt shard names the shard.
        write_file(dir / "c.safetensors", std::string_view("\x02\0\0\0\0\0\0\0[]", 10));
        check_error(with_index(R"({"weight_map":{"x":"a.safetensors","z":"c.safetensors"}})"),
            { (dir / "c.safetensors").string(), "'{'" });
        // A float total_size that is integral is accepted; tensors a shard has beyond the map are not visible.
        write_file(idx, R"({"metadata":{"total_size":8.0},"weight_map":{"x":"a.safetensors"}})");
        const auto c = safetensors_checkpoint::open(dir.path);
        CHECK(c.total_size() == 8u);
        CHECK(c.size() == 1);
        std::filesystem::remove(idx);
        check_error([&] { (void)safetensors_checkpoint::open(dir.path); }, { dir.path.string(), "neither" });
        check_error(
            [&] { (void)safetensors_checkpoint::open(dir / "missing"); }, { (dir / "missing").string(), "no such" });
    }

} // TEST_SUITE
