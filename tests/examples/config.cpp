// config.json of the olmoe example (examples/olmoe/config.hpp) against hostile
// files: deep nesting, out-of-range and wrong-typed integers (each message
// names the file, the field and the value), sizes that would drive huge
// allocations rejected at config time, duplicate keys, wrong-typed
// rope_scaling, and config.json as a directory, a FIFO or a symlink loop.
// The files are the committed golden configs, edited here.
#include <doctest/doctest.h>

#include "config.hpp"
#include "io/io_test_util.hpp"

#include <sys/stat.h>

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>

using kdial::test::check_error;
using kdial::test::error_of;
using kdial::test::temp_dir;
using kdial::test::write_file;
using json = nlohmann::json;

namespace {

json golden_config(const std::string& name)
{
    std::ifstream in(std::string(KDIAL_GOLDEN_DIR) + "/" + name + "/config.json");
    REQUIRE(in.good());
    std::stringstream ss;
    ss << in.rdbuf();
    return json::parse(ss.str());
}

// parse_config of `j` with `field` set to `value` (a JSON text).
std::string config_error(json j, const std::string& field, const std::string& value)
{
    j[field] = json::parse(value);
    return error_of([&] { (void)olmoe::parse_config(j.dump(), "cfg/config.json"); });
}

void check_config_error(const json& base, const std::string& field, const std::string& value,
    std::initializer_list<std::string_view> pieces)
{
    const std::string msg = config_error(base, field, value);
    for (std::string_view p : pieces)
        CHECK_MESSAGE(
            msg.find(p) != std::string::npos, field << " = " << value << ": \"" << msg << "\" lacks \"" << p << "\"");
    CHECK_MESSAGE(msg.find("cfg/config.json: ") == 0, msg);
    CHECK(msg.size() < 400);
}

} // namespace

