// `olmoe sweep --cloze` and `--compare`: the probe's candidate scores against
// a plain full-sequence forward of context + candidate on the golden
// checkpoint, the choice, accuracy and answer agreement, the file's errors;
// the comparison tables and the one-line-per-model plot read back from
// sweep JSON files.
#include <doctest/doctest.h>

#include "cloze.hpp"
#include "compare.hpp"
#include "io/io_test_util.hpp"
#include "model_fixture.hpp"
#include "svg.hpp"

#include <kdial/io/tokenizer.hpp>

#include <cmath>
#include <string>
#include <vector>

using namespace kdial;
using kdial::test::temp_dir;

namespace {

olmoe::operating_point cloze_k(int k, int layers)
{
    return { "k=" + std::to_string(k), std::vector<int>(std::size_t(layers), k), std::nullopt };
}

const char* const cloze_lines
    = R"({"doc": "a", "context": "the experts of the model", "choices": [" say", " run", " each", " model"], "answer": 2}

{"context": "one checkpoint serves every", "choices": [" k", " sparsity level"], "answer": 0}
{"context": "Routing weights are", "choices": [" kept", " renormalised to sum to one", " dropped"], "answer": 1}
)";

} // namespace

TEST_CASE("cloze: candidate scores equal a full forward of context + candidate; choices, accuracy, agreement "
          "[examples][cloze]")
{
    auto m = test::load_golden();
    const auto tok = io::bpe_tokenizer::from_file(test::golden_dir + "/olmoe-tiny-f32/tokenizer.json");
    const temp_dir d;
    kdial::test::write_file(d / "cloze.jsonl", std::string_view(cloze_lines));
    const auto items = olmoe::load_cloze((d / "cloze.jsonl").string(), tok);
    REQUIRE(items.size() == 3); // the blank line is skipped
    CHECK(items[0].answer == 2);
    CHECK(items[1].choices.size() == 2);
    CHECK(items[2].choices[1].size() > 1); // a candidate of several tokens
    CHECK(olmoe::load_cloze((d / "cloze.jsonl").string(), tok, 2).size() == 2);

    const auto& c = m->config();
    const std::size_t V = std::size_t(c.vocab);
    for (int k : { 1, 4 }) {
        const auto p = cloze_k(k, c.layers);
        const auto scores = olmoe::cloze_scores(*m, items, p);
        REQUIRE(scores.size() == items.size());
        for (std::size_t i = 0; i < items.size(); ++i) {
            REQUIRE(scores[i].size() == items[i].choices.size());
            for (std::size_t j = 0; j < items[i].choices.size(); ++j) {
                // The reference: context + candidate in one forward from an
                // empty cache, every position's logits.
                std::vector<std::int32_t> seq = items[i].context;
                seq.insert(seq.end(), items[i].choices[j].begin(), items[i].choices[j].end());
                olmoe::kv_cache cache(c, seq.size());
                std::vector<float> logits(seq.size() * V);
                m->forward(seq, cache, p.k_per_layer, matrix_view<float>(logits.data(), seq.size(), V), true);
                std::vector<double> lp;
                double want = 0;
                for (std::size_t t = items[i].context.size(); t < seq.size(); ++t) {
                    olmoe::log_softmax(logits.data() + (t - 1) * V, V, lp);
                    want += lp[std::size_t(seq[t])];
                }
                CHECK_MESSAGE(std::fabs(scores[i][j] - want) <= 1e-4, "k=", k, " item ", i, " choice ", j, ": ",
                    scores[i][j], " vs ", want);
            }
        }
        // The choice is the first best candidate.
        const auto picks = olmoe::cloze_choices(scores);
        for (std::size_t i = 0; i < items.size(); ++i)
            for (std::size_t j = 0; j < scores[i].size(); ++j)
                CHECK((scores[i][j] < scores[i][std::size_t(picks[i])]
                    || (scores[i][j] == scores[i][std::size_t(picks[i])] && j >= std::size_t(picks[i]))));
    }

    // run_cloze: the reference point agrees with itself; accuracy and
    // agreement are the shares the picks give.
    const std::vector<olmoe::operating_point> pts = { cloze_k(1, c.layers), cloze_k(4, c.layers) };
    const auto res = olmoe::run_cloze(*m, items, pts, pts[1]);
    REQUIRE(res.size() == 2);
    CHECK(res[1].agreement == 1.0);
    CHECK(res[1].picks == olmoe::cloze_choices(olmoe::cloze_scores(*m, items, pts[1])));
    CHECK(res[0].picks == olmoe::cloze_choices(olmoe::cloze_scores(*m, items, pts[0])));
    for (const auto& r : res) {
        double right = 0, same = 0;
        for (std::size_t i = 0; i < items.size(); ++i) {
            right += r.picks[i] == items[i].answer;
            same += r.picks[i] == res[1].picks[i];
        }
        CHECK(r.accuracy == doctest::Approx(right / 3.0));
        CHECK(r.agreement == doctest::Approx(same / 3.0));
        CHECK(r.items == 3);
    }
    const auto s = olmoe::cloze_summary(items, { 2, 1, 1 }, { 2, 0, 0 });
    CHECK(s.accuracy == doctest::Approx(2.0 / 3.0));
    CHECK(s.agreement == doctest::Approx(1.0 / 3.0));
}

