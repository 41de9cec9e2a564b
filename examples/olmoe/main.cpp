// olmoe: run an OLMoE (or Qwen2-MoE / Mixtral) Hugging Face checkpoint on the
// CPU with kdial, k dialed at run time. Subcommands: generate, logits, bench,
// sweep, make-synthetic, demo, tokenize, detokenize. Errors go to stderr with a non-zero exit status;
// long work shows progress on stderr.
#include "cloze.hpp"
#include "compare.hpp"
#include "config.hpp"
#include "expert_parallel.hpp"
#include "demo.hpp"
#include "gguf_model.hpp"
#include "gguf_synthetic.hpp"
#include "model.hpp"
#include "parse.hpp"
#include "runner.hpp"
#include "schedule.hpp"
#include "svg.hpp"
#include "sweep.hpp"
#include "synthetic.hpp"
#include "tokenize_cmd.hpp"
#include "weights.hpp"

#include "roofline.hpp"

#ifdef KDIAL_OLMOE_SERVE
#include "serve/server.hpp"
#endif

#include <kdial/io/file.hpp>
#include <kdial/io/npy.hpp>
#include <kdial/io/tokenizer.hpp>

#include <nlohmann/json.hpp>
#include <tbb/task_arena.h>

#include <sys/resource.h>
#include <unistd.h>

#include <csignal>
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
Mixtral, Qwen3-MoE checkpoints) on the CPU with kdial; k, the number of experts per
token, is a dial set at run time.

commands:
  generate        greedy generation from a prompt or token ids
  logits          logits of every position, written as .npy
  bench           prefill and decode tokens/s for several k, vs the roofline
  sweep           quality vs cost per operating point: perplexity, agreement
                  with a reference k, active parameters, tokens/s, SVG plot
  make-synthetic  write a synthetic checkpoint in the Hugging Face layout
  demo            the main job: a real trained checkpoint (the PHDS one committed
                  in examples/phds) loaded once, text at every k, the dial's table
  tokenize        the token ids (and pieces) of a text, by tokenizer.json
  detokenize      the text of a list of token ids
  serve           OpenAI-compatible HTTP server, k per request, continuous batching

Run 'olmoe <command> --help' for a command's options.
)";

