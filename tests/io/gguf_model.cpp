// GGUF models end to end (examples/olmoe/gguf_*.hpp): the same synthetic
// model as a safetensors checkpoint and as a GGUF file gives the same logits
// (bit for bit for F32 / F16 / BF16, all three families, Mixtral's permuted
// Q/K rows included); Q8_0 within a bound, argmax agreement reported; the
// GGUF tokenizer encodes as tokenizer.json does; bad GGUF models are refused
// naming the tensor, key or type.
#include <doctest/doctest.h>

#include "gguf_model.hpp"
#include "gguf_synthetic.hpp"
#include "weights.hpp"

#include "../examples/model_fixture.hpp"
#include "io_test_util.hpp"
#include "test_util.hpp"

#include <kdial/io/gguf_writer.hpp>
#include <kdial/io/tokenizer.hpp>

#include <cmath>
#include <cstring>
#include <set>
#include <string>
#include <vector>

namespace {

using kdial::test::check_error;
using kdial::test::compare_logits;
using kdial::test::temp_dir;
namespace fs = std::filesystem;

const std::vector<std::int32_t> tokens { 3, 17, 42, 5, 99, 260, 7, 11, 300, 64 };

std::vector<float> logits_of(olmoe::model_weights w, std::size_t T)
{
    olmoe::model m(std::move(w), 16);
    const auto& c = m.config();
    olmoe::kv_cache cache(c, T);
    std::vector<float> out(T * std::size_t(c.vocab));
    const std::vector<int> ks(std::size_t(c.layers), c.top_k);
    m.forward(std::span<const std::int32_t>(tokens.data(), T), cache, ks,
        kdial::matrix_view<float>(out.data(), T, std::size_t(c.vocab)), true);
    return out;
}

std::vector<float> safetensors_logits(const std::string& dir)
{
    const auto c = olmoe::load_config(dir);
    olmoe::load_options o;
    o.max_chunk = 16;
    return logits_of(olmoe::load_weights(dir, c, o), tokens.size());
}

olmoe::gguf_model gguf_load(const fs::path& file, bool copy_all = false)
{
    olmoe::load_options o;
    o.max_chunk = 16;
    o.copy_all = copy_all;
    return olmoe::load_gguf_model(file.string(), o);
}

// A parsed metadata value back to a writable one (to edit a file in tests).
kdial::io::gguf_out_value to_out(const kdial::io::gguf_value& v)
{
    kdial::io::gguf_out_value o;
    o.type = v.type;
    o.bits = v.bits;
    o.str = std::string(v.str);
    o.elem = v.elem;
    o.count = v.count;
    o.data.assign(v.data.begin(), v.data.end());
    for (auto s : v.strings)
        o.strings.emplace_back(s);
    for (const auto& a : v.arrays)
        o.arrays.push_back(to_out(a));
    return o;
}

// Rewrites `src` into `dst` after `edit` changed its metadata and tensors.
template <class Edit> void rewrite(const fs::path& src, const fs::path& dst, Edit edit)
{
    const auto f = kdial::io::gguf_file::open(src);
    kdial::io::gguf_metadata_list md;
    for (const auto& k : f.header().key_order)
        md.emplace_back(k, to_out(f.value(k)));
    std::vector<kdial::io::gguf_out_tensor> ts;
    for (const auto& t : f.tensors())
        ts.push_back({ t.name, t.type, t.ne, t.bytes, {} });
    std::vector<std::vector<std::byte>> keep;
    edit(md, ts, keep);
    kdial::io::write_gguf(dst, md, ts);
}

// Keeps the first logits it is given; checks later ones equal them byte for byte.
void same_as_first(std::vector<float>& first, const std::vector<float>& got)
{
    if (first.empty())
        first = got;
    else
        CHECK(kdial::test::same_bytes(got, first));
}

// The f32 safetensors checkpoint of `preset` and its GGUF in `dtype`, both in d.
std::pair<std::string, std::string> make_pair_of(const fs::path& d, const std::string& preset, const std::string& dtype)
{
    olmoe::synthetic_options o;
    o.preset = preset;
    o.dtype = "f32";
    const std::string st = (d / (preset + "-st")).string();
    olmoe::make_synthetic(st, o);
    o.dtype = dtype;
    const std::string gg = (d / (preset + "-" + dtype)).string();
    olmoe::make_synthetic_gguf(gg, o);
    return { st, gg };
}

} // namespace

