// GGUF reader and writer: a round trip of every metadata value type and of
// tensors of several types, and a catalogue of bad files, each refused with
// a kdial::error naming the file and the key or tensor.
#include <doctest/doctest.h>
#include <kdial/io/gguf.hpp>
#include <kdial/io/gguf_writer.hpp>

#include "io_test_util.hpp"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace kdial::io;
using kdial::test::check_error;

// Raw little-endian byte building for hand-made (bad) files.
struct raw {
    std::vector<std::byte> b;
    template <class T> raw& put(T x)
    {
        const auto* p = reinterpret_cast<const std::byte*>(&x);
        b.insert(b.end(), p, p + sizeof(T));
        return *this;
    }
    raw& str(std::string_view s)
    {
        put<std::uint64_t>(s.size());
        for (char c : s)
            b.push_back(std::byte(c));
        return *this;
    }
    raw& header(std::uint64_t n_tensors, std::uint64_t n_kv, std::uint32_t version = 3)
    {
        b.insert(b.end(), { std::byte('G'), std::byte('G'), std::byte('U'), std::byte('F') });
        return put(version).put(n_tensors).put(n_kv);
    }
    raw& pad(std::size_t a)
    {
        b.resize((b.size() + a - 1) / a * a, std::byte { 0 });
        return *this;
    }
};

gguf_file parse(const std::vector<std::byte>& b)
{
    return gguf_file::from_memory(b, "bad.gguf");
}

} // namespace