const std::map<std::string, std::string> usages
    = { { "generate", R"(usage: olmoe generate --model DIR [--prompt TEXT | --tokens 1,2,3] [--k K | --k-schedule S]
                      [--renorm] [--max-new N] [--threads N] [--weights native|int8] [--act exact|int8]
                      [--kv f32|bf16] [--check-weights] [--copy-weights] [--allow-long-context]
Greedy generation; streams text (or ids when the model has no tokenizer.json).
  --model DIR     checkpoint directory (config.json, *.safetensors, tokenizer.json),
                  or one GGUF file (llama.cpp's format; F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q5_K/Q6_K)
  --prompt TEXT   prompt text (needs tokenizer.json)
  --tokens LIST   prompt as comma-separated token ids
  --k K           experts per token for every layer (default: the trained k)
  --k-schedule S  a k per layer: "8,8,4,4" (one per layer) or ranges "4@0-7,2@8-15"
  --renorm        renormalise the kept routing weights to sum 1 at any k
                  (overrides norm_topk_prob = false)
  --max-new N     tokens to generate (default 32); stops early at an EOS id
  --threads N     worker threads (default: all cores)
  --weights W     native (as stored, default) or int8 (quantised at load)
  --act A         exact (default: f32 activations) or int8: the activations of
                  q8/q4_0/q4_k weights (decode and prefill) quantised to int8 per
                  block of 32 and integer dot products (faster, slightly different logits)
  --kv T          KV cache element type: f32 (default, exact) or bf16 (half the
                  bytes decode reads per cached position; keys and values rounded
                  once when stored, as a bf16 Hugging Face model keeps them)
  --check-weights scan every weight for NaN / inf at load (names the tensor and element)
  --copy-weights  copy every float weight onto aligned huge-page memory at load, also
                  where the file aligns it (misaligned ones always are; README "Aligned weights")
  --allow-long-context
                  let prompt + generated tokens exceed max_position_embeddings
                  (refused by default: the model was not trained that far)
)" },
          { "logits", R"(usage: olmoe logits --model DIR --tokens 1,2,3 --out FILE.npy [--k K | --k-schedule S]
                    [--renorm] [--threads N] [--weights native|int8] [--act exact|int8] [--check-weights]
                    [--copy-weights] [--kv f32|bf16] [--allow-long-context]
Writes the logits of every position, float32 [T, vocab], in NumPy .npy format
(atomically; FILE may not be one of the checkpoint's files).
)" },
          { "bench", R"(usage: olmoe bench --model DIR [--k 1,2,4,8 | --k-schedule S] [--renorm] [--prompt-len 512]
                   [--gen 32] [--threads N] [--weights native|int8] [--act exact|int8] [--json]
                   [--kv f32|bf16] [--check-weights] [--copy-weights] [--allow-long-context]
Measures prefill and decode tokens/s for each k, with the fraction of the
memory-bandwidth roofline decode reached (weight and KV-cache bytes read per
token / read bandwidth measured in the same run), prefill GFLOP/s as a
fraction of the FMA peak measured in the same run (FLOPs counted from the
config: projections, attention, routers, the k experts, shared/dense MLPs)
and the peak resident memory.
--k-schedule measures that one per-layer schedule instead of a list of k.
)" },
          { "sweep", R"(usage: olmoe sweep --model DIR (--text FILE | --tokens-file FILE) [--k 1,2,4,8] [--ref-k K]
                   [--k-schedule S] [--threshold P[,P...]] [--k-min N] [--k-max N] [--renorm]
                   [--context N] [--decode-tokens N] [--json FILE] [--plot FILE.svg] [--threads N]
                   [--weights native|int8] [--act exact|int8] [--kv f32|bf16] [--check-weights]
                   [--copy-weights] [--cloze FILE.jsonl [--cloze-items N]]
       olmoe sweep --compare [NAME=]FILE.json,[NAME=]FILE.json,... [--plot FILE.svg]
Teacher-forced evaluation of each operating point over the text, printing
perplexity and mean next-token log-likelihood, agreement with the reference k
(share of positions whose argmax matches; mean KL(ref || point) in nats),
experts and parameters used per token, and prefill and decode tokens/s
measured in the same run.
  --text FILE         text, tokenised by the model's tokenizer.json
  --tokens-file FILE  token ids separated by commas and/or whitespace
  --k LIST            global k values (default 1,2,4,8 up to num_experts, and the trained k)
  --ref-k K           reference k of the agreement columns (default: the trained k)
  --k-schedule S      adds a per-layer schedule point ("8,8,4,4" or "4@0-7,2@8-15")
  --threshold LIST    adds threshold-routing points: per token the fewest experts
                      whose routing mass reaches P, clamped to [--k-min, --k-max]
                      (default 1 and the trained k)
  --renorm            renormalise the kept routing weights at every point
  --context N         window length; longer texts are cut into windows that
                      each start from an empty cache (default min(1024, max positions))
  --decode-tokens N   timed single-token decode steps per point (default 32)
  --json FILE         also write the results as JSON
  --plot FILE.svg     write a plot of quality against decode latency
  --check-weights     scan every weight for NaN / inf at load
  --cloze FILE.jsonl  also score a multiple-choice probe at every point (one JSON
                      object per line: "context", "choices" (strings), "answer"
                      (index); examples/phds/make_cloze.py writes one): a
                      candidate's score is the summed log-probability of its
                      tokens after the context, the choice the best candidate;
                      adds the columns cloze accuracy and cloze agreement (share of
                      items whose choice equals the reference k's choice:
                      answer-level cross-sparsity agreement)
  --cloze-items N     score only the first N items
  --compare LIST      no model is run: reads the --json outputs of earlier sweeps
                      (one per model; NAME defaults to the sweep's model directory
                      name), prints a Markdown table per metric (models x global k)
                      and with --plot draws quality against k, one line per model:
                      perplexity, argmax agreement and, when the sweeps scored a
                      cloze probe, cloze accuracy and answer agreement
Outputs are written atomically and may not be inputs of the command.
)" },
          { "make-synthetic", R"(usage: olmoe make-synthetic --out DIR [--preset NAME] [--layers N]
                            [--dtype bf16|f16|f32] [--shards N] [--seed S] [--format safetensors|gguf]
Writes a synthetic checkpoint in the exact Hugging Face layout: config.json,
model.safetensors (or N shards and model.safetensors.index.json), and a small
byte-level BPE tokenizer.json. DIR must be new, empty, or hold only an earlier
make-synthetic output (its .kdial-synthetic marker lists the files it wrote);
no other file is ever replaced or removed. --format gguf writes DIR/model.gguf
instead (llama.cpp's layout, tokenizer included; --dtype f32|f16|bf16|q8_0|q4_0|q4_k),
with the same weights as the safetensors output of the same seed. Presets:
  tiny, olmoe                    OLMoE; olmoe has OLMoE-1B-7B's sizes (d 2048, 16 heads,
                                 F 1024, 64 experts, top-8, vocab 50304)
  tiny-qwen2-moe, qwen2-moe      Qwen1.5-MoE-A2.7B layout (60 experts top-4 of width 1408,
                                 shared expert 5632, q/k/v biases); the tiny one mixes in a
                                 dense MLP layer and sets norm_topk_prob
  tiny-mixtral, mixtral          Mixtral-8x7B layout (w1/w2/w3 experts, GQA); the tiny one
                                 has a sliding window of 8
  tiny-qwen3-moe, qwen3-moe      Qwen3-30B-A3B layout (128 experts top-8 of width 768,
                                 GQA 32/4, head_dim 128, per-head q/k norm), 4 layers; the
                                 tiny one has head_dim != hidden/heads, decoder_sparse_step 2
                                 and an mlp_only layer
)" },
          { "serve", R"(usage: olmoe serve --model DIR [--host 127.0.0.1] [--port 8080] [--threads N] [--max-batch 8]
                   [--max-queue 64] [--ctx 2048] [--prefill-chunk 128] [--k K]
                   [--policy fixed|latency --target-ms X] [--drain-timeout 30] [--weights native|int8]
                   [--kv f32|bf16] [--renorm] [--check-weights] [--copy-weights] [--allow-long-context]
OpenAI-compatible HTTP server (POST /v1/completions, /v1/chat/completions with
"stream": true as server-sent events; GET /v1/models, /health, /metrics).
Requests may set "k", "k_schedule" or "threshold"; otherwise the policy picks k.
  --port N          0: any free port (the line "listening on" names it)
  --max-batch N     slots: sequences decoded together, each with its own KV cache
  --max-queue N     requests waiting for a slot; beyond it 503 with Retry-After
  --ctx N           positions per slot (prompt + completion)
  --prefill-chunk N most tokens per forward step (decode tokens + prompt chunks)
  --policy P        fixed: --k or the trained k; latency: the largest k whose
                    measured decode step at the current batch size is <= --target-ms
  --drain-timeout S on SIGINT/SIGTERM, seconds to finish running requests
See README.md, "olmoe serve".
)" },
          { "demo", R"(usage: olmoe demo [--model DIR] [--prompt TEXT] [--max-new N] [--temperature T [--seed S]]
                  [--text FILE] [--cloze FILE.jsonl] [--cloze-items N] [--threads N]
       olmoe demo --synthetic [--dir DIR]
Loads a trained checkpoint once (default: the PHDS checkpoint committed in the
source tree, examples/phds/checkpoints/phds: a small OLMoE trained on the Brown
corpus and fine-tuned with MoE-PHDS so that one checkpoint serves every k),
generates from one prompt at every k = 1..trained k, and prints the dial's
quality/latency table: perplexity, argmax agreement and KL against the trained
k on a committed slice of the test split, the cloze probe's accuracy and
answer-level agreement, active parameters and decode latency per k.
  --model DIR       the checkpoint (default: examples/phds/checkpoints/phds)
  --prompt TEXT     default "The President said"
  --max-new N       tokens generated at each k (default 32)
  --temperature T   sample (top-p 0.9) instead of greedy, with the same --seed
                    (default 1) at every k
  --text FILE       the sweep's text (default examples/phds/checkpoints/test-slice.txt)
  --cloze FILE      the probe (default examples/phds/checkpoints/cloze-subset.jsonl)
--synthetic makes a tiny synthetic OLMoE checkpoint instead (in --dir DIR; default
$XDG_CACHE_HOME/kdial/demo or ~/.cache/kdial/demo; the same rules as
make-synthetic --out; --dir implies --synthetic) and generates and benchmarks it
at k = 1, 2, 4, 8: random weights, so that text is noise.
)" },
          { "tokenize", R"(usage: olmoe tokenize --model DIR|FILE.gguf (--prompt TEXT | --file F) [--ids-only]
                      [--no-add-special] [--no-parse-special]
Tokenizes a text with the checkpoint's tokenizer.json (only that file is read;
of a GGUF file, its tokenizer metadata, with the BOS it asks for)
as Hugging Face's tokenizer.encode(text) does, and prints one line per token,
"id -> 'piece'" (the piece's bytes; newline, tab, quote, backslash, control
characters and the bytes of a character split over tokens are escaped).
  --prompt TEXT       the text
  --file F            the text of file F, as is (a final newline included)
  --ids-only          print only the ids, as one line "1,2,3"
  --no-add-special    leave out the tokens the post-processor adds (a BOS, ...;
                      HF's add_special_tokens=False)
  --no-parse-special  encode special tokens' strings in the text as plain text
)" },
          { "detokenize", R"(usage: olmoe detokenize --model DIR|FILE.gguf (--ids 1,2,3 | --file F) [--skip-special]
Decodes token ids with the checkpoint's tokenizer (tokenizer.json, or a GGUF
file's tokenizer metadata) and prints the text
exactly, with no newline added (ill-formed UTF-8 becomes U+FFFD).
  --ids LIST        comma-separated token ids
  --file F          token ids separated by commas and/or whitespace
  --skip-special    leave out special tokens
)" } };

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
    const auto x = olmoe::parse_long(v);
    if (!x || *x < lo || *x > hi)
        throw usage_error(cat("--", flag, " expects an integer in [", lo, ", ", hi, "], got '", v, "'"));
    return *x;
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
        if ((flags.count(s) && a.flags.count(s)) || a.opt.count(s))
            throw usage_error(cat("--", s, " is given twice"));
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
    std::shared_ptr<const kdial::io::gguf_file> gguf; // --model FILE.gguf
    std::optional<std::int32_t> prepend_bos; // GGUF tokenizer.ggml.add_bos_token
    std::string no_tokenizer = "tokenizer.json in the model directory"; // what --prompt / --text need
};

loaded load(const args& a, std::size_t max_chunk = 256)
{
    const std::string dir = a.need("model");
    const bool gguf = olmoe::is_gguf_path(dir);
    if (!gguf && !fs::is_directory(dir))
        throw kdial::error(cat(dir, ": not a directory (--model expects a checkpoint directory or a .gguf file)"));
    loaded L;
    if (!gguf)
        L.cfg = olmoe::load_config(dir);
    const std::string wt = a.get("weights", "native");
    if (wt != "native" && wt != "int8")
        throw usage_error(cat("--weights must be native or int8, got '", wt, "'"));
    const std::string act_name = a.get("act", "exact");
    if (act_name != "exact" && act_name != "int8")
        throw usage_error(cat("--act must be exact or int8, got '", act_name, "'"));
    const kdial::act_mode act = act_name == "int8" ? kdial::act_mode::int8 : kdial::act_mode::exact;
    const std::string kv_name = a.get("kv", "f32");
    if (kv_name != "f32" && kv_name != "bf16")
        throw usage_error(cat("--kv must be f32 or bf16, got '", kv_name, "'"));
    const olmoe::kv_dtype kv = kv_name == "bf16" ? olmoe::kv_dtype::bf16 : olmoe::kv_dtype::f32;
    olmoe::load_options o;
    o.int8 = wt == "int8";
    o.max_chunk = max_chunk;
    o.check_weights = a.flags.count("check-weights") != 0;
    o.align = a.flags.count("expert-parallel") == 0; // a rank touches only its own experts' pages
    o.copy_all = a.flags.count("copy-weights") != 0;
    progress p { "loading " + dir };
    o.progress = [&](int done, int total) { p(double(done) / total); };
    if (gguf) { // one GGUF file: config, weights and tokenizer (gguf_model.hpp)
        auto g = olmoe::load_gguf_model(dir, o);
        L.cfg = g.cfg;
        L.gguf = g.file;
        if (g.tok) {
            L.tok.emplace(std::move(g.tok->tok));
            if (g.tok->add_bos)
                L.prepend_bos = g.tok->bos;
        }
        L.no_tokenizer = g.tokenizer_error.empty() ? "a tokenizer in the GGUF metadata" : g.tokenizer_error;
        L.m = std::make_unique<olmoe::model>(std::move(g.weights), max_chunk);
    } else {
        L.m = std::make_unique<olmoe::model>(olmoe::load_weights(dir, L.cfg, o), max_chunk);
        if (fs::exists(fs::symlink_status(fs::path(dir) / "tokenizer.json")))
            L.tok = kdial::io::bpe_tokenizer::from_file(fs::path(dir) / "tokenizer.json");
    }
    // The run-time settings, the same for both formats.
    if (a.flags.count("renorm"))
        L.m->set_renormalize(true);
    L.m->set_act_mode(act);
    L.m->set_kv_dtype(kv);
    L.cfg.kv = kv;
    if (a.flags.count("expert-parallel"))
        olmoe::ep::attach(*L.m);
    return L;
}

// Refuses `positions` tokens in one sequence beyond max_position_embeddings
// unless --allow-long-context is given.
void check_context(const args& a, const olmoe::model_config& c, std::size_t positions, const std::string& what)
{
    if (positions > std::size_t(c.max_positions) && !a.flags.count("allow-long-context"))
        throw kdial::error(cat(what, " = ", positions, " positions exceeds max_position_embeddings = ", c.max_positions,
            " of config.json; pass --allow-long-context to run past it"));
}

// The files a command reads: the checkpoint directory's files and the
// input files given, each with words for messages.
std::vector<std::pair<fs::path, std::string>> input_files(const args& a)
{
    std::vector<std::pair<fs::path, std::string>> in;
    std::error_code ec;
    if (a.has("model") && fs::is_regular_file(a.get("model"), ec))
        in.emplace_back(a.get("model"), "the model file (--model)");
    for (auto it = fs::directory_iterator(a.get("model"), ec); !ec && it != fs::directory_iterator(); it.increment(ec))
        in.emplace_back(it->path(), "a file of the checkpoint directory (--model)");
    for (const char* f : { "text", "tokens-file", "cloze" })
        if (a.has(f))
            in.emplace_back(a.get(f), cat("the input file (--", f, ")"));
    return in;
}

// Refuses an output path (--out, --json, --plot) that is an input of the
// same command: the same file (dev/ino: hard links and symlinks included)
// as an input file or any file of the checkpoint directory, a checkpoint
// file name in that directory, or the same file as another output. Checked
// before the model is loaded.
void check_outputs(const args& a, std::initializer_list<const char*> flags)
{
    const auto in = input_files(a);
    std::vector<std::pair<std::string, fs::path>> outs;
    for (const char* f : flags)
        if (a.has(f)) {
            const fs::path out = a.get(f);
            if (out.empty())
                throw usage_error(cat("--", f, " is empty"));
            for (const auto& [i, what] : in)
                if (kdial::io::same_file(out, i))
                    throw kdial::error(cat("--", f, " ", out.string(), " is ", i.string(), ", ", what,
                        "; refusing to overwrite an input of this command"));
            const std::string name = out.filename().string();
            const bool ck_name = name == "config.json" || name == "tokenizer.json" || name == "tokenizer_config.json"
                || name == "generation_config.json" || name.ends_with(".safetensors")
                || name.ends_with(".safetensors.index.json");
            fs::path parent = out.parent_path();
            if (parent.empty())
                parent = ".";
            std::error_code ec;
            if (!fs::is_directory(parent, ec)) // fail now, not after the run
                throw kdial::error(cat("--", f, " ", out.string(), ": directory ", parent.string(), " does not exist"));
            const auto st = fs::status(out, ec);
            if (fs::exists(st) && !fs::is_regular_file(st)) // a directory, FIFO, /dev/null: never replaced
                throw kdial::error(cat("--", f, " ", out.string(), " is not a regular file (",
                    fs::is_directory(st) ? "a directory" : "a device, FIFO or socket", "); give a file path"));
            if (a.has("model") && ck_name && kdial::io::same_file(parent, a.get("model")))
                throw kdial::error(cat("--", f, " ", out.string(), " is inside the checkpoint directory ",
                    a.get("model"), " under a checkpoint file name; refusing to write there"));
            for (const auto& [g, o] : outs)
                if (o == out || kdial::io::same_file(o, out))
                    throw usage_error(cat("--", f, " and --", g, " are the same file ", out.string()));
            outs.emplace_back(f, out);
        }
}

std::vector<int> k_schedule(const args& a, const olmoe::model_config& c)
{
    if (a.has("k-schedule")) {
        if (a.has("k"))
            throw usage_error("give --k or --k-schedule, not both");
        return olmoe::parse_k_schedule(a.get("k-schedule"), c.layers, c.experts);
    }
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
            throw kdial::error(cat("--prompt needs ", L.no_tokenizer, "; use --tokens instead"));
        ids = L.tok->encode(a.get("prompt"));
        if (L.prepend_bos)
            ids.insert(ids.begin(), *L.prepend_bos);
        if (ids.empty())
            throw kdial::error("--prompt encodes to no tokens");
    } else
        throw usage_error("give --prompt TEXT or --tokens 1,2,3");
    return ids;
}

int threads_of(const args& a)
{
    return a.has("threads") ? int(parse_int("threads", a.get("threads"), 1, 1024))
                            : tbb::this_task_arena::max_concurrency();
}

int cmd_generate(const args& a, std::FILE* out = stdout)
{
    tbb::task_arena arena(threads_of(a));
    return arena.execute([&] {
        auto L = load(a);
        const auto ks = k_schedule(a, L.cfg);
        const auto ids = prompt_tokens(a, L);
        const int max_new = int(parse_int("max-new", a.get("max-new", "32"), 0, 1 << 20));
        check_context(a, L.cfg, ids.size() + std::size_t(max_new), "prompt + --max-new");
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
            const bool eos = std::find(L.cfg.eos_ids.begin(), L.cfg.eos_ids.end(), next) != L.cfg.eos_ids.end();
            if (dec && L.tok->is_valid_id(next)) {
                const std::string piece = dec->push(next); // may hold a NUL byte: write all of it
                std::fwrite(piece.data(), 1, piece.size(), out);
            } else {
                std::fprintf(out, "%s%d", produced ? "," : "", next);
            }
            std::fflush(out);
            if (eos) {
                ++produced;
                break;
            }
            if (produced + 1 < max_new)
                L.m->forward(std::span<const std::int32_t>(&next, 1), cache, ks, lv, false);
        }
        if (dec) {
            const std::string rest = dec->flush();
            std::fwrite(rest.data(), 1, rest.size(), out);
        }
        std::fputc('\n', out);
        const double t_dec = olmoe::seconds_since(t1);
        std::fprintf(stderr, "[k=%s: prompt %zu tokens in %.2f s (%.1f tok/s), %d new tokens in %.2f s (%.1f tok/s)]\n",
            olmoe::schedule_label(ks).c_str(), ids.size(), t_prefill, double(ids.size()) / t_prefill, produced, t_dec,
            produced > 1 ? double(produced - 1) / t_dec : 0.0);
        return 0;
    });
}