TEST_CASE("gguf model: same logits as the safetensors checkpoint of the same values [gguf][model]")
{
    temp_dir d;
    for (const std::string preset : { "tiny", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-mixtral" })
        for (const std::string dtype : { "f32", "f16", "bf16" }) {
            CAPTURE(preset);
            CAPTURE(dtype);
            olmoe::synthetic_options o;
            o.preset = preset;
            o.dtype = dtype;
            o.seed = 5;
            const std::string st = (d / (preset + "-" + dtype + "-st")).string();
            const std::string gg = (d / (preset + "-" + dtype + "-gguf")).string();
            olmoe::make_synthetic(st, o);
            olmoe::make_synthetic_gguf(gg, o);
            const auto ref = safetensors_logits(st);
            auto g = gguf_load(fs::path(gg) / "model.gguf");
            CHECK(g.cfg.fam == olmoe::load_config(st).fam);
            // The routed experts run in place in the file's format.
            const auto& L0 = g.weights.layers[0];
            REQUIRE(L0.moe.has_value());
            CHECK(kdial::dtype_name(L0.moe->experts().type()) == dtype);
            const auto got = logits_of(std::move(g.weights), tokens.size());
            REQUIRE(got.size() == ref.size());
            CHECK(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)) == 0);
        }
}

TEST_CASE("gguf model: Mixtral's attn_q / attn_k rows are stored permuted as llama.cpp stores them [gguf][model]")
{
    temp_dir d;
    olmoe::synthetic_options o;
    o.preset = "tiny-mixtral";
    o.dtype = "f32";
    olmoe::make_synthetic((d / "st").string(), o);
    olmoe::make_synthetic_gguf((d / "gg").string(), o);
    const auto c = olmoe::load_config((d / "st").string());
    const auto ck = kdial::io::safetensors_checkpoint::open(d / "st");
    const auto f = kdial::io::gguf_file::open(d / "gg" / "model.gguf");
    CHECK(f.get_string("general.architecture") == "llama");
    const std::size_t hd = std::size_t(c.head_dim), cols = std::size_t(c.hidden);
    for (const auto& [hf, gg, heads] : { std::tuple { "self_attn.q_proj.weight", "attn_q.weight", c.heads },
             std::tuple { "self_attn.k_proj.weight", "attn_k.weight", c.kv_heads } }) {
        const auto a = ck.read_floats(std::string("model.layers.1.") + hf);
        const auto b = f.read_floats(std::string("blk.1.") + gg);
        const std::size_t h = std::size_t(heads) - 1, i = 3;
        for (std::size_t j = 0; j < 2; ++j) // GGUF row h*hd + 2i + j == HF row h*hd + j*hd/2 + i
            CHECK(std::memcmp(&b[(h * hd + 2 * i + j) * cols], &a[(h * hd + j * hd / 2 + i) * cols], cols * 4) == 0);
        CHECK(std::memcmp(b.data(), a.data(), a.size() * 4) != 0);
    }
    // olmoe and qwen2moe are stored unpermuted.
    o.preset = "tiny";
    olmoe::make_synthetic((d / "st2").string(), o);
    olmoe::make_synthetic_gguf((d / "gg2").string(), o);
    const auto ck2 = kdial::io::safetensors_checkpoint::open(d / "st2");
    const auto f2 = kdial::io::gguf_file::open(d / "gg2" / "model.gguf");
    CHECK(f2.read_floats("blk.0.attn_q.weight") == ck2.read_floats("model.layers.0.self_attn.q_proj.weight"));
}

