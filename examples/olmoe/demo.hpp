// `olmoe demo`: the main job on a real trained checkpoint. Loads one model
// once (by default the PHDS checkpoint committed in the source tree,
// examples/phds/checkpoints/phds: a small OLMoE trained on the Brown corpus
// and fine-tuned with MoE-PHDS so that it serves every k), generates from
// one prompt at every k = 1..k_pre from that same loaded model, then prints
// the quality/latency table of the dial: `olmoe sweep` on a committed slice
// of the test split (perplexity, argmax agreement and KL against the trained
// k, decode latency) and the committed cloze subset (accuracy and
// answer-level agreement). Sized to run in seconds on two cores.
#pragma once

#include "cloze.hpp"
#include "config.hpp"
#include "model.hpp"
#include "runner.hpp"
#include "sweep.hpp"
#include "weights.hpp"

#include <kdial/core/error.hpp>
#include <kdial/io/file.hpp>
#include <kdial/io/tokenizer.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace olmoe {

// Where the demo's committed files live: KDIAL_SOURCE_DIR (the source tree,
// a compile definition of the olmoe target) + examples/phds/checkpoints.
inline std::string demo_checkpoints_dir()
{
#ifdef KDIAL_SOURCE_DIR
    return std::string(KDIAL_SOURCE_DIR) + "/examples/phds/checkpoints";
#else
    return "examples/phds/checkpoints";
#endif
}

struct demo_options {
    std::string model_dir = demo_checkpoints_dir() + "/phds";
    std::string text = demo_checkpoints_dir() + "/test-slice.txt"; // the sweep's text ("" or missing: skipped)
    std::string cloze = demo_checkpoints_dir() + "/cloze-subset.jsonl"; // the probe ("" or missing: skipped)
    std::size_t cloze_items = 0; // 0: all of the file
    std::string prompt = "The President said";
    int max_new = 32; // tokens generated at each k
    double temperature = 0.0; // 0: greedy; else sampling with this temperature and top_p
    double top_p = 0.9;
    std::uint64_t seed = 1; // sampling seed, the same at every k
    std::size_t context = 256; // sweep windows: the training sequence length of examples/phds
    std::size_t decode_tokens = 16; // timed decode steps per k
};

namespace demo_detail {

// Picks the next token: the argmax, or a sample from the top_p nucleus of
// softmax(logits / temperature) drawn with u in [0, 1).
inline std::int32_t pick(const std::vector<float>& logits, double temperature, double top_p, double u,
    std::vector<std::pair<double, std::int32_t>>& scratch)
{
    if (temperature <= 0)
        return argmax(logits);
    scratch.clear();
    double m = logits[0];
    for (float x : logits)
        m = std::max(m, double(x));
    double s = 0;
    for (std::size_t i = 0; i < logits.size(); ++i) {
        const double p = std::exp((double(logits[i]) - m) / temperature);
        scratch.emplace_back(p, std::int32_t(i));
        s += p;
    }
    // Descending probability, ties by the lower id: a fixed order.
    std::sort(scratch.begin(), scratch.end(),
        [](const auto& a, const auto& b) { return a.first != b.first ? a.first > b.first : a.second < b.second; });
    double mass = 0;
    std::size_t n = 0;
    while (n < scratch.size() && (n == 0 || mass < top_p * s))
        mass += scratch[n++].first;
    double acc = 0;
    for (std::size_t i = 0; i < n; ++i) {
        acc += scratch[i].first;
        if (u * mass < acc)
            return scratch[i].second;
    }
    return scratch[n - 1].second;
}

// One line of text for the terminal: newlines shown as " / ".
inline std::string one_line(const std::string& s)
{
    std::string o;
    for (char c : s)
        if (c == '\n')
            o += " / ";
        else if (c != '\r')
            o += c;
    return o;
}

inline std::string describe_training(const std::string& dir)
{
    namespace fs = std::filesystem;
    try {
        const auto j
            = nlohmann::json::parse(kdial::io::read_file_checked(fs::path(dir) / "config.json", "config file"));
        if (!j.contains("kdial_phds") || !j["kdial_phds"].is_object())
            return "";
        const auto& t = j["kdial_phds"];
        std::string d;
        if (t.contains("phds_ks") && t["phds_ks"].is_array() && !t["phds_ks"].empty()) {
            d = "fine-tuned with PHDS over k in {";
            for (std::size_t i = 0; i < t["phds_ks"].size(); ++i)
                d += (i ? "," : "") + t["phds_ks"][i].dump();
            d += "}";
            if (t.contains("anchor_k") && t["anchor_k"].is_number() && t.value("anneal_steps", 0) > 0)
                d += kdial::detail::cat(", annealed to k=", t["anchor_k"].get<int>());
        } else if (t.contains("k") && t["k"].is_number())
            d = kdial::detail::cat("trained at k=", t["k"].get<int>());
        if (t.contains("steps") && t["steps"].is_number())
            d += kdial::detail::cat(d.empty() ? "" : ", ", t["steps"].get<int>(), " steps");
        return d;
    } catch (const std::exception&) {
        return ""; // a description only: the loader reports real problems
    }
}

} // namespace demo_detail