TEST_CASE("gguf: every metadata value type round-trips through the writer [io][gguf]")
{
    const std::vector<std::int32_t> ints { -5, 0, 7, 2147483647 };
    const std::vector<float> floats { 1.5f, -0.25f, 3e38f };
    const std::vector<std::uint8_t> bools { 1, 0, 1 };
    gguf_metadata_list md;
    md.emplace_back("general.architecture", gguf_out_value::string("olmoe"));
    md.emplace_back("t.u8", gguf_out_value::u8(250));
    md.emplace_back("t.i8", gguf_out_value::i8(-100));
    md.emplace_back("t.u16", gguf_out_value::u16(65000));
    md.emplace_back("t.i16", gguf_out_value::i16(-30000));
    md.emplace_back("t.u32", gguf_out_value::u32(4000000000u));
    md.emplace_back("t.i32", gguf_out_value::i32(-2000000000));
    md.emplace_back("t.u64", gguf_out_value::u64(18000000000000000000ull));
    md.emplace_back("t.i64", gguf_out_value::i64(-9000000000000000000ll));
    md.emplace_back("t.f32", gguf_out_value::f32(0.1f));
    md.emplace_back("t.f64", gguf_out_value::f64(0.1));
    md.emplace_back("t.bool", gguf_out_value::boolean(true));
    md.emplace_back("t.str", gguf_out_value::string(std::string("h\xc3\xa9llo\0x", 8)));
    md.emplace_back("t.ints", gguf_out_value::array(gguf_type::i32, std::span<const std::int32_t>(ints)));
    md.emplace_back("t.floats", gguf_out_value::array(gguf_type::f32, std::span<const float>(floats)));
    md.emplace_back("t.bools", gguf_out_value::array(gguf_type::boolean, std::span<const std::uint8_t>(bools)));
    md.emplace_back("t.strs", gguf_out_value::string_array({ "a", "", "Ġthe" }));
    md.emplace_back("t.nested",
        gguf_out_value::array_of_arrays({ gguf_out_value::string_array({ "x", "y" }), gguf_out_value::string_array({}),
            gguf_out_value::array(gguf_type::i32, std::span<const std::int32_t>(ints)) }));
    md.emplace_back("general.alignment", gguf_out_value::u32(64));

    const std::vector<float> w { 1, 2, 3, 4, 5, 6 };
    std::vector<std::byte> q8(34 * 2);
    for (std::size_t i = 0; i < q8.size(); ++i)
        q8[i] = std::byte(i * 7);
    const std::vector<gguf_out_tensor> ts { { "a.weight", ggml_type::f32, { 3, 2 }, std::as_bytes(std::span(w)), {} },
        { "b.weight", ggml_type::q8_0, { 32, 2 }, q8, {} } };
    const auto img = encode_gguf(md, ts);
    const auto f = parse(img);
    CHECK(f.version() == 3);
    CHECK(f.alignment() == 64);
    CHECK(f.metadata().size() == md.size());
    CHECK(f.get_string("general.architecture") == "olmoe");
    CHECK(f.value("t.u8").as_uint() == 250);
    CHECK(f.value("t.i8").as_int() == -100);
    CHECK(f.value("t.u16").as_uint() == 65000);
    CHECK(f.value("t.i16").as_int() == -30000);
    CHECK(f.value("t.u32").as_uint() == 4000000000u);
    CHECK(f.value("t.i32").as_int() == -2000000000);
    CHECK(f.value("t.u64").as_uint() == 18000000000000000000ull);
    CHECK_FALSE(f.value("t.u64").as_int().has_value());
    CHECK(f.value("t.i64").as_int() == -9000000000000000000ll);
    CHECK(f.get_float("t.f32") == double(0.1f));
    CHECK(f.get_float("t.f64") == 0.1);
    CHECK(f.get_bool("t.bool"));
    CHECK(f.get_string("t.str") == std::string_view("h\xc3\xa9llo\0x", 8));
    const auto& ia = f.value("t.ints");
    REQUIRE(ia.count == ints.size());
    for (std::size_t i = 0; i < ints.size(); ++i)
        CHECK(ia.int_at(i) == ints[i]);
    CHECK_FALSE(ia.int_at(ints.size()).has_value());
    const auto& fa = f.value("t.floats");
    for (std::size_t i = 0; i < floats.size(); ++i)
        CHECK(fa.float_at(i) == double(floats[i]));
    CHECK(f.value("t.bools").int_at(0) == std::nullopt); // bool arrays are not integers
    CHECK(f.value("t.bools").data.size() == 3);
    const auto strs = f.get_strings("t.strs");
    REQUIRE(strs.size() == 3);
    CHECK(strs[0] == "a");
    CHECK(strs[1].empty());
    CHECK(strs[2] == "Ġthe");
    const auto& nested = f.value("t.nested");
    REQUIRE(nested.arrays.size() == 3);
    CHECK(nested.arrays[0].strings.size() == 2);
    CHECK(nested.arrays[0].strings[1] == "y");
    CHECK(nested.arrays[1].count == 0);
    CHECK(nested.arrays[2].int_at(3) == 2147483647);

    REQUIRE(f.size() == 2);
    const auto& a = f.info("a.weight");
    CHECK(a.shape == std::vector<std::size_t> { 2, 3 });
    CHECK(a.rows() == 2);
    CHECK(a.cols() == 3);
    CHECK(a.offset % 64 == 0);
    CHECK(std::size_t(a.bytes.data() - img.data()) % 64 == 0);
    CHECK(f.read_floats("a.weight") == w);
    const auto& b = f.info("b.weight");
    CHECK(b.type == ggml_type::q8_0);
    CHECK(b.bytes.size() == 68);
    CHECK(std::memcmp(b.bytes.data(), q8.data(), 68) == 0);

    // Typed getters name the key and the type found.
    check_error([&] { (void)f.get_string("t.u8"); }, { "bad.gguf", "'t.u8'", "uint8 250", "expected a string" });
    check_error([&] { (void)f.get_int("t.i32", 0, 10); }, { "'t.i32'", "-2000000000", "outside [0, 10]" });
    check_error([&] { (void)f.get_float("t.i32"); }, { "'t.i32'", "expected a float" });
    check_error([&] { (void)f.value("nope"); }, { "bad.gguf", "no metadata key 'nope'" });
    check_error([&] { (void)f.info("nope"); }, { "bad.gguf", "no tensor 'nope'" });
}