TEST_CASE("gguf model: Q8_0 logits within the quantisation bound of f32, argmax agreement [gguf][model]")
{
    temp_dir d;
    for (const std::string preset : { "tiny", "tiny-qwen2-moe" }) {
        CAPTURE(preset);
        const auto [st, gg] = make_pair_of(d.path, preset, "q8_0");
        const auto ref = safetensors_logits(st);
        auto g = gguf_load(fs::path(gg) / "model.gguf");
        CHECK(g.weights.layers[0].moe->experts().type() == kdial::dtype::q8);
        CHECK(kdial::type_of(g.weights.embed) == kdial::dtype::q8);
        const auto [worst, scale, agree]
            = compare_logits(ref, logits_of(std::move(g.weights), tokens.size()), tokens.size());
        // Q8_0 errs by at most max|w_block| / 225 per weight (kernels/quantize.hpp),
        // under 0.5% of a weight's block maximum: through a few layers the
        // logits move by a few percent of their range at most.
        MESSAGE(preset, ": Q8_0 vs f32 logits: max |diff| ", worst, " (max |logit| ", scale, "), argmax agrees at ",
            agree, " of ", tokens.size(), " positions");
        CHECK(worst <= 0.05 * scale);
        CHECK(worst > 0); // the quantisation is really there
        CHECK(agree * 10 >= tokens.size() * 8);
    }
    // Q8_0 rows are whole blocks of 32: tiny-mixtral's expert width 48 cannot be Q8_0.
    olmoe::synthetic_options o;
    o.preset = "tiny-mixtral";
    o.dtype = "q8_0";
    check_error([&] { olmoe::make_synthetic_gguf((d / "mix-q8").string(), o); },
        { "model.gguf", "tensor 'blk.0.ffn_down_exps.weight'", "ne[0] = 48", "Q8_0's block 32" });
}

TEST_CASE("gguf model: the tokenizer from GGUF metadata encodes as tokenizer.json [gguf][tokenizer]")
{
    temp_dir d;
    const std::vector<std::string> texts { "the quick brown fox jumps over the lazy dog.", "hello world! 0123 ,.;",
        "  spaces   and\ttabs\n", "caf\xc3\xa9 cafe\xcc\x81 <|endoftext|> experts", "" };
    for (const std::string preset : { "tiny", "tiny-qwen2-moe" }) {
        CAPTURE(preset);
        olmoe::synthetic_options o;
        o.preset = preset;
        o.dtype = "f32";
        const std::string st = (d / (preset + "-st")).string();
        olmoe::make_synthetic(st, o);
        olmoe::make_synthetic_gguf((d / preset).string(), o);
        const auto ref = kdial::io::bpe_tokenizer::from_file(fs::path(st) / "tokenizer.json");
        const auto f = kdial::io::gguf_file::open(d / preset / "model.gguf");
        const auto g = kdial::io::gguf_tokenizer::from_gguf(f);
        REQUIRE(g.has_value());
        CHECK(g->pre == (preset == "tiny" ? "olmo" : "qwen2"));
        CHECK_FALSE(g->add_bos);
        for (const auto& t : texts) {
            CAPTURE(t);
            const auto a = ref.encode(t), b = g->tok.encode(t);
            CHECK(a == b);
            CHECK(g->tok.decode(b) == ref.decode(a));
        }
    }
}

