// `olmoe sweep --compare`: several models' sweeps side by side. Reads the
// JSON files `olmoe sweep --json` wrote (one per model, e.g. base, continued,
// PHDS and oracle fine-tunes of one checkpoint), prints one Markdown table
// per metric (rows: models, columns: global k) and draws quality against k
// with one line per model in one SVG: perplexity, argmax agreement with each
// model's reference k and, when the sweeps scored a cloze probe, the probe's
// accuracy and answer-level agreement. Only global-k points take part
// (schedules and thresholds have no single k).
#pragma once

#include "svg.hpp"

#include <kdial/core/error.hpp>
#include <kdial/io/file.hpp>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace olmoe {

// One model's sweep, as read back from its JSON file.
struct compared_model {
    std::string name; // the row and legend name
    std::string reference; // "k=4": the reference point of the agreement columns
    // By global k: the metrics of that point (NaN where the sweep lacks one).
    struct row {
        double perplexity = NAN, agreement = NAN, mean_kl = NAN, cloze_accuracy = NAN, cloze_agreement = NAN,
               decode_ms = NAN;
    };
    std::map<int, row> by_k;
};

// Parses "NAME=FILE" (or "FILE": the name is the sweep's model directory's
// last component) and reads FILE, a `olmoe sweep --json` output. Errors name
// the file and the field.
inline compared_model read_compared(const std::string& spec)
{
    using kdial::detail::cat;
    using kdial::detail::check;
    namespace fs = std::filesystem;
    const std::size_t eq = spec.find('=');
    const std::string path = eq == std::string::npos ? spec : spec.substr(eq + 1);
    check(!path.empty(), "--compare: '", spec, "' names no file");
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(kdial::io::read_file_checked(path, "sweep JSON file", std::size_t(1) << 26));
    } catch (const nlohmann::json::exception& e) {
        throw kdial::error(cat(path, ": not JSON: ", e.what()));
    }
    check(j.is_object() && j.contains("points") && j["points"].is_array(), path,
        ": not an `olmoe sweep --json` output (no \"points\" array)");
    compared_model m;
    if (eq != std::string::npos)
        m.name = spec.substr(0, eq);
    else {
        const std::string model = j.value("model", std::string());
        m.name = fs::path(model).lexically_normal().filename().string();
        if (m.name.empty())
            m.name = fs::path(model).lexically_normal().parent_path().filename().string();
        if (m.name.empty())
            m.name = fs::path(path).stem().string();
    }
    check(!m.name.empty(), "--compare: '", spec, "' gives an empty name");
    m.reference = j.value("reference", std::string());
    const auto num = [&](const nlohmann::json& p, const char* key) {
        if (!p.contains(key))
            return double(NAN);
        check(p[key].is_number(), path, ": \"", key, "\" of point ", p.value("label", std::string("?")),
            " is not a number");
        return p[key].get<double>();
    };
    for (const auto& p : j["points"]) {
        check(p.is_object(), path, ": an entry of \"points\" is not an object");
        if (p.contains("threshold") || !p.contains("k_per_layer") || !p["k_per_layer"].is_array()
            || p["k_per_layer"].empty())
            continue;
        const auto& ks = p["k_per_layer"];
        bool global = ks[0].is_number_integer();
        for (const auto& k : ks)
            global = global && k == ks[0];
        if (!global)
            continue;
        compared_model::row r;
        r.perplexity = num(p, "perplexity");
        r.agreement = num(p, "agreement");
        r.mean_kl = num(p, "mean_kl");
        r.cloze_accuracy = num(p, "cloze_accuracy");
        r.cloze_agreement = num(p, "cloze_agreement");
        r.decode_ms = num(p, "decode_ms_per_token");
        m.by_k[ks[0].get<int>()] = r;
    }
    check(!m.by_k.empty(), path, ": no global-k point (\"k_per_layer\" with one k for every layer)");
    return m;
}

struct compare_metric {
    const char* title; // table heading and panel title
    const char* y_label;
    const char* format; // printf format of a cell
    double compared_model::row::*field;
};

inline const std::vector<compare_metric>& compare_metrics()
{
    static const std::vector<compare_metric> m = {
        { "perplexity", "perplexity", "%.2f", &compared_model::row::perplexity },
        { "argmax agreement with the reference k", "next-token argmax agreement", "%.3f",
            &compared_model::row::agreement },
        { "cloze accuracy", "cloze accuracy", "%.3f", &compared_model::row::cloze_accuracy },
        { "cloze answer agreement with the reference k", "answer-level agreement", "%.3f",
            &compared_model::row::cloze_agreement },
        { "mean KL(reference || k), nats", "mean KL (nats)", "%.4f", &compared_model::row::mean_kl },
        { "decode latency, ms / token", "ms / token", "%.2f", &compared_model::row::decode_ms },
    };
    return m;
}

// The Markdown tables: one per metric that some model has.
inline std::string compare_tables(const std::vector<compared_model>& models)
{
    std::map<int, bool> ks;
    for (const auto& m : models)
        for (const auto& [k, r] : m.by_k)
            ks[k] = true;
    std::string o;
    char cell[64];
    for (const auto& met : compare_metrics()) {
        bool any = false;
        for (const auto& m : models)
            for (const auto& [k, r] : m.by_k)
                any = any || std::isfinite(r.*met.field);
        if (!any)
            continue;
        o += std::string("### ") + met.title + "\n\n| model | reference |";
        for (const auto& [k, _] : ks)
            o += " k=" + std::to_string(k) + " |";
        o += "\n|---|---|";
        for (std::size_t i = 0; i < ks.size(); ++i)
            o += "---|";
        o += "\n";
        for (const auto& m : models) {
            o += "| " + m.name + " | " + m.reference + " |";
            for (const auto& [k, _] : ks) {
                const auto it = m.by_k.find(k);
                if (it == m.by_k.end() || !std::isfinite(it->second.*met.field))
                    o += " - |";
                else {
                    std::snprintf(cell, sizeof cell, met.format, it->second.*met.field);
                    o += std::string(" ") + cell + " |";
                }
            }
            o += "\n";
        }
        o += "\n";
    }
    return o;
}

// The plot's panels: quality metrics against k, point series = model index.
inline std::vector<svg::panel> compare_panels(const std::vector<compared_model>& models)
{
    std::vector<svg::panel> panels;
    for (const auto& met : compare_metrics()) {
        if (met.field == &compared_model::row::mean_kl || met.field == &compared_model::row::decode_ms)
            continue; // the plot shows quality; the tables have the rest
        svg::panel pn { std::string(met.title) + " vs k", "k (experts per token, every layer)", met.y_label, {} };
        pn.x_from_zero = false;
        for (std::size_t s = 0; s < models.size(); ++s)
            for (const auto& [k, r] : models[s].by_k)
                if (std::isfinite(r.*met.field))
                    pn.points.push_back({ double(k), r.*met.field, "k=" + std::to_string(k), true, int(s) });
        if (!pn.points.empty())
            panels.push_back(std::move(pn));
    }
    return panels;
}

inline std::vector<std::string> compare_names(const std::vector<compared_model>& models)
{
    std::vector<std::string> n;
    for (const auto& m : models)
        n.push_back(m.name);
    return n;
}

} // namespace olmoe