TEST_CASE("gguf: write_gguf writes a file that opens mapped [io][gguf]")
{
    kdial::test::temp_dir d;
    const std::vector<kdial::bf16> w { kdial::bf16::from_float(1.0f), kdial::bf16::from_float(-2.0f) };
    const std::vector<gguf_out_tensor> ts { { "x", ggml_type::bf16, { 2 }, std::as_bytes(std::span(w)), {} },
        { "e", ggml_type::f32, { 0, 4 }, {}, {} } };
    write_gguf(d / "m.gguf", { { "k", gguf_out_value::i32(3) } }, ts);
    CHECK(looks_like_gguf(d / "m.gguf"));
    const auto f = gguf_file::open(d / "m.gguf");
    CHECK(f.read_floats("x") == std::vector<float> { 1.0f, -2.0f });
    CHECK(f.info("e").numel() == 0);
    CHECK(f.get_int("k", 0, 5) == 3);
    CHECK_FALSE(std::filesystem::exists(d / "m.gguf.partial"));
    // The writer refuses bad input before writing anything.
    const std::vector<gguf_out_tensor> bad { { "x", ggml_type::f32, { 3 }, std::as_bytes(std::span(w)), {} } };
    check_error([&] { write_gguf(d / "b.gguf", {}, bad); }, { "b.gguf", "tensor 'x'", "4 bytes given", "needs 12" });
    const std::vector<gguf_out_tensor> dup { ts[0], ts[0] };
    check_error([&] { write_gguf(d / "b.gguf", {}, dup); }, { "tensor 'x' given twice" });
    CHECK_FALSE(std::filesystem::exists(d / "b.gguf"));
}

