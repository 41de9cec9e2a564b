// olmoe: run an OLMoE (or Qwen2-MoE / Mixtral) Hugging Face checkpoint on the
// CPU with kdial, k dialed at run time. Subcommands: generate, logits, bench,
// make-synthetic, demo. Errors go to stderr with a non-zero exit status;
// long work shows progress on stderr.
#include "config.hpp"
#include "model.hpp"
#include "runner.hpp"
#include "synthetic.hpp"
#include "weights.hpp"

#include "roofline.hpp"

#include <kdial/io/npy.hpp>
#include <kdial/io/tokenizer.hpp>

#include <nlohmann/json.hpp>
#include <tbb/task_arena.h>

#include <sys/resource.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace {

using kdial::detail::cat;
namespace fs = std::filesystem;

// A usage error: message, then the subcommand's usage, exit status 2.
struct usage_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

const char* main_usage = R"(usage: olmoe <command> [options]

Runs Mixture-of-Experts language models (Hugging Face OLMoE, Qwen2-MoE,
Mixtral checkpoints) on the CPU with kdial; k, the number of experts per
token, is a dial set at run time.

commands:
  generate        greedy generation from a prompt or token ids
  logits          logits of every position, written as .npy
  bench           prefill and decode tokens/s for several k, vs the roofline
  make-synthetic  write a synthetic checkpoint in the Hugging Face layout
  demo            make a tiny synthetic checkpoint, generate and bench it

Run 'olmoe <command> --help' for a command's options.
)";