TEST_CASE("gguf model: bad models are refused naming the tensor, key or type [gguf][model]")
{
    temp_dir d;
    olmoe::synthetic_options o;
    o.preset = "tiny";
    o.dtype = "bf16";
    olmoe::make_synthetic_gguf((d / "ok").string(), o);
    const fs::path ok = d / "ok" / "model.gguf";
    CHECK(olmoe::is_gguf_path(ok.string()));
    CHECK_FALSE(olmoe::is_gguf_path((d / "ok").string()));
    using md_t = kdial::io::gguf_metadata_list;
    using ts_t = std::vector<kdial::io::gguf_out_tensor>;
    using keep_t = std::vector<std::vector<std::byte>>;
    const auto set_key = [](md_t& md, const std::string& k, kdial::io::gguf_out_value v) {
        for (auto& [key, val] : md)
            if (key == k) {
                val = std::move(v);
                return;
            }
        md.emplace_back(k, std::move(v));
    };
    SUBCASE("a tensor type this build does not run")
    {
        rewrite(ok, d / "q5.gguf", [](md_t&, ts_t& ts, keep_t& keep) {
            for (auto& t : ts)
                if (t.name == "blk.1.ffn_up_exps.weight") {
                    t.type = kdial::io::ggml_type::q5_0;
                    keep.emplace_back(t.ne[0] * t.ne[1] * t.ne[2] / 32 * 22);
                    t.bytes = keep.back();
                }
        });
        check_error([&] { gguf_load(d / "q5.gguf"); },
            { "q5.gguf", "tensor 'blk.1.ffn_up_exps.weight'", "type Q5_0", "ggml type id 6" });
        rewrite(ok, d / "n4.gguf", [](md_t&, ts_t& ts, keep_t& keep) {
            for (auto& t : ts)
                if (t.name == "blk.0.attn_norm.weight") {
                    t.type = kdial::io::ggml_type::q4_0;
                    t.ne = { 64 };
                    keep.emplace_back(64 / 32 * 18);
                    t.bytes = keep.back();
                }
        });
        check_error([&] { gguf_load(d / "n4.gguf"); }, { "tensor 'blk.0.attn_norm.weight'", "type Q4_0", "norms" });
    }
    SUBCASE("architecture, missing keys, bad values")
    {
        rewrite(ok, d / "a.gguf", [&](md_t& md, ts_t&, keep_t&) {
            set_key(md, "general.architecture", kdial::io::gguf_out_value::string("gpt2"));
        });
        check_error([&] { gguf_load(d / "a.gguf"); }, { "a.gguf", "general.architecture 'gpt2' is not supported" });
        rewrite(ok, d / "l.gguf", [&](md_t& md, ts_t&, keep_t&) {
            set_key(md, "general.architecture", kdial::io::gguf_out_value::string("llama"));
        });
        check_error([&] { gguf_load(d / "l.gguf"); }, { "l.gguf", "without llama.expert_count", "dense" });
        rewrite(ok, d / "m.gguf", [&](md_t& md, ts_t&, keep_t&) {
            std::erase_if(md, [](const auto& kv) { return kv.first == "olmoe.block_count"; });
        });
        check_error([&] { gguf_load(d / "m.gguf"); }, { "m.gguf", "no metadata key 'olmoe.block_count'" });
        rewrite(ok, d / "t.gguf", [&](md_t& md, ts_t&, keep_t&) {
            set_key(md, "olmoe.expert_used_count", kdial::io::gguf_out_value::string("eight"));
        });
        check_error([&] { gguf_load(d / "t.gguf"); }, { "t.gguf", "'olmoe.expert_used_count'", "expected an integer" });
        rewrite(ok, d / "k.gguf", [&](md_t& md, ts_t&, keep_t&) {
            set_key(md, "olmoe.expert_used_count", kdial::io::gguf_out_value::u32(99));
        });
        check_error([&] { gguf_load(d / "k.gguf"); }, { "k.gguf", "num_experts_per_tok", "99" });
        rewrite(ok, d / "r.gguf", [&](md_t& md, ts_t&, keep_t&) {
            set_key(md, "olmoe.rope.scaling.type", kdial::io::gguf_out_value::string("yarn"));
        });
        check_error([&] { gguf_load(d / "r.gguf"); }, { "r.gguf", "rope.scaling.type", "yarn" });
    }
    SUBCASE("tensors: missing, wrong dims, unused")
    {
        rewrite(ok, d / "n.gguf", [](md_t&, ts_t& ts, keep_t&) {
            std::erase_if(ts, [](const auto& t) { return t.name == "blk.1.attn_k.weight"; });
        });
        check_error([&] { gguf_load(d / "n.gguf"); }, { "n.gguf", "no tensor 'blk.1.attn_k.weight'" });
        rewrite(ok, d / "s.gguf", [](md_t&, ts_t& ts, keep_t&) {
            for (auto& t : ts)
                if (t.name == "blk.0.ffn_down_exps.weight")
                    std::swap(t.ne[0], t.ne[1]);
        });
        check_error(
            [&] { gguf_load(d / "s.gguf"); }, { "s.gguf", "tensor 'blk.0.ffn_down_exps.weight'", "dims [64, 32, 8]" });
        rewrite(ok, d / "u.gguf", [](md_t&, ts_t& ts, keep_t&) {
            auto t = ts.back();
            t.name = "blk.7.extra.weight";
            ts.push_back(t);
        });
        check_error([&] { gguf_load(d / "u.gguf"); }, { "u.gguf", "not used by the model", "'blk.7.extra.weight'" });
    }
    SUBCASE("a tokenizer kdial does not support leaves the model usable with token ids")
    {
        rewrite(ok, d / "sp.gguf", [&](md_t& md, ts_t&, keep_t&) {
            set_key(md, "tokenizer.ggml.model", kdial::io::gguf_out_value::string("llama"));
        });
        const auto g = gguf_load(d / "sp.gguf");
        CHECK_FALSE(g.tok.has_value());
        CHECK(g.tokenizer_error.find("'llama'") != std::string::npos);
        CHECK(g.tokenizer_error.find("SentencePiece") != std::string::npos);
        rewrite(ok, d / "pre.gguf", [&](md_t& md, ts_t&, keep_t&) {
            set_key(md, "tokenizer.ggml.pre", kdial::io::gguf_out_value::string("llama-bpe"));
        });
        CHECK(gguf_load(d / "pre.gguf").tokenizer_error.find("'llama-bpe'") != std::string::npos);
    }
}