int cmd_logits(const args& a)
{
    tbb::task_arena arena(threads_of(a));
    return arena.execute([&] {
        a.need("out");
        check_outputs(a, { "out" });
        auto L = load(a);
        const auto ks = k_schedule(a, L.cfg);
        if (!a.has("tokens"))
            throw usage_error("missing required option --tokens");
        const auto ids = prompt_tokens(a, L);
        const std::string outp = a.need("out");
        check_context(a, L.cfg, ids.size(), "--tokens");
        olmoe::kv_cache cache(L.cfg, ids.size());
        std::vector<float> logits(ids.size() * std::size_t(L.cfg.vocab));
        olmoe::prefill(
            *L.m, ids, cache, ks, kdial::matrix_view<float>(logits.data(), ids.size(), std::size_t(L.cfg.vocab)), true);
        if (olmoe::ep::rank() == 0) // expert parallel: rank 0 writes
            kdial::io::write_npy(outp, logits, ids.size(), std::size_t(L.cfg.vocab));
        std::fprintf(stderr, "wrote %s: float32 [%zu, %d] at k=%s\n", outp.c_str(), ids.size(), L.cfg.vocab,
            olmoe::schedule_label(ks).c_str());
        return 0;
    });
}

double peak_rss_gib()
{
    rusage ru {};
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
        check_context(a, L.cfg, prompt_len + std::size_t(gen), "--prompt-len + --gen");
        std::vector<int> klist
            = a.has("k") ? parse_int_list("k", a.get("k"), 1, 1 << 20) : std::vector<int> { 1, 2, 4, 8 };
        for (int k : klist)
            if (k > L.cfg.experts)
                throw kdial::error(cat("--k ", k, " is outside [1, num_experts = ", L.cfg.experts, "]"));
        std::vector<std::vector<int>> schedules;
        if (a.has("k-schedule"))
            schedules.push_back(k_schedule(a, L.cfg));
        else
            for (int k : klist)
                schedules.emplace_back(std::size_t(L.cfg.layers), k);
        olmoe::prefault(L.m->weights()); // page the weights in before timing
        std::mt19937 rng(7);
        std::vector<std::int32_t> prompt(prompt_len);
        for (auto& t : prompt)
            t = std::int32_t(rng() % std::uint32_t(std::min(L.cfg.vocab, 50000)));
        olmoe::kv_cache cache(L.cfg, prompt_len + std::size_t(gen) + 1);
        std::vector<float> logits(std::size_t(L.cfg.vocab));
        const kdial::matrix_view<float> lv(logits.data(), 1, logits.size());
        struct measured {
            std::string k;
            double prefill_s, decode_s, bytes, prefill_flops;
        };
        std::vector<measured> ms;
        for (const auto& ks : schedules) {
            const std::string k = olmoe::schedule_label(ks);
            progress p { cat("bench k=", k) };
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
                    // Weights streamed plus the KV cache read by attention
                    // (keys and values of every cached position).
                    bytes += double(L.m->last_decode_bytes()) + double(cache.pos) * double(cache.bytes_per_position());
                }
                next = olmoe::argmax(logits);
                p(0.5 + 0.5 * (g + 1) / gen);
            }
            ms.push_back({ k, tp, td, bytes, olmoe::prefill_flops(L.cfg, prompt_len, ks) });
        }
        // Peak memory before the bandwidth probe (which allocates 1.5 GiB).
        const double rss = peak_rss_gib();
        const double copied = double(L.m->weights().arena.bytes()) / double(1 << 30);
        std::fprintf(stderr, "measuring this machine's limits with %d threads...\n", threads);
        const auto lim = kdial::bench::machine_limits();
        std::size_t ck_bytes = L.gguf ? L.gguf->bytes().size() : 0;
        if (!L.gguf)
            for (const auto& e : fs::directory_iterator(a.get("model")))
                if (e.path().extension() == ".safetensors")
                    ck_bytes += std::size_t(e.file_size());
        nlohmann::json rows = nlohmann::json::array();
        if (!a.flags.count("json"))
            std::fprintf(out, "%4s %14s %14s %10s %14s %12s %12s %10s\n", "k", "prefill tok/s", "prefill GF/s",
                "of peak", "decode tok/s", "GB/token", "decode GB/s", "roofline");
        for (const auto& m : ms) {
            const double n = gen - 1;
            const double gbs = m.bytes / m.decode_s / 1e9;
            const double gfs = m.prefill_flops / m.prefill_s / 1e9;
            nlohmann::json kj = m.k;
            if (m.k.find_first_not_of("0123456789") == std::string::npos)
                kj = std::stoi(m.k);
            rows.push_back({ { "k", kj }, { "prefill_tokens", prompt_len },
                { "prefill_tok_s", double(prompt_len) / m.prefill_s }, { "prefill_gflop_s", gfs },
                { "prefill_fma_fraction", gfs / lim.fma_gflops }, { "decode_tokens", n },
                { "decode_tok_s", n / m.decode_s }, { "decode_bytes_per_token", m.bytes / n }, { "decode_gb_s", gbs },
                { "roofline_fraction", gbs / lim.read_gbs } });
            if (!a.flags.count("json"))
                std::fprintf(out, "%4s %14.1f %14.1f %10.2f %14.2f %12.4f %12.2f %10.2f\n", m.k.c_str(),
                    double(prompt_len) / m.prefill_s, gfs, gfs / lim.fma_gflops, n / m.decode_s, m.bytes / n / 1e9, gbs,
                    gbs / lim.read_gbs);
        }
        const nlohmann::json result = { { "model", a.get("model") }, { "weights", a.get("weights", "native") },
            { "threads", threads }, { "read_bandwidth_gb_s", lim.read_gbs }, { "fma_peak_gflop_s", lim.fma_gflops },
            { "peak_rss_gib", rss }, { "checkpoint_gib", double(ck_bytes) / double(1 << 30) }, { "copied_gib", copied },
            { "results", rows } };
        if (a.flags.count("json"))
            std::fprintf(out, "%s\n", result.dump(2).c_str());
        else {
            std::fprintf(out,
                "limits measured in this run (%d threads): read %.1f GB/s, FMA %.0f GFLOP/s\n"
                "peak RSS %.2f GiB, checkpoint %.2f GiB (memory-mapped; %.2f GiB of weights copied at load: "
                "converted, or moved onto 64-byte alignment)\n",
                threads, lim.read_gbs, lim.fma_gflops, rss, double(ck_bytes) / double(1 << 30), copied);
            if (a.flags.count("expert-parallel"))
                std::fprintf(out, "%s\n", olmoe::ep::summary().c_str());
            if (ck_bytes < (std::size_t(256) << 20))
                std::fprintf(out,
                    "note: this checkpoint fits in the CPU caches, so decode can beat the DRAM "
                    "roofline; use --preset olmoe for a meaningful fraction\n");
        }
        return 0;
    });
}