// Runs the demo; prints to out. Threads: the caller's task arena.
inline int run_demo(const demo_options& o, std::FILE* out)
{
    namespace fs = std::filesystem;
    using kdial::detail::cat;
    using kdial::detail::check;
    check(fs::is_directory(o.model_dir), o.model_dir,
        ": no checkpoint directory there (the demo's default is the PHDS checkpoint committed in the source "
        "tree); give --model DIR, or --synthetic for a tiny synthetic checkpoint");
    const auto t_load = std::chrono::steady_clock::now();
    const auto cfg = load_config(o.model_dir);
    load_options lo;
    lo.max_chunk = 256;
    model m(load_weights(o.model_dir, cfg, lo), lo.max_chunk);
    const auto tok = kdial::io::bpe_tokenizer::from_file(fs::path(o.model_dir) / "tokenizer.json");
    const double load_s = seconds_since(t_load);
    const std::string trained = demo_detail::describe_training(o.model_dir);
    std::fprintf(out, "== kdial demo: %s\n   OLMoE layout, %d layers, d %d, %d experts, trained top-%d, vocab %d%s%s\n",
        o.model_dir.c_str(), cfg.layers, cfg.hidden, cfg.experts, cfg.top_k, cfg.vocab, trained.empty() ? "" : "; ",
        trained.c_str());
    std::fprintf(out, "   loaded once in %.2f s; every k below runs on these same weights\n", load_s);

    // Generation at every k from one prompt.
    const auto prompt = tok.encode(o.prompt);
    check(!prompt.empty(), "--prompt encodes to no tokens");
    check(prompt.size() + std::size_t(o.max_new) <= std::size_t(cfg.max_positions),
        "--prompt + --max-new: ", prompt.size() + std::size_t(o.max_new),
        " positions exceed max_position_embeddings = ", cfg.max_positions);
    if (o.temperature > 0)
        std::fprintf(out, "\n== sampling (temperature %g, top-p %g, seed %llu, the same at every k) from \"%s\"\n",
            o.temperature, o.top_p, static_cast<unsigned long long>(o.seed), o.prompt.c_str());
    else
        std::fprintf(out, "\n== greedy generation from \"%s\" at every k\n", o.prompt.c_str());
    kv_cache cache(cfg, prompt.size() + std::size_t(o.max_new) + 1);
    std::vector<float> logits(std::size_t(cfg.vocab));
    const kdial::matrix_view<float> lv(logits.data(), 1, logits.size());
    std::vector<std::pair<double, std::int32_t>> scratch;
    for (int k = 1; k <= cfg.top_k; ++k) {
        const std::vector<int> ks(std::size_t(cfg.layers), k);
        std::mt19937_64 rng(o.seed);
        cache.reset();
        prefill(m, prompt, cache, ks, lv, false);
        std::vector<std::int32_t> gen;
        for (int i = 0; i < o.max_new; ++i) {
            const double u = double(rng() >> 11) * 0x1.0p-53;
            const std::int32_t next = demo_detail::pick(logits, o.temperature, o.top_p, u, scratch);
            if (std::find(cfg.eos_ids.begin(), cfg.eos_ids.end(), next) != cfg.eos_ids.end())
                break;
            gen.push_back(next);
            if (i + 1 < o.max_new)
                m.forward(std::span<const std::int32_t>(&next, 1), cache, ks, lv, false);
        }
        std::fprintf(out, "k=%d: %s%s\n", k, o.prompt.c_str(), demo_detail::one_line(tok.decode(gen)).c_str());
    }

    // The quality/latency table of the dial.
    std::vector<operating_point> points;
    for (int k = 1; k <= cfg.top_k; ++k)
        points.push_back({ cat("k=", k), std::vector<int>(std::size_t(cfg.layers), k), std::nullopt });
    const operating_point& ref = points.back();
    std::vector<point_result> res;
    std::vector<cloze_result> cz;
    std::size_t n_tokens = 0;
    if (!o.text.empty() && fs::exists(o.text)) {
        const auto tokens = tok.encode(kdial::io::read_file(o.text, std::size_t(1) << 26));
        n_tokens = tokens.size();
        sweep_options so;
        so.context = std::min(o.context, std::size_t(cfg.max_positions));
        so.decode_tokens = o.decode_tokens;
        res = run_sweep(m, tokens, points, ref, so);
    } else
        std::fprintf(out, "\n(no sweep: the text %s is missing)\n", o.text.c_str());
    std::size_t cloze_n = 0;
    if (!o.cloze.empty() && fs::exists(o.cloze)) {
        const auto items = load_cloze(o.cloze, tok, o.cloze_items);
        cloze_n = items.size();
        cz = run_cloze(m, items, points, ref);
    } else
        std::fprintf(out, "(no cloze probe: %s is missing)\n", o.cloze.c_str());
    if (res.empty() && cz.empty())
        return 0;

    std::fprintf(out, "\n== the dial: quality and cost at every k, one loaded model (reference: the trained %s)\n",
        ref.label.c_str());
    if (!res.empty())
        std::fprintf(out, "   text: %s, %zu tokens in windows of %zu\n", fs::path(o.text).filename().c_str(), n_tokens,
            std::min(o.context, std::size_t(cfg.max_positions)));
    if (!cz.empty())
        std::fprintf(out, "   cloze: %zu items of %s (pick the next word among 4; chance 0.25)\n", cloze_n,
            fs::path(o.cloze).filename().c_str());
    std::fprintf(out, "%5s %11s %9s %9s %10s %10s %12s %10s\n", "k", "perplexity", "agree", "KL", "cloze acc",
        "cloze agr", "active Mpar", "decode ms");
    for (std::size_t i = 0; i < points.size(); ++i) {
        std::fprintf(out, "%5d", points[i].k_per_layer[0]);
        if (!res.empty())
            std::fprintf(out, " %11.2f %9.4f %9.5f", res[i].perplexity, res[i].agreement, res[i].mean_kl);
        else
            std::fprintf(out, " %11s %9s %9s", "-", "-", "-");
        if (!cz.empty())
            std::fprintf(out, " %10.3f %10.3f", cz[i].accuracy, cz[i].agreement);
        else
            std::fprintf(out, " %10s %10s", "-", "-");
        if (!res.empty())
            std::fprintf(out, " %12.2f %10.3f\n", res[i].active_params / 1e6, res[i].decode_ms());
        else
            std::fprintf(out, " %12s %10s\n", "-", "-");
    }
    std::fprintf(out,
        "agree: share of next-token argmaxes equal to %s's; KL: mean KL(%s || k) in nats; cloze agr: share of\n"
        "probe answers equal to %s's; active Mpar: parameters used per token (no embedding); decode: one token.\n",
        ref.label.c_str(), ref.label.c_str(), ref.label.c_str());
    std::fprintf(out,
        "\nNext: olmoe sweep --model %s --text FILE --cloze FILE.jsonl --json out.json\n"
        "      (examples/phds/README.md: the whole experiment, base vs PHDS vs oracles)\n",
        o.model_dir.c_str());
    return 0;
}

} // namespace olmoe