TEST_CASE("gguf model: Q4_0 runs in place, logits near f32 [gguf][model]")
{
    temp_dir d;
    for (const std::string preset : { "tiny", "tiny-qwen2-moe" }) {
        CAPTURE(preset);
        const auto [st, gg] = make_pair_of(d.path, preset, "q4_0");
        const auto ref = safetensors_logits(st);
        auto g = gguf_load(fs::path(gg) / "model.gguf");
        CHECK(g.weights.layers[0].moe->experts().type() == kdial::dtype::q4_0);
        const auto [worst, scale, agree]
            = compare_logits(ref, logits_of(std::move(g.weights), tokens.size()), tokens.size());
        // Q4_0 steps are max|w_block| / 8 (16 levels): 16x coarser than Q8_0,
        // so the logits move by up to about a third of their range here.
        MESSAGE(preset, ": Q4_0 vs f32 logits: max |diff| ", worst, " (max |logit| ", scale, "), argmax agrees at ",
            agree, " of ", tokens.size(), " positions");
        CHECK(worst > 0);
        CHECK(worst <= 0.5 * scale);
    }
}

TEST_CASE("gguf model: K-quant matrices bind through to_weight (Q4_K in place, Q5_K / Q6_K as q8) [gguf][model]")
{
    temp_dir d;
    const std::size_t rows = 3, cols = 256;
    for (const auto type : { kdial::io::ggml_type::q4_k, kdial::io::ggml_type::q5_k, kdial::io::ggml_type::q6_k }) {
        const auto tr = *kdial::io::ggml_type_info(static_cast<std::uint32_t>(type));
        CAPTURE(tr.name);
        std::vector<std::byte> bytes(rows * tr.bytes);
        std::uint64_t x = 12345;
        for (auto& b : bytes)
            b = std::byte((x = x * 6364136223846793005ull + 1442695040888963407ull) >> 56);
        for (std::size_t r = 0; r < rows; ++r) { // finite f16 super-block scales
            std::byte* blk = bytes.data() + r * tr.bytes;
            const std::size_t at = type == kdial::io::ggml_type::q6_k ? 208 : 0;
            blk[at] = std::byte(0x00);
            blk[at + 1] = std::byte(0x2c); // 0.0625
            if (type != kdial::io::ggml_type::q6_k) {
                blk[2] = std::byte(0x00);
                blk[3] = std::byte(0x28); // dmin 0.03125
            }
        }
        const std::vector<kdial::io::gguf_out_tensor> ts { { "w", type, { cols, rows }, bytes, {} } };
        kdial::io::write_gguf(d / "k.gguf", { { "general.architecture", kdial::io::gguf_out_value::string("x") } }, ts);
        const auto f = kdial::io::gguf_file::open(d / "k.gguf");
        olmoe::gguf_detail::holder h;
        olmoe::model_weights w;
        olmoe::gguf_detail::binder b(f, h, w, olmoe::load_options {}, false);
        const auto v = b.linear("w");
        CHECK(kdial::rows_of(v) == rows);
        CHECK(kdial::cols_of(v) == cols);
        if (type == kdial::io::ggml_type::q4_k) {
            CHECK(kdial::type_of(v) == kdial::dtype::q4_k);
            CHECK(h.repacked.empty());
            CHECK(reinterpret_cast<const std::byte*>(std::get<kdial::weight_view<kdial::q4_k_t>>(v).data)
                == f.info("w").bytes.data()); // in place
            continue;
        }
        REQUIRE(kdial::type_of(v) == kdial::dtype::q8);
        CHECK(h.repacked.size() == 1);
        const auto& q = std::get<kdial::weight_view<kdial::q8_t>>(v);
        for (std::size_t r = 0; r < rows; ++r)
            for (std::size_t c = 0; c < cols; c += 37) {
                const std::byte* blk = f.info("w").bytes.data() + r * tr.bytes;
                const float exact = type == kdial::io::ggml_type::q5_k
                    ? kdial::block_value(*reinterpret_cast<const kdial::q5_k_block*>(blk), c)
                    : kdial::block_value(*reinterpret_cast<const kdial::q6_k_block*>(blk), c);
                const kdial::q8_block& qb = q.row(r)[c / 32];
                float amax = 0;
                for (std::size_t i = c / 32 * 32; i < c / 32 * 32 + 32; ++i)
                    amax = std::max(amax,
                        std::fabs(type == kdial::io::ggml_type::q5_k
                                ? kdial::block_value(*reinterpret_cast<const kdial::q5_k_block*>(blk), i)
                                : kdial::block_value(*reinterpret_cast<const kdial::q6_k_block*>(blk), i)));
                CHECK(std::fabs(qb.scale() * float(qb.q[c % 32]) - exact) <= amax / 225 + 0x1p-18f);
            }
    }
}