TEST_CASE("cloze: a malformed file is refused naming the file, the line and the field [examples][cloze]")
{
    const auto tok = io::bpe_tokenizer::from_file(test::golden_dir + "/olmoe-tiny-f32/tokenizer.json");
    const temp_dir d;
    const auto f = (d / "c.jsonl").string();
    auto fails = [&](const std::string& text, const std::string& msg) {
        kdial::test::write_file(d / "c.jsonl", std::string_view(text));
        CHECK_THROWS_WITH_AS(olmoe::load_cloze(f, tok), doctest::Contains(msg.c_str()), kdial::error);
    };
    const std::string ok = R"({"context": "a b", "choices": [" c", " d"], "answer": 0})";
    fails(ok + "\n{\"context\": 1}\n", f + ":2: \"context\" must be a string");
    fails(ok + "\nnot json\n", f + ":2: not a JSON object");
    fails(
        R"({"context": "a b", "choices": [" c"], "answer": 0})", f + ":1: \"choices\" must be an array of at least 2");
    fails(R"({"context": "a b", "choices": [" c", " d"], "answer": 2})", f + ":1: \"answer\" 2 is not an index");
    fails(R"({"context": "a b", "choices": [" c", 5], "answer": 0})", f + ":1: \"choices\"[1] must be a string");
    fails(R"({"context": "", "choices": [" c", " d"], "answer": 0})", f + ":1: \"context\" encodes to no tokens");
    // "a " + "the" is "a" + " the": the context's last token (" ") merges
    // into the candidate's first: no clean split.
    fails(R"({"context": "a ", "choices": ["the", " d"], "answer": 0})", "does not tokenise as the context's tokens");
    fails("\n\n", f + ": no cloze items");
}

TEST_CASE("sweep --compare: tables per metric and one line per model from sweep JSON files [examples][svg]")
{
    const temp_dir d;
    kdial::test::write_file(d / "a.json", std::string_view(R"({"model": "/x/run/base/", "reference": "k=4", "points": [
        {"label": "k=1", "k_per_layer": [1, 1], "perplexity": 30.5, "agreement": 0.6, "mean_kl": 0.3,
         "decode_ms_per_token": 1.5, "cloze_accuracy": 0.4, "cloze_agreement": 0.7},
        {"label": "k=4", "k_per_layer": [4, 4], "perplexity": 20.25, "agreement": 1.0, "mean_kl": 0.0,
         "decode_ms_per_token": 3.0, "cloze_accuracy": 0.5, "cloze_agreement": 1.0},
        {"label": "4@0,1@1", "k_per_layer": [4, 1], "perplexity": 25.0, "agreement": 0.8},
        {"label": "p=0.5", "k_per_layer": [4, 4], "threshold": {"p": 0.5}, "perplexity": 22.0, "agreement": 0.9}]})"));
    kdial::test::write_file(d / "b.json", std::string_view(R"({"model": "m", "reference": "k=4", "points": [
        {"label": "k=2", "k_per_layer": [2, 2], "perplexity": 21.0, "agreement": 0.9, "mean_kl": 0.1,
         "decode_ms_per_token": 2.0}]})"));
    const auto a = olmoe::read_compared((d / "a.json").string());
    CHECK(a.name == "base"); // the model directory's name
    CHECK(a.reference == "k=4");
    REQUIRE(a.by_k.size() == 2); // the schedule and the threshold point are not global k
    CHECK(a.by_k.at(1).cloze_agreement == 0.7);
    const auto b = olmoe::read_compared("PHDS=" + (d / "b.json").string());
    CHECK(b.name == "PHDS");
    CHECK(std::isnan(b.by_k.at(2).cloze_accuracy));

    const std::string t = olmoe::compare_tables({ a, b });
    CHECK(t.find("### perplexity\n\n| model | reference | k=1 | k=2 | k=4 |\n|---|---|---|---|---|\n"
                 "| base | k=4 | 30.50 | - | 20.25 |\n| PHDS | k=4 | - | 21.00 | - |\n")
        != std::string::npos);
    CHECK(t.find("| base | k=4 | 0.700 | - | 1.000 |") != std::string::npos); // cloze agreement
    CHECK(t.find("### decode latency") != std::string::npos);

    const auto panels = olmoe::compare_panels({ a, b });
    REQUIRE(panels.size() == 4); // perplexity, argmax agreement, cloze accuracy, cloze agreement
    CHECK(panels[0].points.size() == 3);
    CHECK(panels[2].points.size() == 2); // only base scored the probe
    CHECK(!panels[0].x_from_zero);
    const std::string s = olmoe::svg::render("compare", panels, olmoe::compare_names({ a, b }), 2);
    CHECK(s.find(">base</text>") != std::string::npos); // the legend
    CHECK(s.find(">PHDS</text>") != std::string::npos);
    std::size_t paths = 0;
    for (std::size_t at = s.find("<path"); at != std::string::npos; at = s.find("<path", at + 1))
        ++paths;
    CHECK(paths == 6); // base in 4 panels, PHDS in 2
    CHECK(s.find(">0</text>") == std::string::npos); // k from 1, not 0
    CHECK(s.find("width=\"1100\" height=\"984\"") != std::string::npos); // 2 x 2 panels

    kdial::test::write_file(d / "c.json", std::string_view(R"({"points": [{"label": "p=1", "threshold": {}}]})"));
    CHECK_THROWS_WITH_AS(
        olmoe::read_compared((d / "c.json").string()), doctest::Contains("no global-k point"), kdial::error);
    kdial::test::write_file(d / "c.json", std::string_view("{\"x\": 1}"));
    CHECK_THROWS_WITH_AS(olmoe::read_compared((d / "c.json").string()),
        doctest::Contains("not an `olmoe sweep --json` output"), kdial::error);
}
