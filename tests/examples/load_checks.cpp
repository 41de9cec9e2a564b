// Hostile checkpoints and output directories for the olmoe example, each
// generated here from a tiny synthetic checkpoint:
// - make-synthetic never writes into (or deletes from) a directory it did
//   not write, and replaces only its own earlier output;
// - tensor shapes are checked against config.json before anything sized
//   from the config is allocated (bounded resident memory);
// - tensors the config does not use are an error naming them;
// - non-finite weights are found at load (check_weights), by the router
//   (the error names the layer) or in the output logits.
#include <doctest/doctest.h>

#include "../io/io_test_util.hpp"
#include "test_util.hpp"
#include "model_fixture.hpp"
#include "model.hpp"
#include "synthetic.hpp"
#include "weights.hpp"

#include <kdial/io/safetensors_writer.hpp>

#include <nlohmann/json.hpp>
#include <sys/resource.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <vector>

using kdial::test::check_error;
using kdial::test::temp_dir;
using kdial::test::write_file;
namespace fs = std::filesystem;

namespace {

using kdial::test::slurp;

// Name -> content of every entry of a directory (what "nothing changed" compares).
std::map<std::string, std::string> snapshot(const fs::path& dir)
{
    std::map<std::string, std::string> m;
    for (const auto& e : fs::directory_iterator(dir))
        m[e.path().filename().string()] = fs::is_regular_file(e.symlink_status()) ? slurp(e.path()) : "<not a file>";
    return m;
}

olmoe::synthetic_options tiny_f32(int layers = 2, int shards = 1)
{
    olmoe::synthetic_options o;
    o.preset = "tiny";
    o.layers = layers;
    o.dtype = "f32";
    o.shards = shards;
    return o;
}

// Edits one field of DIR/config.json.
void set_config(const fs::path& dir, const std::string& field, const nlohmann::json& value)
{
    auto j = nlohmann::json::parse(slurp(dir / "config.json"));
    j[field] = value;
    kdial::io::write_file_atomic(dir / "config.json", j.dump(2));
}

// Rewrites DIR/model.safetensors (f32) with edit(name, values) applied to every tensor.
template <class F> void edit_tensors(const fs::path& dir, F&& edit)
{
    std::vector<std::string> names;
    std::vector<std::vector<std::size_t>> shapes;
    std::vector<std::vector<float>> values;
    {
        const auto ck = kdial::io::safetensors_checkpoint::open(dir);
        for (const auto n : ck.names()) {
            names.emplace_back(n);
            shapes.push_back(ck.info(n).shape);
            values.push_back(ck.read_floats(n));
        }
    }
    std::vector<kdial::io::tensor_data> ts;
    for (std::size_t i = 0; i < names.size(); ++i) {
        edit(names[i], values[i]);
        ts.push_back(kdial::io::make_tensor(names[i], shapes[i], std::span<const float>(values[i])));
    }
    kdial::io::write_safetensors(dir / "model.safetensors", ts);
}

std::unique_ptr<olmoe::model> load(const fs::path& dir, bool check_weights = false, bool copy_all = false)
{
    const auto cfg = olmoe::load_config(dir.string());
    olmoe::load_options o;
    o.max_chunk = 16;
    o.check_weights = check_weights;
    o.copy_all = copy_all;
    return std::make_unique<olmoe::model>(olmoe::load_weights(dir.string(), cfg, o), o.max_chunk);
}

long max_rss_kib()
{
    rusage ru {};
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

} // namespace

TEST_CASE("make-synthetic refuses a directory it did not write and changes nothing there")
{
    temp_dir d;
    SUBCASE("a user's checkpoint (no marker)")
    {
        olmoe::make_synthetic((d / "ck").string(), tiny_f32(1, 2));
        fs::remove(d / "ck" / ".kdial-synthetic"); // now it looks like a downloaded checkpoint
        const auto before = snapshot(d / "ck");
        check_error([&] { olmoe::make_synthetic((d / "ck").string(), tiny_f32(1, 1)); },
            { (d / "ck").string(), "is not empty", "no .kdial-synthetic marker", "refusing" });
        CHECK(snapshot(d / "ck") == before);
    }
    SUBCASE("its own output plus a user's file")
    {
        olmoe::make_synthetic((d / "ck").string(), tiny_f32(1, 1));
        write_file(d / "ck" / "notes.txt", "mine");
        const auto before = snapshot(d / "ck");
        check_error([&] { olmoe::make_synthetic((d / "ck").string(), tiny_f32(1, 2)); },
            { "holds 'notes.txt'", "did not write", "refusing" });
        CHECK(snapshot(d / "ck") == before);
    }
    SUBCASE("a listed name that is a directory, and a hostile marker")
    {
        olmoe::make_synthetic((d / "ck").string(), tiny_f32(1, 1));
        fs::remove(d / "ck" / "tokenizer.json");
        fs::create_directory(d / "ck" / "tokenizer.json");
        write_file(d / "ck" / "tokenizer.json" / "keep", "x");
        check_error([&] { olmoe::make_synthetic((d / "ck").string(), tiny_f32(1, 1)); },
            { "'tokenizer.json' is not a regular file", "refusing" });
        CHECK(slurp(d / "ck" / "tokenizer.json" / "keep") == "x");
        write_file(d / "ck" / ".kdial-synthetic", "# not ours\nconfig.json\n");
        check_error([&] { olmoe::make_synthetic((d / "ck").string(), tiny_f32(1, 1)); },
            { ".kdial-synthetic", "not a make-synthetic marker" });
        write_file(d / "ck" / ".kdial-synthetic", std::string(olmoe::synth::marker_header) + "\n../../etc/passwd\n");
        check_error([&] { olmoe::make_synthetic((d / "ck").string(), tiny_f32(1, 1)); },
            { "lists '../../etc/passwd'", "not a plain file name" });
    }
    SUBCASE("a file, not a directory")
    {
        write_file(d / "f", "data");
        check_error(
            [&] { olmoe::make_synthetic((d / "f").string(), tiny_f32(1, 1)); }, { "exists and is not a directory" });
        CHECK(slurp(d / "f") == "data");
    }
}

TEST_CASE("make-synthetic replaces only its own earlier output")
{
    temp_dir d;
    const fs::path ck = d / "ck";
    fs::create_directory(ck); // empty: accepted
    olmoe::make_synthetic(ck.string(), tiny_f32(1, 2));
    CHECK(fs::exists(ck / "model-00001-of-00002.safetensors"));
    CHECK(fs::exists(ck / "model.safetensors.index.json"));
    const std::string first_marker = slurp(ck / ".kdial-synthetic");
    CHECK(first_marker.find("model-00002-of-00002.safetensors\n") != std::string::npos);
    // An interrupted earlier write's leftover of one of its files is removed.
    write_file(ck / "config.json.partial", "{");
    olmoe::make_synthetic(ck.string(), tiny_f32(1, 1));
    std::set<std::string> names;
    for (const auto& e : fs::directory_iterator(ck))
        names.insert(e.path().filename().string());
    CHECK(names == std::set<std::string> { ".kdial-synthetic", "config.json", "model.safetensors", "tokenizer.json" });
    CHECK(slurp(ck / ".kdial-synthetic")
        == std::string(olmoe::synth::marker_header) + "\nconfig.json\nmodel.safetensors\ntokenizer.json\n");
    const auto m = load(ck); // and it loads
    CHECK(m->config().layers == 1);
}

TEST_CASE("config sizes larger than the tensors: shape error before any size-dependent allocation")
{
    temp_dir d;
    olmoe::make_synthetic(d.path.string(), tiny_f32(2, 1));
    // 2^17, the largest size config.json may declare: the MoE workspace sized
    // from it would be ~1 GB at max_chunk 256 before the first shape check.
    set_config(d.path, "intermediate_size", 1 << 17);
    const long before = max_rss_kib();
    const auto cfg = olmoe::load_config(d.path.string());
    olmoe::load_options o;
    o.max_chunk = 256;
    check_error([&] { olmoe::load_weights(d.path.string(), cfg, o); },
        { "model.safetensors", "tensor 'model.layers.0.mlp.experts.0.gate_proj.weight'", "has shape [32, 64]",
            "expected [131072, 64]" });
    const long grown_mib = (max_rss_kib() - before) / 1024;
    MESSAGE("peak resident growth while failing: " << grown_mib << " MiB");
    CHECK(grown_mib < 200);
}

TEST_CASE("tensors the config does not use are an error naming them (strict loading)")
{
    temp_dir d;
    olmoe::make_synthetic(d.path.string(), tiny_f32(2, 1));
    set_config(d.path, "num_hidden_layers", 1);
    const auto cfg = olmoe::load_config(d.path.string());
    olmoe::load_options o;
    check_error([&] { olmoe::load_weights(d.path.string(), cfg, o); },
        { d.path.string(), "tensor(s) not used by config.json", "num_hidden_layers = 1",
            "'model.layers.1.input_layernorm.weight'", "more", "disagree" });
    // More layers in the config than in the checkpoint: a missing tensor.
    set_config(d.path, "num_hidden_layers", 3);
    const auto cfg3 = olmoe::load_config(d.path.string());
    check_error([&] { olmoe::load_weights(d.path.string(), cfg3, o); }, { "no tensor 'model.layers.2." });
    // An extra tensor in an otherwise matching checkpoint.
    set_config(d.path, "num_hidden_layers", 2);
    const auto cfg2 = olmoe::load_config(d.path.string());
    {
        std::vector<std::string> names;
        std::vector<std::vector<std::size_t>> shapes;
        std::vector<std::vector<float>> values;
        const auto ck = kdial::io::safetensors_checkpoint::open(d.path);
        for (const auto n : ck.names()) {
            names.emplace_back(n);
            shapes.push_back(ck.info(n).shape);
            values.push_back(ck.read_floats(n));
        }
        names.push_back("model.layers.0.mlp.experts.8.gate_proj.weight");
        shapes.push_back({ 32, 64 });
        values.emplace_back(32 * 64, 0.0f);
        std::vector<kdial::io::tensor_data> ts;
        for (std::size_t i = 0; i < names.size(); ++i)
            ts.push_back(kdial::io::make_tensor(names[i], shapes[i], std::span<const float>(values[i])));
        kdial::io::write_safetensors(d / "extra.safetensors", ts);
    }
    fs::rename(d / "extra.safetensors", d / "model.safetensors");
    check_error([&] { olmoe::load_weights(d.path.string(), cfg2, o); },
        { "1 tensor(s) not used", "'model.layers.0.mlp.experts.8.gate_proj.weight'" });
}

TEST_CASE("non-finite weights: found at load, by the router (naming the layer) or in the output logits")
{
    temp_dir d;
    olmoe::make_synthetic(d.path.string(), tiny_f32(2, 1));
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    const std::vector<std::int32_t> toks { 3, 17, 42 };
    auto run = [&](olmoe::model& m) {
        const std::size_t V = std::size_t(m.config().vocab);
        olmoe::kv_cache cache(m.config(), toks.size());
        std::vector<float> logits(toks.size() * V);
        const std::vector<int> ks(2, 4);
        m.forward(toks, cache, ks, kdial::matrix_view<float>(logits.data(), toks.size(), V), true);
    };
    { // finite: loads with the check and runs
        auto m = load(d.path, true);
        run(*m);
    }
    SUBCASE("a NaN in layer 1's router")
    {
        edit_tensors(d.path, [&](const std::string& n, std::vector<float>& v) {
            if (n == "model.layers.1.mlp.gate.weight")
                v[3 * 64 + 5] = nan;
        });
        check_error([&] { load(d.path, true); },
            { "model.safetensors", "tensor 'model.layers.1.mlp.gate.weight'", "element 197 [3, 5]", "nan" });
        auto m = load(d.path); // without the check it loads; the forward stops at the router
        check_error([&] { run(*m); }, { "layer 1: ", "non-finite", "--check-weights" });
    }
    SUBCASE("an inf in lm_head (after the last router)")
    {
        edit_tensors(d.path, [&](const std::string& n, std::vector<float>& v) {
            if (n == "lm_head.weight")
                v[9 * 64] = inf;
        });
        check_error([&] { load(d.path, true); }, { "tensor 'lm_head.weight'", "element 576 [9, 0]", "inf" });
        auto m = load(d.path);
        check_error([&] { run(*m); }, { "output logit of row 0, token id 9", "lm_head.weight" });
    }
    SUBCASE("a NaN in the final norm")
    {
        edit_tensors(d.path, [&](const std::string& n, std::vector<float>& v) {
            if (n == "model.norm.weight")
                v[0] = nan;
        });
        auto m = load(d.path);
        check_error([&] { run(*m); }, { "output logit of row 0", "nan", "--check-weights" });
    }
}

TEST_CASE("weight_arena: aligned, zeroed, disjoint pieces that outlive a move")
{
    olmoe::weight_arena a;
    std::vector<std::span<kdial::q8_block>> got;
    // Pieces of odd sizes, one larger than a 64 MiB region, across regions.
    for (std::size_t n : { std::size_t(1), std::size_t(3), std::size_t(70) << 20 >> 5, std::size_t(1000),
             std::size_t(33) << 20 >> 5, std::size_t(40) << 20 >> 5, std::size_t(7) })
        got.push_back(a.take<kdial::q8_block>(n));
    // Pairwise disjoint address ranges, 64-byte aligned starts.
    for (std::size_t i = 0; i < got.size(); ++i) {
        CHECK(reinterpret_cast<std::uintptr_t>(got[i].data()) % 64 == 0);
        for (std::size_t j = 0; j < i; ++j)
            CHECK((got[i].data() + got[i].size() <= got[j].data() || got[j].data() + got[j].size() <= got[i].data()));
    }
    // Zeroed at both ends; then marked, and the marks survive a move.
    const auto ends = [](std::span<kdial::q8_block> g, auto&& f) {
        auto* b = reinterpret_cast<unsigned char*>(g.data());
        const std::size_t n = std::min<std::size_t>(256, g.size_bytes());
        f(b, n);
        f(b + g.size_bytes() - n, n);
    };
    for (std::size_t i = 0; i < got.size(); ++i)
        ends(got[i], [](unsigned char* b, std::size_t n) {
            CHECK(std::all_of(b, b + n, [](unsigned char c) { return c == 0; }));
        });
    for (std::size_t i = 0; i < got.size(); ++i)
        ends(got[i], [&](unsigned char* b, std::size_t n) { std::memset(b, int(i + 1), n); });
    olmoe::weight_arena moved(std::move(a));
    for (std::size_t i = 0; i < got.size(); ++i)
        ends(got[i], [&](unsigned char* b, std::size_t n) {
            CHECK(std::all_of(b, b + n, [&](unsigned char c) { return c == i + 1; }));
        });
}

TEST_CASE("weight_arena: copy_once copies once per source bytes, count and element type")
{
    olmoe::weight_arena a;
    std::vector<std::byte> src(1000);
    for (std::size_t i = 0; i < src.size(); ++i)
        src[i] = std::byte(i * 7 + 1);
    int fills = 0;
    const auto copy = [&](std::span<std::byte> c) {
        ++fills;
        std::memcpy(c.data(), src.data(), c.size());
    };
    const auto c1 = a.copy_once<std::byte>(src, src.size(), copy);
    const std::size_t after_one = a.bytes();
    const auto c2 = a.copy_once<std::byte>(src, src.size(), copy);
    CHECK(c1.data() == c2.data());
    CHECK(fills == 1);
    CHECK(a.bytes() == after_one);
    CHECK(reinterpret_cast<std::uintptr_t>(c1.data()) % 64 == 0);
    CHECK(std::memcmp(c1.data(), src.data(), src.size()) == 0);
    // Another view of the same bytes (a prefix), or another element type: a new copy.
    const auto c3 = a.copy_once<std::byte>(std::span<const std::byte>(src).first(500), 500, copy);
    const auto c4 = a.copy_once<float>(src, 250, [&](std::span<float> c) {
        ++fills;
        std::memcpy(c.data(), src.data(), c.size_bytes());
    });
    CHECK(c3.data() != c1.data());
    CHECK(static_cast<const void*>(c4.data()) != static_cast<const void*>(c1.data()));
    CHECK(fills == 3);
    CHECK(std::memcmp(c4.data(), src.data(), 1000) == 0);
}

namespace {

// Bytes of the distinct weight views the model streams.
std::size_t weight_bytes(const olmoe::model_weights& w)
{
    std::map<const void*, std::size_t> seen;
    olmoe::for_each_weight(w, [&](const auto& v) { seen[static_cast<const void*>(v.data)] = v.bytes(); });
    std::size_t n = 0;
    for (const auto& [p, b] : seen)
        n += b;
    return n;
}

// Rewrites DIR/model.safetensors with its header padded (spaces, as the
// format allows) so the data area starts at file offset m (mod 64).
void repad_safetensors(const fs::path& dir, std::size_t m)
{
    const std::string s = slurp(dir / "model.safetensors");
    std::uint64_t n = 0;
    std::memcpy(&n, s.data(), 8);
    std::string header = s.substr(8, n);
    header.erase(header.find_last_not_of(' ') + 1);
    header.append((m + 128 - (8 + header.size()) % 64) % 64, ' ');
    const std::uint64_t n2 = header.size();
    std::string out(8, '\0');
    std::memcpy(out.data(), &n2, 8);
    out += header;
    out.append(s, 8 + n);
    write_file(dir / "model.safetensors", out);
}

} // namespace

TEST_CASE("float weights: in place where the file aligns them to 64 bytes, else aligned copies; same logits")
{
    // safetensors aligns the data area to 8 bytes only: at offset 8 (mod 64)
    // every tensor of the tiny model is 8 bytes off a cache line, at 1 no
    // BF16 / F32 element is even aligned to its size.
    const std::vector<std::int32_t> toks { 3, 17, 42, 7, 99, 5 };
    for (const char* dtype : { "bf16", "f32", "f16" }) {
        CAPTURE(dtype);
        std::vector<float> first;
        for (const std::size_t m : { 0, 8, 1, 32 }) {
            CAPTURE(m);
            temp_dir d;
            auto o = tiny_f32(2, 1);
            o.dtype = dtype;
            olmoe::make_synthetic(d.path.string(), o);
            repad_safetensors(d.path, m);
            const std::string s = slurp(d.path / "model.safetensors");
            std::uint64_t n = 0;
            std::memcpy(&n, s.data(), 8);
            REQUIRE((8 + n) % 64 == m);
            // copy_all (--copy-weights): every weight in the arena, same logits.
            for (const bool copy_all : { false, true }) {
                CAPTURE(copy_all);
                auto model = load(d.path, false, copy_all);
                CHECK(kdial::test::all_weights_aligned64(model->weights()));
                const std::size_t copied = model->weights().arena.bytes(), used = weight_bytes(model->weights());
                if (copy_all)
                    CHECK(copied >= used);
                else if (m == 0 && std::string(dtype) != "f16") // F16 is widened into the arena
                    CHECK(copied < used); // some weights in place
                const std::size_t V = std::size_t(model->config().vocab);
                olmoe::kv_cache cache(model->config(), toks.size());
                std::vector<float> logits(toks.size() * V);
                const std::vector<int> ks(2, 4);
                model->forward(toks, cache, ks, kdial::matrix_view<float>(logits.data(), toks.size(), V), true);
                if (first.empty())
                    first = logits;
                else
                    CHECK(kdial::test::same_bytes(first, logits));
            }
        }
    }
}