double parse_prob(const std::string& flag, const std::string& v)
{
    char* end = nullptr;
    const double x = std::strtod(v.c_str(), &end);
    if (v.empty() || *end || !(x >= 0.0 && x <= 1.0))
        throw usage_error(cat("--", flag, " expects probabilities in [0, 1], got '", v, "'"));
    return x;
}

// `olmoe sweep --compare`: tables and one plot from earlier sweeps' JSON.
int cmd_sweep_compare(const args& a, std::FILE* out)
{
    for (const auto& [k, v] : a.opt)
        if (k != "compare" && k != "plot")
            throw usage_error(cat("--compare takes only --plot, not --", k));
    if (!a.flags.empty())
        throw usage_error(cat("--compare takes only --plot, not --", *a.flags.begin()));
    std::vector<std::string> specs;
    const std::string v = a.get("compare");
    for (std::size_t p = 0; p <= v.size();) {
        const std::size_t q = std::min(v.find(',', p), v.size());
        specs.push_back(v.substr(p, q - p));
        p = q + 1;
    }
    if (a.has("plot")) {
        check_outputs(a, { "plot" });
        for (const auto& sp : specs) {
            const std::string f = sp.substr(sp.find('=') == std::string::npos ? 0 : sp.find('=') + 1);
            if (kdial::io::same_file(a.get("plot"), f))
                throw kdial::error(cat("--plot ", a.get("plot"), " is ", f,
                    ", an input file (--compare); refusing to "
                    "overwrite an input of this command"));
        }
    }
    std::vector<olmoe::compared_model> models;
    for (const auto& sp : specs)
        models.push_back(olmoe::read_compared(sp));
    const std::string tables = olmoe::compare_tables(models);
    std::fwrite(tables.data(), 1, tables.size(), out);
    if (a.has("plot")) {
        std::string title = "quality vs k:";
        for (std::size_t i = 0; i < models.size(); ++i)
            title += (i ? ", " : " ") + models[i].name;
        olmoe::svg::write(a.get("plot"), title, olmoe::compare_panels(models), olmoe::compare_names(models), 2);
        std::fprintf(stderr, "wrote %s\n", a.get("plot").c_str());
    }
    return 0;
}