TEST_SUITE("examples/config")
{
    TEST_CASE("golden configs parse [examples][config]")
    {
        for (const char* name : { "olmoe-tiny-f32", "qwen2-moe-tiny-f32", "mixtral-tiny-bf16" }) {
            const auto c = olmoe::parse_config(golden_config(name).dump(), name);
            CHECK(c.hidden == 64);
            CHECK(c.vocab == 384);
        }
        const auto q = olmoe::parse_config(golden_config("qwen2-moe-tiny-f32").dump(), "q");
        CHECK(q.shared_ffn == 96);
        CHECK(q.mlp_only_layers == std::vector<int> { 1 });
        CHECK(q.eos_ids == std::vector<int> { 331 });
    }

    TEST_CASE("sizes that would drive huge allocations are rejected at config time [examples][config]")
    {
        const json olmoe = golden_config("olmoe-tiny-f32");
        const json qwen = golden_config("qwen2-moe-tiny-f32");
        // intermediate_size 2^30 asked the MoE workspace for 8 TB; 2^19 for 4.2 GB before the shape error.
        check_config_error(olmoe, "intermediate_size", "1073741824",
            { "field 'intermediate_size' must be an integer in [1, 131072], got number 1073741824" });
        check_config_error(olmoe, "intermediate_size", "524288", { "'intermediate_size'", "got number 524288" });
        CHECK(olmoe::parse_config(olmoe.dump(), "x").expert_ffn == 32);
        // shared_expert_intermediate_size 2^32 became 0 (the shared expert vanished).
        check_config_error(qwen, "shared_expert_intermediate_size", "4294967296",
            { "field 'shared_expert_intermediate_size' must be an integer in [0, 131072], got number 4294967296" });
        check_config_error(qwen, "moe_intermediate_size", "524288", { "'moe_intermediate_size'", "524288" });
        check_config_error(qwen, "intermediate_size", "1073741824", { "'intermediate_size'", "1073741824" });
        check_config_error(olmoe, "hidden_size", "1000000", { "'hidden_size'", "[1, 65536]", "1000000" });
        check_config_error(olmoe, "vocab_size", "16777217", { "'vocab_size'", "[1, 16777216]", "16777217" });
        check_config_error(olmoe, "num_hidden_layers", "100000", { "'num_hidden_layers'", "100000" });
        check_config_error(olmoe, "num_experts", "1000000", { "'num_experts'", "1000000" });
        check_config_error(olmoe, "max_position_embeddings", "4294967296", { "'max_position_embeddings'" });
        check_config_error(olmoe, "head_dim", "4096", { "'head_dim'", "4096" });
        check_config_error(olmoe, "num_attention_heads", "0", { "'num_attention_heads'", "got number 0" });
    }

    TEST_CASE("integers: no UB, no silent truncation; file, field and value named [examples][config]")
    {
        const json olmoe = golden_config("olmoe-tiny-f32");
        const json qwen = golden_config("qwen2-moe-tiny-f32");
        const json mixtral = golden_config("mixtral-tiny-bf16");
        check_config_error(olmoe, "hidden_size", "1e300", { "'hidden_size'", "got number 1e+300" });
        check_config_error(olmoe, "hidden_size", "64.5", { "'hidden_size'", "got number 64.5" });
        check_config_error(olmoe, "hidden_size", "\"64\"", { "'hidden_size'", "got string \"64\"" });
        check_config_error(olmoe, "hidden_size", "true", { "'hidden_size'", "got boolean true" });
        check_config_error(olmoe, "hidden_size", "-64", { "'hidden_size'", "got number -64" });
        CHECK(config_error(olmoe, "hidden_size", "64.0") == "<no exception>"); // an integral float is an integer
        // eos_token_id 2^32 became 0.
        check_config_error(olmoe, "eos_token_id", "4294967296",
            { "field 'eos_token_id' must be an integer in [0, 383], got number 4294967296" });
        check_config_error(olmoe, "eos_token_id", "384", { "'eos_token_id'", "[0, 383]", "384" });
        check_config_error(olmoe, "eos_token_id", "[0, 4294967296]", { "'eos_token_id[1]'", "4294967296" });
        check_config_error(olmoe, "eos_token_id", "[0, \"1\"]", { "'eos_token_id[1]'", "string \"1\"" });
        check_config_error(olmoe, "eos_token_id", "{\"a\": 1}", { "'eos_token_id'", "an integer or a list" });
        check_config_error(olmoe, "bos_token_id", "-1", { "'bos_token_id'", "[0, 383]", "-1" });
        // mlp_only_layers 2^32 + 1 became 1.
        check_config_error(qwen, "mlp_only_layers", "[4294967297]",
            { "field 'mlp_only_layers[0]' must be an integer in [0, 2], got number 4294967297" });
        check_config_error(qwen, "mlp_only_layers", "[3]", { "'mlp_only_layers[0]'", "[0, 2]", "3" });
        check_config_error(qwen, "decoder_sparse_step", "4", { "'decoder_sparse_step'", "[1, 3]" });
        check_config_error(mixtral, "sliding_window", "4294967296", { "'sliding_window'", "4294967296" });
        check_config_error(mixtral, "sliding_window", "0", { "'sliding_window'", "got number 0" });
        check_config_error(olmoe, "num_key_value_heads", "8", { "'num_key_value_heads'", "[1, 4]", "8" });
        check_config_error(olmoe, "rms_norm_eps", "1e300", { "'rms_norm_eps'", "finite" });
        check_config_error(olmoe, "rms_norm_eps", "\"x\"", { "'rms_norm_eps'", "string \"x\"" });
        check_config_error(olmoe, "norm_topk_prob", "1", { "'norm_topk_prob'", "true or false", "number 1" });
        check_config_error(olmoe, "torch_dtype", "[\"bf16\"]", { "'torch_dtype'", "array [\"bf16\"]" });
        std::string long_type = "\"";
        long_type.append(10000, 'm').append("\"");
        check_config_error(olmoe, "model_type", long_type, { "'model_type'", "..." });
    }

    TEST_CASE("rope_scaling and rope_parameters with a wrong type give clear messages [examples][config]")
    {
        const json olmoe = golden_config("olmoe-tiny-f32");
        check_config_error(olmoe, "rope_scaling", "\"linear\"",
            { "field 'rope_scaling' must be an object or null, got string \"linear\"" });
        check_config_error(olmoe, "rope_scaling", "[1, 2]", { "'rope_scaling'", "array [1,2]" });
        check_config_error(
            olmoe, "rope_scaling", "{\"type\": 5}", { "field 'rope_scaling.type' must be a string, got number 5" });
        check_config_error(olmoe, "rope_scaling", "{\"rope_type\": [\"x\"]}", { "'rope_scaling.rope_type'" });
        check_config_error(olmoe, "rope_scaling", "{\"type\": \"linear\", \"factor\": 2.0}",
            { "'rope_scaling'", "only default (unscaled) RoPE" });
        CHECK(config_error(olmoe, "rope_scaling", "{\"rope_type\": \"default\"}") == "<no exception>");
        check_config_error(olmoe, "rope_parameters", "7", { "'rope_parameters'", "number 7" });
        check_config_error(olmoe, "rope_parameters", "{\"rope_type\": \"yarn\"}", { "'rope_parameters.rope_type'" });
        check_config_error(olmoe, "rope_parameters", "{\"rope_theta\": \"big\"}",
            { "'rope_parameters.rope_theta'", "string \"big\"" });
    }

    TEST_CASE("deep nesting and duplicate keys in config.json [examples][config]")
    {
        const std::string base = golden_config("olmoe-tiny-f32").dump();
        // 100 000 levels in model_type crashed in dump() (SIGSEGV in release).
        const std::string deep = "{\"model_type\": " + std::string(100'000, '[') + std::string(100'000, ']') + "}";
        check_error([&] { (void)olmoe::parse_config(deep, "cfg/config.json"); },
            { "cfg/config.json: config nests deeper than 64 levels" });
        // Duplicate keys: last-wins would silently pick one of two values.
        const std::string dup = "{\"hidden_size\": 64, " + base.substr(1);
        check_error([&] { (void)olmoe::parse_config(dup, "cfg/config.json"); },
            { "cfg/config.json: config has the key \"hidden_size\" twice in the top level" });
        const std::string dup_nested = R"({"rope_scaling": {"type": "default", "type": "linear"}, )" + base.substr(1);
        check_error(
            [&] { (void)olmoe::parse_config(dup_nested, "cfg/config.json"); }, { "\"type\" twice in rope_scaling" });
        check_error([&] { (void)olmoe::parse_config("[1]", "cfg/config.json"); },
            { "cfg/config.json: top level must be a JSON object" });
    }

    TEST_CASE("config.json as a directory, FIFO, symlink loop or missing file [examples][config]")
    {
        const temp_dir dir;
        const std::string d = dir.path.string();
        check_error(
            [&] { (void)olmoe::load_config(d); }, { d + "/config.json: cannot open config file: no such file" });
        std::filesystem::create_directory(dir / "config.json");
        check_error([&] { (void)olmoe::load_config(d); }, { d + "/config.json", "it is a directory" });
        std::filesystem::remove(dir / "config.json");
        REQUIRE(::mkfifo((dir / "config.json").c_str(), 0600) == 0); // blocked forever in open() before
        check_error([&] { (void)olmoe::load_config(d); }, { d + "/config.json", "FIFO" });
        std::filesystem::remove(dir / "config.json");
        std::filesystem::create_symlink(dir / "config.json", dir / "config.json");
        check_error([&] { (void)olmoe::load_config(d); }, { d + "/config.json", "symlink loop" });
        std::filesystem::remove(dir / "config.json");
        write_file(dir / "config.json", std::string(olmoe::config_limits::max_file_bytes + 1, ' '));
        check_error([&] { (void)olmoe::load_config(d); }, { d + "/config.json", "larger than the limit" });
        std::filesystem::remove(dir / "config.json");
        write_file(dir / "config.json", golden_config("olmoe-tiny-f32").dump());
        CHECK(olmoe::load_config(d).layers == 2);
    }

    TEST_CASE("prefill_flops counts every matrix product of a prefill [examples][config]")
    {
        // A config small enough to count by hand: d 4, 2 heads of 2 with one
        // kv head, 4 experts of width 3, vocab 5, a window of 2, T = 3.
        olmoe::model_config c;
        c.hidden = 4;
        c.layers = 2;
        c.heads = 2;
        c.kv_heads = 1;
        c.head_dim = 2;
        c.vocab = 5;
        c.experts = 4;
        c.top_k = 2;
        c.expert_ffn = 3;
        c.sliding_window = 2;
        // Per layer: projections 3 tokens * 2 * 4 * (2*4 + 2*2) = 288; keys
        // attended 1 + 2 + 2 = 5, times 2 * 2 * 4 = 80; router 3 * 2 * 4 * 4
        // = 96; experts 3 * k * 6 * 4 * 3 = 216 k. lm_head 2 * 4 * 5 = 40.
        CHECK(olmoe::prefill_flops(c, 3, { 1, 2 }) == 288 + 80 + 96 + 216 + 288 + 80 + 96 + 432 + 40);
        CHECK(olmoe::prefill_flops(c, 3, {}) == 2 * (288 + 80 + 96 + 432) + 40); // k = top_k
        // Without the window the keys are 1 + 2 + 3 = 6 (96 per layer).
        c.sliding_window.reset();
        CHECK(olmoe::prefill_flops(c, 3, { 2 }) == 2 * (288 + 96 + 96 + 432) + 40);
        // A shared expert of width 5 with its gate, and layer 0 dense (width 7).
        c.shared_ffn = 5;
        c.shared_gate = true;
        c.mlp_only_layers = { 0 };
        c.dense_ffn = 7;
        CHECK(olmoe::prefill_flops(c, 3, { 2 })
            == (288 + 96 + 3 * 6 * 4 * 7) + (288 + 96 + 96 + 432 + 3 * 6 * 4 * 5 + 3 * 2 * 4) + 40);
    }
}