const std::map<std::string, std::string> usages = {
    {"generate", R"(usage: olmoe generate --model DIR [--prompt TEXT | --tokens 1,2,3] [--k K] [--max-new N]
                      [--threads N] [--weights native|int8]
Greedy generation; streams text (or ids when the model has no tokenizer.json).
  --model DIR     checkpoint directory (config.json, *.safetensors, tokenizer.json)
  --prompt TEXT   prompt text (needs tokenizer.json)
  --tokens LIST   prompt as comma-separated token ids
  --k K           experts per token for every layer (default: the trained k)
  --max-new N     tokens to generate (default 32); stops early at an EOS id
  --threads N     worker threads (default: all cores)
  --weights W     native (as stored, default) or int8 (quantised at load)
)"},
    {"logits", R"(usage: olmoe logits --model DIR --tokens 1,2,3 --out FILE.npy [--k K] [--threads N]
                    [--weights native|int8]
Writes the logits of every position, float32 [T, vocab], in NumPy .npy format.
)"},
    {"bench", R"(usage: olmoe bench --model DIR [--k 1,2,4,8] [--prompt-len 512] [--gen 32] [--threads N]
                   [--weights native|int8] [--json]
Measures prefill and decode tokens/s for each k, with the fraction of the
memory-bandwidth roofline decode reached (weight bytes streamed per token /
read bandwidth measured in the same run) and the peak resident memory.
)"},
    {"make-synthetic", R"(usage: olmoe make-synthetic --out DIR [--preset tiny|olmoe] [--layers N] [--dtype bf16|f32]
                            [--shards N] [--seed S]
Writes a synthetic checkpoint in the exact Hugging Face layout: config.json,
model.safetensors (or N shards and model.safetensors.index.json), and a small
byte-level BPE tokenizer.json. --preset olmoe has OLMoE-1B-7B's sizes
(d 2048, 16 heads, F 1024, 64 experts, top-8, vocab 50304).
)"},
    {"demo", R"(usage: olmoe demo [--dir DIR]
Makes a tiny synthetic OLMoE checkpoint (default: $XDG_CACHE_HOME/kdial/demo or
~/.cache/kdial/demo), then shows generation and a benchmark at several k.
)"}};

struct args {
    std::string command;
    std::map<std::string, std::string> opt;
    std::set<std::string> flags;

    bool has(const std::string& k) const { return opt.count(k) != 0; }
    std::string get(const std::string& k, const std::string& dflt = "") const
    {
        auto it = opt.find(k);
        return it == opt.end() ? dflt : it->second;
    }
    std::string need(const std::string& k) const
    {
        if (!has(k))
            throw usage_error(cat("missing required option --", k));
        return get(k);
    }
};

long parse_int(const std::string& flag, const std::string& v, long lo, long hi)
{
    char* end = nullptr;
    errno = 0;
    const long x = std::strtol(v.c_str(), &end, 10);
    if (v.empty() || *end || errno || x < lo || x > hi)
        throw usage_error(cat("--", flag, " expects an integer in [", lo, ", ", hi, "], got '", v, "'"));
    return x;
}

std::vector<int> parse_int_list(const std::string& flag, const std::string& v, long lo, long hi)
{
    std::vector<int> out;
    std::size_t p = 0;
    while (p <= v.size()) {
        const std::size_t q = std::min(v.find(',', p), v.size());
        out.push_back(int(parse_int(flag, v.substr(p, q - p), lo, hi)));
        p = q + 1;
    }
    return out;
}

args parse_args(int argc, char** argv, const std::set<std::string>& options, const std::set<std::string>& flags)
{
    args a;
    for (int i = 2; i < argc; ++i) {
        std::string s = argv[i];
        if (s.rfind("--", 0) != 0)
            throw usage_error(cat("unexpected argument '", s, "'"));
        s = s.substr(2);
        std::string value;
        bool inline_value = false;
        if (auto eq = s.find('='); eq != std::string::npos) {
            value = s.substr(eq + 1);
            s = s.substr(0, eq);
            inline_value = true;
        }
        if (flags.count(s)) {
            if (inline_value)
                throw usage_error(cat("--", s, " takes no value"));
            a.flags.insert(s);
        } else if (options.count(s)) {
            if (!inline_value) {
                if (i + 1 >= argc)
                    throw usage_error(cat("--", s, " needs a value"));
                value = argv[++i];
            }
            a.opt[s] = value;
        } else
            throw usage_error(cat("unknown option --", s));
    }
    return a;
}

// Progress on stderr: a rewritten line on a terminal, occasional lines otherwise.
struct progress {
    std::string what;
    bool tty = isatty(2);
    int last = -1;
    void operator()(double frac)
    {
        const int pct = int(frac * 100);
        if (pct == last || (!tty && pct % 25 != 0 && pct != 100))
            return;
        last = pct;
        std::fflush(stdout);
        std::fprintf(stderr, tty ? "\r%s %3d%%" : "%s %3d%%\n", what.c_str(), pct);
        if (tty && pct >= 100)
            std::fputc('\n', stderr);
        std::fflush(stderr);
    }
};

struct loaded {
    olmoe::model_config cfg;
    std::unique_ptr<olmoe::model> m;
    std::optional<kdial::io::bpe_tokenizer> tok;
};

loaded load(const args& a, std::size_t max_chunk = 256)
{
    const std::string dir = a.need("model");
    if (!fs::is_directory(dir))
        throw kdial::error(cat(dir, ": not a directory (--model expects a checkpoint directory)"));
    loaded L;
    L.cfg = olmoe::load_config(dir);
    const std::string wt = a.get("weights", "native");
    if (wt != "native" && wt != "int8")
        throw usage_error(cat("--weights must be native or int8, got '", wt, "'"));
    olmoe::load_options o;
    o.int8 = wt == "int8";
    o.max_chunk = max_chunk;
    progress p{"loading " + dir};
    o.progress = [&](int done, int total) { p(double(done) / total); };
    L.m = std::make_unique<olmoe::model>(olmoe::load_weights(dir, L.cfg, o), max_chunk);
    if (fs::exists(fs::path(dir) / "tokenizer.json"))
        L.tok = kdial::io::bpe_tokenizer::from_file(fs::path(dir) / "tokenizer.json");
    return L;
}

std::vector<int> k_schedule(const args& a, const olmoe::model_config& c)
{
    const int k = a.has("k") ? int(parse_int("k", a.get("k"), 1, 1 << 20)) : c.top_k;
    if (k < 1 || k > c.experts)
        throw kdial::error(cat("--k ", k, " is outside [1, num_experts = ", c.experts, "]"));
    return std::vector<int>(std::size_t(c.layers), k);
}

std::vector<std::int32_t> prompt_tokens(const args& a, const loaded& L)
{
    if (a.has("tokens") && a.has("prompt"))
        throw usage_error("give --prompt or --tokens, not both");
    std::vector<std::int32_t> ids;
    if (a.has("tokens")) {
        for (int t : parse_int_list("tokens", a.get("tokens"), 0, (1L << 31) - 1)) {
            if (t >= L.cfg.vocab)
                throw kdial::error(cat("--tokens: id ", t, " is outside [0, vocab_size = ", L.cfg.vocab, ")"));
            ids.push_back(t);
        }
    } else if (a.has("prompt")) {
        if (!L.tok)
            throw kdial::error("--prompt needs tokenizer.json in the model directory; use --tokens instead");
        ids = L.tok->encode(a.get("prompt"));
        if (ids.empty())
            throw kdial::error("--prompt encodes to no tokens");
    } else
        throw usage_error("give --prompt TEXT or --tokens 1,2,3");
    return ids;
}

int threads_of(const args& a)
{
    return a.has("threads") ? int(parse_int("threads", a.get("threads"), 1, 1024)) : tbb::this_task_arena::max_concurrency();
}

int cmd_generate(const args& a, std::FILE* out = stdout)
{
    tbb::task_arena arena(threads_of(a));
    return arena.execute([&] {
        auto L = load(a);
        const auto ks = k_schedule(a, L.cfg);
        const auto ids = prompt_tokens(a, L);
        const int max_new = int(parse_int("max-new", a.get("max-new", "32"), 0, 1 << 20));
        olmoe::kv_cache cache(L.cfg, ids.size() + std::size_t(max_new) + 1);
        std::vector<float> logits(std::size_t(L.cfg.vocab));
        const kdial::matrix_view<float> lv(logits.data(), 1, logits.size());
        const auto t0 = std::chrono::steady_clock::now();
        olmoe::prefill(*L.m, ids, cache, ks, lv, false);
        const double t_prefill = olmoe::seconds_since(t0);
        std::optional<kdial::io::bpe_stream_decoder> dec;
        if (L.tok)
            dec.emplace(*L.tok, true);
        int produced = 0;
        const auto t1 = std::chrono::steady_clock::now();
        for (; produced < max_new; ++produced) {
            const std::int32_t next = olmoe::argmax(logits);
            const bool eos =
                std::find(L.cfg.eos_ids.begin(), L.cfg.eos_ids.end(), next) != L.cfg.eos_ids.end();
            if (dec && L.tok->is_valid_id(next))
                std::fputs(dec->push(next).c_str(), out);
            else
                std::fprintf(out, "%s%d", produced ? "," : "", next);
            std::fflush(out);
            if (eos) {
                ++produced;
                break;
            }
            if (produced + 1 < max_new)
                L.m->forward(std::span<const std::int32_t>(&next, 1), cache, ks, lv, false);
        }
        if (dec)
            std::fputs(dec->flush().c_str(), out);
        std::fputc('\n', out);
        const double t_dec = olmoe::seconds_since(t1);
        std::fprintf(stderr, "[k=%d: prompt %zu tokens in %.2f s (%.1f tok/s), %d new tokens in %.2f s (%.1f tok/s)]\n",
                     ks[0], ids.size(), t_prefill, double(ids.size()) / t_prefill, produced, t_dec,
                     produced > 1 ? double(produced - 1) / t_dec : 0.0);
        return 0;
    });
}

int cmd_logits(const args& a)
{
    tbb::task_arena arena(threads_of(a));
    return arena.execute([&] {
        auto L = load(a);
        const auto ks = k_schedule(a, L.cfg);
        if (!a.has("tokens"))
            throw usage_error("missing required option --tokens");
        const auto ids = prompt_tokens(a, L);
        const std::string outp = a.need("out");
        olmoe::kv_cache cache(L.cfg, ids.size());
        std::vector<float> logits(ids.size() * std::size_t(L.cfg.vocab));
        olmoe::prefill(*L.m, ids, cache, ks, kdial::matrix_view<float>(logits.data(), ids.size(), std::size_t(L.cfg.vocab)),
                       true);
        kdial::io::write_npy(outp, logits, ids.size(), std::size_t(L.cfg.vocab));
        std::fprintf(stderr, "wrote %s: float32 [%zu, %d] at k=%d\n", outp.c_str(), ids.size(), L.cfg.vocab, ks[0]);
        return 0;
    });
}

double peak_rss_gib()
{
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return double(ru.ru_maxrss) / (1024.0 * 1024.0);
}

int cmd_bench(const args& a, std::FILE* out = stdout)
{
    const int threads = threads_of(a);
    tbb::task_arena arena(threads);
    return arena.execute([&] {
        const std::size_t prompt_len = std::size_t(parse_int("prompt-len", a.get("prompt-len", "512"), 1, 1 << 20));
        const int gen = int(parse_int("gen", a.get("gen", "32"), 2, 1 << 20));
        auto L = load(a);
        std::vector<int> klist = a.has("k") ? parse_int_list("k", a.get("k"), 1, 1 << 20) : std::vector<int>{1, 2, 4, 8};
        for (int k : klist)
            if (k > L.cfg.experts)
                throw kdial::error(cat("--k ", k, " is outside [1, num_experts = ", L.cfg.experts, "]"));
        std::mt19937 rng(7);
        std::vector<std::int32_t> prompt(prompt_len);
        for (auto& t : prompt)
            t = std::int32_t(rng() % std::uint32_t(std::min(L.cfg.vocab, 50000)));
        olmoe::kv_cache cache(L.cfg, prompt_len + std::size_t(gen) + 1);
        std::vector<float> logits(std::size_t(L.cfg.vocab));
        const kdial::matrix_view<float> lv(logits.data(), 1, logits.size());
        struct measured {
            int k;
            double prefill_s, decode_s, bytes;
        };
        std::vector<measured> ms;
        for (int k : klist) {
            const std::vector<int> ks(std::size_t(L.cfg.layers), k);
            progress p{cat("bench k=", k)};
            cache.reset();
            auto t0 = std::chrono::steady_clock::now();
            olmoe::prefill(*L.m, prompt, cache, ks, lv, false);
            const double tp = olmoe::seconds_since(t0);
            p(0.5);
            double bytes = 0, td = 0;
            std::int32_t next = olmoe::argmax(logits);
            for (int g = 0; g < gen; ++g) {
                t0 = std::chrono::steady_clock::now();
                L.m->forward(std::span<const std::int32_t>(&next, 1), cache, ks, lv, false);
                const double dt = olmoe::seconds_since(t0);
                if (g > 0) { // the first decode step warms caches
                    td += dt;
                    bytes += double(L.m->last_decode_bytes());
                }
                next = olmoe::argmax(logits);
                p(0.5 + 0.5 * (g + 1) / gen);
            }
            ms.push_back({k, tp, td, bytes});
        }
        // Peak memory before the bandwidth probe (which allocates 1.5 GiB).
        const double rss = peak_rss_gib();
        std::fprintf(stderr, "measuring this machine's limits with %d threads...\n", threads);
        const auto lim = kdial::bench::machine_limits();
        std::size_t ck_bytes = 0;
        for (const auto& e : fs::directory_iterator(a.get("model")))
            if (e.path().extension() == ".safetensors")
                ck_bytes += std::size_t(e.file_size());
        nlohmann::json rows = nlohmann::json::array();
        if (!a.flags.count("json"))
            std::fprintf(out, "%4s %14s %14s %12s %12s %10s\n", "k", "prefill tok/s", "decode tok/s", "GB/token",
                         "decode GB/s", "roofline");
        for (const auto& m : ms) {
            const double n = gen - 1;
            const double gbs = m.bytes / m.decode_s / 1e9;
            rows.push_back({{"k", m.k},
                            {"prefill_tokens", prompt_len},
                            {"prefill_tok_s", double(prompt_len) / m.prefill_s},
                            {"decode_tokens", n},
                            {"decode_tok_s", n / m.decode_s},
                            {"decode_bytes_per_token", m.bytes / n},
                            {"decode_gb_s", gbs},
                            {"roofline_fraction", gbs / lim.read_gbs}});
            if (!a.flags.count("json"))
                std::fprintf(out, "%4d %14.1f %14.2f %12.4f %12.2f %10.2f\n", m.k, double(prompt_len) / m.prefill_s,
                             n / m.decode_s, m.bytes / n / 1e9, gbs, gbs / lim.read_gbs);
        }
        const nlohmann::json result = {{"model", a.get("model")},
                                       {"weights", a.get("weights", "native")},
                                       {"threads", threads},
                                       {"read_bandwidth_gb_s", lim.read_gbs},
                                       {"fma_peak_gflop_s", lim.fma_gflops},
                                       {"peak_rss_gib", rss},
                                       {"checkpoint_gib", double(ck_bytes) / double(1 << 30)},
                                       {"results", rows}};
        if (a.flags.count("json"))
            std::fprintf(out, "%s\n", result.dump(2).c_str());
        else {
            std::fprintf(out,
                         "limits measured in this run (%d threads): read %.1f GB/s, FMA %.0f GFLOP/s\n"
                         "peak RSS %.2f GiB, checkpoint %.2f GiB (weights are memory-mapped)\n",
                         threads, lim.read_gbs, lim.fma_gflops, rss, double(ck_bytes) / double(1 << 30));
            if (ck_bytes < (std::size_t(256) << 20))
                std::fprintf(out, "note: this checkpoint fits in the CPU caches, so decode can beat the DRAM "
                                  "roofline; use --preset olmoe for a meaningful fraction\n");
        }
        return 0;
    });
}

int cmd_make_synthetic(const args& a)
{
    olmoe::synthetic_options o;
    o.preset = a.get("preset", "tiny");
    o.layers = a.has("layers") ? int(parse_int("layers", a.get("layers"), 1, 64)) : 0;
    o.dtype = a.get("dtype", "bf16");
    o.shards = int(parse_int("shards", a.get("shards", "1"), 1, 64));
    o.seed = std::uint64_t(parse_int("seed", a.get("seed", "1"), 0, (1L << 62)));
    const std::string dir = a.need("out");
    progress p{"writing " + dir};
    const auto c = olmoe::make_synthetic(dir, o, [&](std::size_t done, std::size_t total) { p(double(done) / double(total)); });
    std::fprintf(stderr, "wrote %s: %s, %d layers, d %d, %d experts (top-%d), vocab %d, %s, %d shard(s)\n", dir.c_str(),
                 olmoe::family_name(c.fam), c.layers, c.hidden, c.experts, c.top_k, c.vocab, o.dtype.c_str(), o.shards);
    return 0;
}

int cmd_demo(const args& a)
{
    std::string dir = a.get("dir");
    if (dir.empty()) {
        const char* xdg = std::getenv("XDG_CACHE_HOME");
        const char* home = std::getenv("HOME");
        dir = xdg && *xdg ? cat(xdg, "/kdial/demo") : home && *home ? cat(home, "/.cache/kdial/demo") : "/tmp/kdial-demo";
    }
    std::printf("== kdial demo: a tiny synthetic OLMoE checkpoint in %s\n", dir.c_str());
    args mk;
    mk.opt = {{"out", dir}, {"preset", "tiny"}, {"layers", "2"}, {"dtype", "bf16"}};
    cmd_make_synthetic(mk);
    std::printf("\n== greedy generation at several k (synthetic weights: the text is noise, the k dial is real)\n");
    for (const char* k : {"1", "2", "4", "8"}) {
        args g;
        g.opt = {{"model", dir}, {"prompt", "the experts"}, {"k", k}, {"max-new", "12"}};
        std::printf("k=%s: ", k);
        std::fflush(stdout);
        cmd_generate(g);
    }
    std::printf("\n== bench (prefill 64 tokens, decode 16) at k = 1, 2, 4, 8\n");
    args b;
    b.opt = {{"model", dir}, {"k", "1,2,4,8"}, {"prompt-len", "64"}, {"gen", "16"}};
    cmd_bench(b);
    std::printf("\nNext: olmoe make-synthetic --out DIR --preset olmoe --layers 4, then olmoe bench --model DIR\n");
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
        std::fputs(main_usage, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const std::string cmd = argv[1];
    const auto u = usages.find(cmd);
    if (u == usages.end()) {
        std::fprintf(stderr, "olmoe: unknown command '%s'\n\n%s", cmd.c_str(), main_usage);
        return 2;
    }
    for (int i = 2; i < argc; ++i)
        if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
            std::fputs(u->second.c_str(), stdout);
            return 0;
        }
    try {
        if (cmd == "generate")
            return cmd_generate(parse_args(argc, argv, {"model", "prompt", "tokens", "k", "max-new", "threads", "weights"}, {}));
        if (cmd == "logits")
            return cmd_logits(parse_args(argc, argv, {"model", "tokens", "k", "out", "threads", "weights"}, {}));
        if (cmd == "bench")
            return cmd_bench(parse_args(argc, argv, {"model", "k", "prompt-len", "gen", "threads", "weights"}, {"json"}));
        if (cmd == "make-synthetic")
            return cmd_make_synthetic(parse_args(argc, argv, {"out", "preset", "layers", "dtype", "shards", "seed"}, {}));
        if (cmd == "demo")
            return cmd_demo(parse_args(argc, argv, {"dir"}, {}));
    } catch (const usage_error& e) {
        std::fprintf(stderr, "olmoe %s: %s\n\n%s", cmd.c_str(), e.what(), u->second.c_str());
        return 2;
    } catch (const kdial::error& e) {
        std::fprintf(stderr, "olmoe %s: error: %s\n", cmd.c_str(), e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "olmoe %s: error: %s\n", cmd.c_str(), e.what());
        return 1;
    }
    return 0;
}