TEST_CASE("gguf: bad files are refused with a clear error [io][gguf]")
{
    SUBCASE("wrong magic, short file, versions")
    {
        check_error([] { parse({ std::byte('G'), std::byte('G') }); }, { "bad.gguf", "not a GGUF file" });
        raw r;
        r.b = { std::byte('G'), std::byte('G'), std::byte('M'), std::byte('L'), std::byte(0) };
        check_error([&] { parse(r.b); }, { "bad.gguf", "magic is \"GGML\"" });
        check_error([] { parse(raw().header(0, 0, 1).b); }, { "version 1 is not supported" });
        check_error([] { parse(raw().header(0, 0, 7).b); }, { "unsupported GGUF version 7" });
        check_error([] { parse(raw().header(0, 0, 0x03000000u).b); }, { "big-endian" });
        CHECK(parse(raw().header(0, 0, 2).b).version() == 2);
        CHECK(parse(raw().header(0, 0, 3).b).size() == 0);
    }
    SUBCASE("truncated header and truncated values")
    {
        raw r = raw().header(0, 0);
        r.b.resize(r.b.size() - 3);
        check_error([&] { parse(r.b); }, { "bad.gguf", "metadata count", "truncated" });
        raw s = raw().header(0, 1).str("general.name").put<std::uint32_t>(8).put<std::uint64_t>(10);
        check_error([&] { parse(s.b); }, { "metadata key 'general.name'", "string length 10", "longer than" });
        raw t = raw().header(0, 1).str("k").put<std::uint32_t>(4).put<std::uint16_t>(1);
        check_error([&] { parse(t.b); }, { "metadata key 'k'", "needs 4 bytes", "truncated" });
    }
    SUBCASE("huge counts are refused before anything is allocated")
    {
        check_error([] { parse(raw().header(0, ~0ull).b); }, { "metadata count 18446744073709551615", "cannot fit" });
        check_error([] { parse(raw().header(1ull << 60, 0).b); }, { "tensor count", "cannot fit" });
        raw a = raw()
                    .header(0, 1)
                    .str("tokenizer.ggml.tokens")
                    .put<std::uint32_t>(9)
                    .put<std::uint32_t>(8)
                    .put<std::uint64_t>(1ull << 62);
        check_error([&] { parse(a.b); }, { "'tokenizer.ggml.tokens'", "array of 4611686018427387904 string", "only" });
        raw n = raw().header(0, 1).str("k").put<std::uint32_t>(9).put<std::uint32_t>(4).put<std::uint64_t>(~0ull);
        check_error([&] { parse(n.b); }, { "'k'", "array of 18446744073709551615 uint32", "2^64" });
        raw s = raw()
                    .header(0, 1)
                    .str("k")
                    .put<std::uint32_t>(9)
                    .put<std::uint32_t>(8)
                    .put<std::uint64_t>(1)
                    .put<std::uint64_t>(~0ull);
        check_error([&] { parse(s.b); }, { "'k'", "string length 18446744073709551615" });
    }
    SUBCASE("arrays longer than the file, unknown and bad values")
    {
        raw a = raw()
                    .header(0, 1)
                    .str("k")
                    .put<std::uint32_t>(9)
                    .put<std::uint32_t>(5)
                    .put<std::uint64_t>(3)
                    .put<std::int32_t>(1);
        check_error([&] { parse(a.b); }, { "'k'", "array of 3 int32", "only 4 left" });
        check_error([] { parse(raw().header(0, 1).str("k").put<std::uint32_t>(13).put<std::uint32_t>(0).b); },
            { "'k'", "unknown value type 13" });
        check_error(
            [] {
                parse(raw().header(0, 1).str("k").put<std::uint32_t>(9).put<std::uint32_t>(77).put<std::uint64_t>(0).b);
            },
            { "'k'", "unknown array element type 77" });
        check_error([] { parse(raw().header(0, 1).str("k").put<std::uint32_t>(7).put<std::uint8_t>(2).b); },
            { "'k'", "bool value 2" });
        raw deep = raw().header(0, 1).str("k").put<std::uint32_t>(9);
        for (int i = 0; i < 12; ++i)
            deep.put<std::uint32_t>(9).put<std::uint64_t>(1);
        deep.b.resize(deep.b.size() + 64);
        check_error([&] { parse(deep.b); }, { "'k'", "nested deeper" });
        raw al = raw().header(0, 1).str("general.alignment").put<std::uint32_t>(4).put<std::uint32_t>(48);
        check_error([&] { parse(al.b); }, { "general.alignment", "48 is not a power of two" });
        raw al2 = raw().header(0, 1).str("general.alignment").put<std::uint32_t>(5).put<std::int32_t>(32);
        check_error([&] { parse(al2.b); }, { "general.alignment", "int32 32", "expected uint32" });
    }
    SUBCASE("duplicate keys and tensor names")
    {
        raw d = raw()
                    .header(0, 2)
                    .str("k")
                    .put<std::uint32_t>(0)
                    .put<std::uint8_t>(1)
                    .str("k")
                    .put<std::uint32_t>(0)
                    .put<std::uint8_t>(2);
        check_error([&] { parse(d.b); }, { "bad.gguf", "metadata key 'k'", "duplicate key" });
        raw t = raw().header(2, 0);
        for (int i = 0; i < 2; ++i)
            t.str("w").put<std::uint32_t>(1).put<std::uint64_t>(4).put<std::uint32_t>(0).put<std::uint64_t>(i * 32);
        t.pad(32).b.resize(t.b.size() + 64);
        check_error([&] { parse(t.b); }, { "tensor 'w'", "duplicate tensor name" });
    }
    SUBCASE("tensor infos: dims, types, blocks, offsets")
    {
        auto one = [](std::uint32_t ndims, std::vector<std::uint64_t> ne, std::uint32_t type, std::uint64_t off,
                       std::size_t data) {
            raw r = raw().header(1, 0).str("blk.0.attn_q.weight").put(ndims);
            for (auto n : ne)
                r.put(n);
            r.put(type).put(off).pad(32);
            r.b.resize(r.b.size() + data);
            return r.b;
        };
        check_error([&] { parse(one(5, { 1, 1, 1, 1, 1 }, 0, 0, 32)); }, { "'blk.0.attn_q.weight'", "5 dims" });
        check_error([&] { parse(one(0, {}, 0, 0, 32)); }, { "'blk.0.attn_q.weight'", "0 dims" });
        check_error([&] { parse(one(1, { 4 }, 4, 0, 32)); }, { "'blk.0.attn_q.weight'", "unknown tensor type id 4" });
        check_error([&] { parse(one(1, { 4 }, 99, 0, 32)); }, { "unknown tensor type id 99" });
        check_error(
            [&] {
                parse(one(2, { 40, 2 }, 8, 0, 128));
            },
            { "'blk.0.attn_q.weight'", "ne[0] = 40", "Q8_0's block of 32" });
        check_error([&] { parse(one(2, { 1ull << 63, 2 }, 0, 0, 32)); }, { "ne[0]", "is negative" });
        check_error([&] { parse(one(4, { 1ull << 40, 1ull << 40, 1, 1 }, 0, 0, 32)); }, { "overflow" });
        check_error([&] { parse(one(1, { 8 }, 0, 16, 64)); }, { "offset 16", "not a multiple of the alignment 32" });
        check_error(
            [&] { parse(one(1, { 8 }, 0, 32, 48)); }, { "'blk.0.attn_q.weight'", "runs past the data section" });
        check_error([&] { parse(one(2, { 4096, 4096 }, 30, 0, 64)); }, { "33554432 bytes", "runs past" });
        CHECK(parse(one(1, { 8 }, 0, 32, 64)).info("blk.0.attn_q.weight").bytes.size() == 32);
        // Tensor infos but the data section starts past the end.
        raw t = raw()
                    .header(1, 0)
                    .str("w")
                    .put<std::uint32_t>(1)
                    .put<std::uint64_t>(0)
                    .put<std::uint32_t>(0)
                    .put<std::uint64_t>(0);
        check_error([&] { parse(t.b); }, { "data section would start at offset 64", "past the end" });
    }
    SUBCASE("overlapping tensors")
    {
        raw r = raw().header(3, 0);
        r.str("a").put<std::uint32_t>(1).put<std::uint64_t>(32).put<std::uint32_t>(0).put<std::uint64_t>(0);
        r.str("b").put<std::uint32_t>(1).put<std::uint64_t>(0).put<std::uint32_t>(0).put<std::uint64_t>(32);
        r.str("c").put<std::uint32_t>(1).put<std::uint64_t>(8).put<std::uint32_t>(0).put<std::uint64_t>(64);
        r.pad(32).b.resize(r.b.size() + 128);
        check_error([&] { parse(r.b); }, { "tensor 'c'", "overlaps tensor 'a'" });
    }
    SUBCASE("reading floats of a type that has no float reader")
    {
        std::vector<std::byte> q4(18), q2(84);
        const std::vector<gguf_out_tensor> ts { { "q", ggml_type::q4_0, { 32 }, q4, {} },
            { "k", ggml_type::q2_k, { 256 }, q2, {} } };
        const auto img = encode_gguf({}, ts);
        const auto f = parse(img);
        CHECK(f.info("q").traits.name == "Q4_0");
        CHECK(f.read_floats("q") == std::vector<float>(32, 0.0f)); // a block of scale 0
        check_error(
            [&] { (void)f.read_floats("k"); }, { "tensor 'k'", "type Q2_K", "Q8_0, Q4_0, Q4_K, Q5_K and Q6_K" });
    }
}

TEST_CASE("gguf: type table [io][gguf]")
{
    // Block sizes and bytes per block of the types kdial reads or names.
    CHECK(ggml_type_info(0)->bytes == 4);
    CHECK(ggml_type_info(1)->bytes == 2);
    CHECK(ggml_type_info(2)->block == 32);
    CHECK(ggml_type_info(2)->bytes == 18);
    CHECK(ggml_type_info(8)->bytes == sizeof(kdial::q8_block));
    CHECK(ggml_type_info(12)->block == 256);
    CHECK(ggml_type_info(12)->bytes == 144);
    CHECK(ggml_type_info(13)->bytes == 176);
    CHECK(ggml_type_info(14)->bytes == 210);
    CHECK(ggml_type_info(30)->name == "BF16");
    for (std::uint32_t id : { 4u, 5u, 31u, 32u, 33u, 36u, 37u, 38u, 40u, 1000u })
        CHECK_FALSE(ggml_type_info(id).has_value());
}