int cmd_sweep(const args& a, std::FILE* out = stdout)
{
    if (a.has("compare"))
        return cmd_sweep_compare(a, out);
    const int threads = threads_of(a);
    tbb::task_arena arena(threads);
    return arena.execute([&] {
        if (a.has("text") == a.has("tokens-file"))
            throw usage_error("give --text FILE or --tokens-file FILE");
        check_outputs(a, { "json", "plot" });
        const std::string src = a.has("text") ? a.get("text") : a.get("tokens-file");
        const std::string text = kdial::io::read_file(src, std::size_t(1) << 30); // before the (slow) load
        auto L = load(a);
        const auto& c = L.cfg;
        std::vector<std::int32_t> tokens;
        if (a.has("text")) {
            if (!L.tok)
                throw kdial::error(cat("--text needs ", L.no_tokenizer, "; use --tokens-file instead"));
            tokens = L.tok->encode(text);
        } else
            tokens = olmoe::parse_token_ids(text, src, c.vocab);
        if (tokens.size() < 2)
            throw kdial::error(cat(src, ": ", tokens.size(), " tokens; the sweep needs at least 2"));

        auto global = [&](int k, const char* flag = "k") {
            if (k < 1 || k > c.experts)
                throw kdial::error(cat("--", flag, " ", k, " is outside [1, num_experts = ", c.experts, "]"));
            return olmoe::operating_point { cat("k=", k), std::vector<int>(std::size_t(c.layers), k), std::nullopt };
        };
        std::vector<olmoe::operating_point> points;
        std::vector<int> klist;
        if (a.has("k"))
            klist = parse_int_list("k", a.get("k"), 1, 1 << 20);
        else {
            for (int k : { 1, 2, 4, 8 })
                if (k <= c.experts)
                    klist.push_back(k);
            if (std::find(klist.begin(), klist.end(), c.top_k) == klist.end())
                klist.push_back(c.top_k);
            std::sort(klist.begin(), klist.end());
        }
        for (int k : klist)
            points.push_back(global(k));
        if (a.has("k-schedule")) {
            auto ks = olmoe::parse_k_schedule(a.get("k-schedule"), c.layers, c.experts);
            points.push_back({ olmoe::schedule_label(ks), ks, std::nullopt });
        }
        const int kmin = a.has("k-min") ? int(parse_int("k-min", a.get("k-min"), 1, c.experts)) : 1;
        const int kmax = a.has("k-max") ? int(parse_int("k-max", a.get("k-max"), 1, c.experts)) : c.top_k;
        if (a.has("threshold")) {
            if (kmin > kmax)
                throw usage_error(cat("--k-min ", kmin, " is larger than --k-max ", kmax));
            const std::string v = a.get("threshold");
            for (std::size_t p = 0; p <= v.size();) {
                const std::size_t q = std::min(v.find(',', p), v.size());
                const double pr = parse_prob("threshold", v.substr(p, q - p));
                points.push_back({ cat("p=", v.substr(p, q - p)), std::vector<int>(std::size_t(c.layers), kmax),
                    kdial::threshold_options { float(pr), kmin, kmax } });
                p = q + 1;
            }
        }
        const int ref_k = a.has("ref-k") ? int(parse_int("ref-k", a.get("ref-k"), 1, 1 << 20)) : c.top_k;
        const auto ref = global(ref_k, "ref-k");
        olmoe::sweep_options o;
        o.context = a.has("context") ? std::size_t(parse_int("context", a.get("context"), 2, 1 << 24))
                                     : std::size_t(std::min(1024, std::max(2, c.max_positions)));
        if (o.context > std::size_t(c.max_positions))
            throw kdial::error(cat("--context ", o.context, " exceeds max_position_embeddings = ", c.max_positions));
        o.decode_tokens = std::size_t(parse_int("decode-tokens", a.get("decode-tokens", "32"), 1, 1 << 20));
        std::fprintf(stderr, "sweep: %zu tokens, %zu operating points, reference %s, windows of %zu tokens\n",
            tokens.size(), points.size(), ref.label.c_str(), o.context);
        progress pr { "sweep" };
        const auto res = olmoe::run_sweep(*L.m, tokens, points, ref, o, [&](double fr, const std::string& what) {
            pr.what = "sweep (" + what + ")";
            pr(fr);
        });
        std::vector<olmoe::cloze_result> cz; // [points] when --cloze
        if (a.has("cloze")) {
            if (!L.tok)
                throw kdial::error(cat("--cloze needs ", L.no_tokenizer));
            const auto items = olmoe::load_cloze(a.get("cloze"), *L.tok,
                a.has("cloze-items") ? std::size_t(parse_int("cloze-items", a.get("cloze-items"), 1, 1L << 30)) : 0);
            progress cp { "cloze" };
            cz = olmoe::run_cloze(*L.m, items, points, ref, [&](double fr, const std::string& what) {
                cp.what = what;
                cp(fr);
            });
        }

        std::fprintf(out, "%-14s %10s %9s %8s %9s %8s %12s %11s %11s %10s%s\n", "point", "perplexity", "loglik",
            "agree", "KL", "exp/tok", "active Mpar", "prefill t/s", "decode t/s", "decode ms",
            cz.empty() ? "" : "  cloze acc  cloze agr");
        nlohmann::json rows = nlohmann::json::array();
        for (std::size_t i = 0; i < res.size(); ++i) {
            const auto& r = res[i];
            std::fprintf(out, "%-14s %10.3f %9.4f %8.4f %9.5f %8.2f %12.1f %11.1f %11.2f %10.2f", r.point.label.c_str(),
                r.perplexity, r.mean_loglik, r.agreement, r.mean_kl, r.experts_per_token, r.active_params / 1e6,
                r.prefill_tok_s(), r.decode_tok_s(), r.decode_ms());
            if (!cz.empty())
                std::fprintf(out, " %10.4f %10.4f", cz[i].accuracy, cz[i].agreement);
            std::fputc('\n', out);
            nlohmann::json j = { { "label", r.point.label }, { "predicted_tokens", r.predicted },
                { "perplexity", r.perplexity }, { "mean_loglik", r.mean_loglik }, { "agreement", r.agreement },
                { "mean_kl", r.mean_kl }, { "experts_per_token", r.experts_per_token },
                { "active_expert_params_per_token", r.active_expert_params },
                { "active_params_per_token", r.active_params }, { "prefill_tokens", r.prefill_tokens },
                { "prefill_tok_s", r.prefill_tok_s() }, { "decode_steps", r.decode_steps },
                { "decode_tok_s", r.decode_tok_s() }, { "decode_ms_per_token", r.decode_ms() } };
            if (r.point.threshold)
                j["threshold"] = { { "p", r.point.threshold->p }, { "k_min", r.point.threshold->k_min },
                    { "k_max", r.point.threshold->k_max } };
            else
                j["k_per_layer"] = r.point.k_per_layer;
            if (!cz.empty()) {
                j["cloze_accuracy"] = cz[i].accuracy;
                j["cloze_agreement"] = cz[i].agreement;
                j["cloze_choices"] = cz[i].picks;
            }
            rows.push_back(j);
        }
        if (!cz.empty())
            std::fprintf(out, "cloze: %zu items of %s; agreement: share of items whose choice equals %s's\n",
                cz[0].items, a.get("cloze").c_str(), ref.label.c_str());
        std::fprintf(out,
            "agreement and KL against %s; %zu positions; prefill tok/s with logits at every position; "
            "active parameters exclude the embedding\n",
            ref.label.c_str(), res.empty() ? std::size_t(0) : res[0].predicted);
        if (a.has("json")) {
            nlohmann::json doc = { { "model", a.get("model") }, { "source", src }, { "tokens", tokens.size() },
                { "reference", ref.label }, { "renorm", a.flags.count("renorm") != 0 }, { "context", o.context },
                { "threads", threads }, { "weights", a.get("weights", "native") },
                { "params_per_expert", L.m->params_per_expert() }, { "always_on_params", L.m->always_on_params() },
                { "points", rows } };
            if (!cz.empty())
                doc["cloze"] = { { "file", a.get("cloze") }, { "items", cz[0].items } };
            kdial::io::write_file_atomic(a.get("json"), doc.dump(2) + "\n");
            std::fprintf(stderr, "wrote %s\n", a.get("json").c_str());
        }
        if (a.has("plot")) {
            olmoe::svg::panel ppl { "perplexity vs decode latency", "decode latency (ms / token)", "perplexity", {} };
            olmoe::svg::panel agr { cat("agreement with ", ref.label, " vs decode latency"),
                "decode latency (ms / token)", cat("argmax agreement with ", ref.label), {} };
            for (const auto& r : res) {
                // Global k values form the curve; schedules and thresholds are extra points.
                const bool curve = !r.point.threshold && r.point.label.rfind("k=", 0) == 0;
                ppl.points.push_back({ r.decode_ms(), r.perplexity, r.point.label, curve });
                agr.points.push_back({ r.decode_ms(), r.agreement, r.point.label, curve });
            }
            olmoe::svg::write(a.get("plot"),
                cat("olmoe sweep: ", fs::path(a.get("model")).filename().string(), ", ", tokens.size(), " tokens, ",
                    threads, " threads"),
                { ppl, agr });
            std::fprintf(stderr, "wrote %s\n", a.get("plot").c_str());
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
    if (dir.empty())
        throw usage_error("--out is empty");
    progress p { "writing " + dir };
    const std::string format = a.get("format", "safetensors");
    if (format != "safetensors" && format != "gguf")
        throw usage_error(cat("--format must be safetensors or gguf, got '", format, "'"));
    const auto report = [&](std::size_t done, std::size_t total) { p(double(done) / double(total)); };
    const auto c
        = format == "gguf" ? olmoe::make_synthetic_gguf(dir, o, report) : olmoe::make_synthetic(dir, o, report);
    std::fprintf(stderr, "wrote %s: %s, %d layers, d %d, %d experts (top-%d), vocab %d, %s, %d shard(s)\n", dir.c_str(),
        olmoe::family_name(c.fam), c.layers, c.hidden, c.experts, c.top_k, c.vocab, o.dtype.c_str(), o.shards);
    return 0;
}

// The default demo directory as kdial releases before the .kdial-synthetic
// marker left it: exactly the three files that demo wrote, nothing else. It
// is kdial's own cache directory, so it is adopted (the marker is written
// for those files) instead of refused. Any other content is left to
// make-synthetic's rules.
void adopt_legacy_demo_dir(const std::string& dir)
{
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::is_directory(fs::symlink_status(dir, ec))
        || fs::exists(fs::symlink_status(fs::path(dir) / olmoe::synth::marker_name, ec)))
        return;
    const std::set<std::string> legacy { "config.json", "model.safetensors", "tokenizer.json" };
    std::set<std::string> found;
    for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
        const std::string n = it->path().filename().string();
        if (!legacy.count(n) || !it->is_regular_file(ec) || it->is_symlink(ec))
            return;
        found.insert(n);
    }
    if (ec || found.empty())
        return;
    olmoe::synth::write_marker(dir, found);
}

int cmd_demo(const args& a)
{
    if (!a.flags.count("synthetic") && !a.has("dir")) { // the real checkpoint (demo.hpp)
        olmoe::demo_options o;
        o.model_dir = a.get("model", o.model_dir);
        o.prompt = a.get("prompt", o.prompt);
        o.max_new = int(parse_int("max-new", a.get("max-new", "32"), 1, 4096));
        if (a.has("temperature")) {
            char* end = nullptr;
            o.temperature = std::strtod(a.get("temperature").c_str(), &end);
            if (*end || !(o.temperature >= 0 && o.temperature <= 100))
                throw usage_error(cat("--temperature expects a number in [0, 100], got '", a.get("temperature"), "'"));
        }
        o.seed = std::uint64_t(parse_int("seed", a.get("seed", "1"), 0, (1L << 62)));
        o.text = a.get("text", o.text);
        o.cloze = a.get("cloze", o.cloze);
        if (a.has("cloze-items"))
            o.cloze_items = std::size_t(parse_int("cloze-items", a.get("cloze-items"), 1, 1L << 30));
        tbb::task_arena arena(threads_of(a));
        return arena.execute([&] { return olmoe::run_demo(o, stdout); });
    }
    for (const auto& [k, v] : a.opt)
        if (k != "dir")
            throw usage_error(cat("--", k, " is an option of the real-checkpoint demo, not of --synthetic"));
    std::string dir = a.get("dir");
    if (a.has("dir") && dir.empty())
        throw usage_error("--dir is empty");
    if (dir.empty()) {
        const char* xdg = std::getenv("XDG_CACHE_HOME");
        const char* home = std::getenv("HOME");
        dir = xdg && *xdg   ? cat(xdg, "/kdial/demo")
            : home && *home ? cat(home, "/.cache/kdial/demo")
                            : "/tmp/kdial-demo";
    }
    if (!a.has("dir"))
        adopt_legacy_demo_dir(dir);
    std::printf("== kdial demo: a tiny synthetic OLMoE checkpoint in %s\n", dir.c_str());
    args mk;
    mk.opt = { { "out", dir }, { "preset", "tiny" }, { "layers", "2" }, { "dtype", "bf16" } };
    cmd_make_synthetic(mk);
    std::printf("\n== greedy generation at several k (synthetic weights: the text is noise, the k dial is real)\n");
    for (const char* k : { "1", "2", "4", "8" }) {
        args g;
        g.opt = { { "model", dir }, { "prompt", "the experts" }, { "k", k }, { "max-new", "12" } };
        std::printf("k=%s: ", k);
        std::fflush(stdout);
        cmd_generate(g);
    }
    std::printf("\n== bench (prefill 64 tokens, decode 16) at k = 1, 2, 4, 8\n");
    args b;
    b.opt = { { "model", dir }, { "k", "1,2,4,8" }, { "prompt-len", "64" }, { "gen", "16" } };
    cmd_bench(b);
    std::printf("\nNext: olmoe make-synthetic --out DIR --preset olmoe --layers 4, then olmoe bench --model DIR\n");
    return 0;
}

int cmd_tokenize(const args& a)
{
    if (a.has("prompt") == a.has("file"))
        throw usage_error("give --prompt TEXT or --file F");
    std::optional<std::int32_t> bos; // a GGUF file's add_bos_token, as generate prepends it
    const auto tok = olmoe::load_tokenizer(a.need("model"), &bos);
    const std::string text
        = a.has("prompt") ? a.get("prompt") : kdial::io::read_file(a.get("file"), std::size_t(1) << 30);
    const bool add_special = !a.flags.count("no-add-special");
    auto ids = tok.encode(text, !a.flags.count("no-parse-special"), add_special);
    if (bos && add_special)
        ids.insert(ids.begin(), *bos);
    olmoe::print_tokens(stdout, tok, ids, a.flags.count("ids-only") != 0);
    return 0;
}

int cmd_detokenize(const args& a)
{
    if (a.has("ids") == a.has("file"))
        throw usage_error("give --ids 1,2,3 or --file F");
    std::vector<std::int32_t> ids;
    if (a.has("ids"))
        for (int id : parse_int_list("ids", a.get("ids"), 0, (1L << 31) - 1))
            ids.push_back(id);
    const auto tok = olmoe::load_tokenizer(a.need("model"));
    if (a.has("file"))
        ids = olmoe::read_token_ids(a.get("file"), tok);
    olmoe::print_text(stdout, tok, ids, a.flags.count("skip-special") != 0);
    return 0;
}

int cmd_serve(const args& a)
{
#ifdef KDIAL_OLMOE_SERVE
    namespace sv = olmoe::serve;
    sv::server_options o;
    o.host = a.get("host", "127.0.0.1");
    o.port = int(parse_int("port", a.get("port", "8080"), 0, 65535));
    o.engine.threads = threads_of(a);
    o.engine.max_batch = std::size_t(parse_int("max-batch", a.get("max-batch", "8"), 1, 256));
    o.engine.max_queue = std::size_t(parse_int("max-queue", a.get("max-queue", "64"), 0, 1 << 16));
    o.engine.prefill_chunk = std::size_t(parse_int("prefill-chunk", a.get("prefill-chunk", "128"), 1, 4096));
    o.drain_timeout
        = std::chrono::milliseconds(1000 * parse_int("drain-timeout", a.get("drain-timeout", "30"), 0, 3600));
    const std::string policy = a.get("policy", "fixed");
    if (policy != "fixed" && policy != "latency")
        throw usage_error(cat("--policy must be fixed or latency, got '", policy, "'"));
    if ((policy == "latency") != a.has("target-ms"))
        throw usage_error("--target-ms goes with --policy latency (and is required by it)");
    auto L = load(a, std::max<std::size_t>(256, o.engine.prefill_chunk));
    const auto& c = L.cfg;
    o.engine.ctx
        = std::size_t(parse_int("ctx", a.get("ctx", std::to_string(std::min(2048, c.max_positions))), 2, 1 << 20));
    check_context(a, c, o.engine.ctx, "--ctx");
    const int k = a.has("k") ? int(parse_int("k", a.get("k"), 1, 1 << 20)) : c.top_k;
    if (k > c.experts)
        throw kdial::error(cat("--k ", k, " is outside [1, num_experts = ", c.experts, "]"));
    std::unique_ptr<sv::k_policy> pol;
    std::string desc;
    if (policy == "latency") {
        char* end = nullptr;
        const double ms = std::strtod(a.get("target-ms").c_str(), &end);
        if (*end || !(ms > 0))
            throw usage_error(cat("--target-ms expects a positive number, got '", a.get("target-ms"), "'"));
        pol = std::make_unique<sv::latency_policy>(ms / 1e3, k, o.engine.max_batch);
        desc = cat("latency (target ", ms, " ms, k <= ", k, ")");
    } else {
        pol = std::make_unique<sv::fixed_policy>(k);
        desc = cat("fixed (k = ", k, ")");
    }
    o.model_name = fs::path(a.get("model")).lexically_normal().filename().string();
    if (o.model_name.empty())
        o.model_name = fs::path(a.get("model")).lexically_normal().parent_path().filename().string();
    return sv::run_server(*L.m, L.tok ? &*L.tok : nullptr, o, std::move(pol), desc);
#else
    (void)a;
    throw kdial::error("this olmoe was built without cpp-httplib, so 'serve' is not available; install "
                       "libcpp-httplib-dev and pkg-config, then re-run cmake");
#endif
}

} // namespace