TEST_CASE("gguf model: an expert set whose tensors differ in type runs as q8 [gguf][model]")
{
    // A Q8_0 model whose layer-0 ffn_down_exps is stored as F32 (its exact
    // Q8_0 values): the layer's experts are requantised to q8 at load, which
    // gives back the same blocks, so the logits equal the pure Q8_0 file's.
    temp_dir d;
    olmoe::synthetic_options o;
    o.preset = "tiny";
    o.dtype = "q8_0";
    olmoe::make_synthetic_gguf((d / "q8").string(), o);
    const fs::path q8 = d / "q8" / "model.gguf";
    std::vector<float> f32;
    rewrite(q8, d / "mixed.gguf", [&](auto&, auto& ts, auto& keep) {
        for (auto& t : ts)
            if (t.name == "blk.0.ffn_down_exps.weight") {
                const auto* blocks = reinterpret_cast<const kdial::q8_block*>(t.bytes.data());
                for (std::size_t i = 0; i < t.bytes.size() / sizeof(kdial::q8_block) * 32; ++i)
                    f32.push_back(blocks[i / 32].scale() * float(blocks[i / 32].q[i % 32]));
                const auto b = std::as_bytes(std::span(f32));
                keep.emplace_back(b.begin(), b.end());
                t.type = kdial::io::ggml_type::f32;
                t.bytes = keep.back();
            }
    });
    auto pure = gguf_load(q8);
    auto mixed = gguf_load(d / "mixed.gguf");
    CHECK(kdial::io::gguf_file::open(d / "mixed.gguf").info("blk.0.ffn_down_exps.weight").type
        == kdial::io::ggml_type::f32);
    CHECK(mixed.weights.layers[0].moe->experts().type() == kdial::dtype::q8);
    const auto a = logits_of(std::move(pure.weights), tokens.size());
    const auto b = logits_of(std::move(mixed.weights), tokens.size());
    CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

TEST_CASE("gguf model: a quantised file computes with exactly the values it holds [gguf][model]")
{
    // The quantised kernels must add no error of their own: the logits of a
    // Q8_0 / Q4_0 file equal those of an F32 file holding its dequantised
    // values (read_floats, the dequantisers of core/blocks.hpp), up to the
    // order of the f32 sums (the kernels apply a block's scale once per block:
    // a few ulps of the logits' range). The tiny presets' rows (64) are too
    // short for Q4_K's 256-element blocks: the K-quant test below covers it.
    temp_dir d;
    for (const std::string preset : { "tiny", "tiny-qwen2-moe" })
        for (const std::string dtype : { "q8_0", "q4_0" }) {
            CAPTURE(preset);
            CAPTURE(dtype);
            olmoe::synthetic_options o;
            o.preset = preset;
            o.dtype = dtype;
            const fs::path q = d / (preset + "-" + dtype);
            olmoe::make_synthetic_gguf(q.string(), o);
            const auto src = kdial::io::gguf_file::open(q / "model.gguf");
            std::size_t quantised = 0;
            rewrite(q / "model.gguf", d / "deq.gguf", [&](auto&, auto& ts, auto& keep) {
                for (auto& t : ts) {
                    const auto& info = src.info(t.name);
                    if (info.type == kdial::io::ggml_type::f32 || info.type == kdial::io::ggml_type::f16
                        || info.type == kdial::io::ggml_type::bf16)
                        continue;
                    const auto v = src.read_floats(t.name);
                    keep.emplace_back(v.size() * 4);
                    std::memcpy(keep.back().data(), v.data(), v.size() * 4);
                    t.type = kdial::io::ggml_type::f32;
                    t.bytes = keep.back();
                    ++quantised;
                }
            });
            CHECK(quantised > 0);
            auto g = gguf_load(q / "model.gguf");
            auto f = gguf_load(d / "deq.gguf");
            CHECK(f.weights.layers[0].moe->experts().type() == kdial::dtype::f32);
            const auto want = logits_of(std::move(f.weights), tokens.size());
            const auto [worst, scale, agree]
                = compare_logits(want, logits_of(std::move(g.weights), tokens.size()), tokens.size());
            MESSAGE(preset, " ", dtype, ": vs F32 of the same values: max |diff| ", worst, " of max |logit| ", scale);
            CHECK(worst <= 1e-5 * scale);
            CHECK(agree == tokens.size());
        }
}

TEST_CASE("gguf model: float tensors off a cache line are copied aligned in their format, same logits [gguf][model]")
{
    // GGUF aligns tensors to 32 bytes by default: a padding key of 8 to 56
    // bytes moves the data section between 0 and 32 (mod 64).
    temp_dir d;
    for (const std::string dtype : { "f32", "f16", "bf16" }) {
        CAPTURE(dtype);
        olmoe::synthetic_options o;
        o.preset = "tiny";
        o.dtype = dtype;
        const fs::path src = d.path / ("tiny-" + dtype);
        olmoe::make_synthetic_gguf(src.string(), o);
        std::vector<float> first;
        std::set<std::uint64_t> offsets;
        for (std::size_t pad = 8; pad <= 56; pad += 16) {
            CAPTURE(pad);
            const fs::path dst = d.path / ("tiny-" + dtype + "-" + std::to_string(pad) + ".gguf");
            rewrite(src / "model.gguf", dst, [&](auto& md, auto&, auto&) {
                md.emplace_back("test.pad", kdial::io::gguf_out_value::string(std::string(pad, 'x')));
            });
            offsets.insert(kdial::io::gguf_file::open(dst).header().data_offset % 64);
            for (const bool copy_all : { false, true }) { // --copy-weights: every float tensor copied
                CAPTURE(copy_all);
                auto g = gguf_load(dst, copy_all);
                CHECK(kdial::test::all_weights_aligned64(g.weights));
                CHECK(kdial::dtype_name(g.weights.layers[0].moe->experts().type()) == dtype);
                if (copy_all) {
                    std::size_t floats = 0;
                    const auto file = kdial::io::gguf_file::open(dst);
                    for (const auto& t : file.tensors())
                        if (t.rank() >= 2 && t.name.find("ffn_gate_inp") == std::string::npos) // not the router
                            floats += t.bytes.size();
                    CHECK(g.weights.arena.bytes() >= floats);
                }
                same_as_first(first, logits_of(std::move(g.weights), tokens.size()));
            }
        }
        CHECK(offsets == std::set<std::uint64_t> { 0, 32 });
    }
}

TEST_CASE("gguf model: a tied token_embd off a cache line is copied once for embed and lm_head [gguf][model]")
{
    temp_dir d;
    olmoe::synthetic_options o;
    o.preset = "tiny";
    o.dtype = "bf16";
    const fs::path src = d.path / "tiny";
    olmoe::make_synthetic_gguf(src.string(), o);
    const auto data_of = [](const kdial::any_weight_view& v) {
        return std::visit([](const auto& w) { return static_cast<const void*>(w.data); }, v);
    };
    std::vector<float> first;
    std::set<std::uint64_t> offsets;
    int copied = 0;
    for (std::size_t pad = 8; pad <= 56; pad += 16) {
        CAPTURE(pad);
        const fs::path dst = d.path / ("tied-" + std::to_string(pad) + ".gguf");
        rewrite(src / "model.gguf", dst, [&](auto& md, auto& ts, auto&) {
            md.emplace_back("test.pad", kdial::io::gguf_out_value::string(std::string(pad, 'x')));
            std::erase_if(ts, [](const auto& t) { return t.name == "output.weight"; });
        });
        const auto f = kdial::io::gguf_file::open(dst);
        REQUIRE(!f.has("output.weight"));
        offsets.insert(f.header().data_offset % 64);
        auto g = gguf_load(dst);
        CHECK(kdial::test::all_weights_aligned64(g.weights));
        CHECK(data_of(g.weights.embed) == data_of(g.weights.lm_head));
        // token_embd sits 32 bytes off a cache line in some of the files:
        // copied there, once.
        const auto* embd = f.find("token_embd.weight");
        REQUIRE(embd != nullptr);
        if (reinterpret_cast<std::uintptr_t>(embd->bytes.data()) % 64 != 0) {
            ++copied;
            CHECK(g.weights.arena.bytes() >= embd->bytes.size());
        }
        same_as_first(first, logits_of(std::move(g.weights), tokens.size()));
    }
    CHECK(offsets == std::set<std::uint64_t> { 0, 32 });
    CHECK(copied >= 1);
}