int main(int argc, char** argv)
{
    // A file-size limit (ulimit -f) makes writes fail with EFBIG, reported
    // with the file's name, instead of killing the process.
    std::signal(SIGXFSZ, SIG_IGN);
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
        if (olmoe::ep::requested(argc, argv))
            olmoe::ep::init(argc, argv);
        if (cmd == "generate")
            return cmd_generate(parse_args(argc, argv,
                { "model", "prompt", "tokens", "k", "k-schedule", "max-new", "threads", "weights", "act", "kv" },
                { "renorm", "check-weights", "allow-long-context", "expert-parallel", "copy-weights" }));
        if (cmd == "logits")
            return cmd_logits(parse_args(argc, argv,
                { "model", "tokens", "k", "k-schedule", "out", "threads", "weights", "act", "kv" },
                { "renorm", "check-weights", "allow-long-context", "expert-parallel", "copy-weights" }));
        if (cmd == "bench")
            return cmd_bench(parse_args(argc, argv,
                { "model", "k", "k-schedule", "prompt-len", "gen", "threads", "weights", "act", "kv" },
                { "json", "renorm", "check-weights", "allow-long-context", "expert-parallel", "copy-weights" }));
        if (cmd == "sweep")
            return cmd_sweep(parse_args(argc, argv,
                { "model", "text", "tokens-file", "k", "ref-k", "k-schedule", "threshold", "k-min", "k-max", "context",
                    "decode-tokens", "json", "plot", "threads", "weights", "act", "kv", "cloze", "cloze-items",
                    "compare" },
                { "renorm", "check-weights", "copy-weights" }));
        if (cmd == "make-synthetic")
            return cmd_make_synthetic(
                parse_args(argc, argv, { "out", "preset", "layers", "dtype", "shards", "seed", "format" }, {}));
        if (cmd == "demo")
            return cmd_demo(parse_args(argc, argv,
                { "dir", "model", "prompt", "max-new", "temperature", "seed", "text", "cloze", "cloze-items",
                    "threads" },
                { "synthetic" }));
        if (cmd == "tokenize")
            return cmd_tokenize(parse_args(
                argc, argv, { "model", "prompt", "file" }, { "ids-only", "no-add-special", "no-parse-special" }));
        if (cmd == "detokenize")
            return cmd_detokenize(parse_args(argc, argv, { "model", "ids", "file" }, { "skip-special" }));
        if (cmd == "serve")
            return cmd_serve(parse_args(argc, argv,
                { "model", "host", "port", "threads", "max-batch", "max-queue", "ctx", "prefill-chunk", "k", "policy",
                    "target-ms", "drain-timeout", "weights", "kv" },
                { "renorm", "check-weights", "allow-long-context", "copy-weights" }));
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
