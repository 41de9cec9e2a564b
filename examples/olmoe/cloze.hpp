// `olmoe sweep --cloze`: a multiple-choice probe scored per operating point,
// so that cross-sparsity agreement (MoE-PHDS) is measured over answers, not
// only over argmax tokens. Each item is a context and candidate continuations
// (examples/phds/make_cloze.py writes them: {"context", "choices", "answer"}
// per line); a candidate's score is the summed log-probability of its tokens
// after the context (the tokens of context + candidate past those of the
// context alone), the choice is the first candidate with the highest score,
// as examples/phds/score_cloze.py does in PyTorch. The context is run once per
// item and point; each candidate then runs from the context's cached keys and
// values (the cache is rolled back), so an item costs one context plus the
// candidates' tokens. Scores are accumulated in double.
#pragma once

#include "model.hpp"
#include "runner.hpp"
#include "sweep.hpp"

#include <kdial/core/error.hpp>
#include <kdial/io/file.hpp>
#include <kdial/io/tokenizer.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace olmoe {

// One item, as tokens: the context and each candidate's own tokens.
struct cloze_item {
    std::vector<std::int32_t> context; // [n_ctx], n_ctx >= 1
    std::vector<std::vector<std::int32_t>> choices; // [n_choices][n_tokens >= 1]
    int answer = 0; // index of the right candidate
};

// Reads a cloze file (one JSON object per line with "context" (string),
// "choices" (>= 2 strings) and "answer" (an index into choices); blank lines
// skipped) and tokenises it. At most max_items items (0: all). Errors name
// the file, the line and the field. Special tokens' strings in the text are
// parsed as such; nothing is added around it (a post-processor's EOS would
// split the context from its candidates), as score_cloze.py encodes.
inline std::vector<cloze_item> load_cloze(
    const std::string& path, const kdial::io::bpe_tokenizer& tok, std::size_t max_items = 0)
{
    using kdial::detail::cat;
    using kdial::detail::check;
    const std::string text = kdial::io::read_file_checked(path, "cloze file", std::size_t(1) << 28);
    std::vector<cloze_item> items;
    std::size_t line_no = 0;
    for (std::size_t p = 0; p < text.size() && (max_items == 0 || items.size() < max_items);) {
        const std::size_t q = std::min(text.find('\n', p), text.size());
        const std::string line = text.substr(p, q - p);
        p = q + 1;
        ++line_no;
        if (line.find_first_not_of(" \t\r") == std::string::npos)
            continue;
        const std::string where = cat(path, ":", line_no);
        nlohmann::json j;
        try {
            j = nlohmann::json::parse(line);
        } catch (const nlohmann::json::exception& e) {
            throw kdial::error(cat(where, ": not a JSON object: ", e.what()));
        }
        check(j.is_object(), where, ": not a JSON object");
        check(j.contains("context") && j["context"].is_string(), where, ": \"context\" must be a string");
        check(j.contains("choices") && j["choices"].is_array() && j["choices"].size() >= 2, where,
            ": \"choices\" must be an array of at least 2 strings");
        check(j.contains("answer") && j["answer"].is_number_integer(), where, ": \"answer\" must be an integer");
        const auto ans = j["answer"].get<long long>();
        check(ans >= 0 && ans < static_cast<long long>(j["choices"].size()), where, ": \"answer\" ", ans,
            " is not an index into the ", j["choices"].size(), " choices");
        cloze_item it;
        it.answer = int(ans);
        const std::string ctx = j["context"].get<std::string>();
        it.context = tok.encode(ctx, true, false);
        check(!it.context.empty(), where, ": \"context\" encodes to no tokens");
        for (std::size_t c = 0; c < j["choices"].size(); ++c) {
            check(j["choices"][c].is_string(), where, ": \"choices\"[", c, "] must be a string");
            const auto ids = tok.encode(ctx + j["choices"][c].get<std::string>(), true, false);
            // The candidate's tokens are those past the context's: the two
            // must tokenise apart (true when a candidate starts with a space
            // and the context ends in a word, as make_cloze.py writes them).
            check(ids.size() > it.context.size() && std::equal(it.context.begin(), it.context.end(), ids.begin()),
                where, ": context + \"choices\"[", c, "] does not tokenise as the context's tokens followed by more");
            it.choices.emplace_back(ids.begin() + std::ptrdiff_t(it.context.size()), ids.end());
        }
        items.push_back(std::move(it));
    }
    check(!items.empty(), path, ": no cloze items");
    return items;
}

// The candidates' scores (summed log-probabilities, nats) of every item at
// one operating point: [items][choices]. progress(items done, items).
inline std::vector<std::vector<double>> cloze_scores(model& m, const std::vector<cloze_item>& items,
    const operating_point& p, const std::function<void(std::size_t, std::size_t)>& progress = {})
{
    using kdial::detail::check;
    const auto& c = m.config();
    const std::size_t V = std::size_t(c.vocab);
    std::size_t longest = 0;
    for (const auto& it : items)
        for (const auto& ch : it.choices)
            longest = std::max(longest, it.context.size() + ch.size());
    check(longest <= std::size_t(c.max_positions), "cloze: an item has ", longest,
        " tokens (context + candidate), more than max_position_embeddings = ", c.max_positions);
    const int kmax = p.max_k();
    const std::size_t chunk = std::min(m.max_chunk(), chunk_for(m, std::span<const int>(&kmax, 1)));
    const auto spec = p.spec();
    kv_cache cache(c, longest);
    std::vector<float> logits(chunk * V);
    std::vector<double> last, lp; // log-probabilities after the context; scratch
    std::vector<std::vector<double>> scores(items.size());
    for (std::size_t i = 0; i < items.size(); ++i) {
        const auto& it = items[i];
        cache.reset();
        for (std::size_t t0 = 0; t0 < it.context.size(); t0 += chunk) {
            const std::size_t len = std::min(chunk, it.context.size() - t0);
            m.forward(std::span<const std::int32_t>(it.context.data() + t0, len), cache, spec,
                kdial::matrix_view<float>(logits.data(), 1, V), false);
        }
        log_softmax(logits.data(), V, last);
        const std::size_t n_ctx = cache.pos;
        for (const auto& ch : it.choices) {
            double s = last[std::size_t(ch[0])];
            cache.pos = n_ctx; // roll back to the context
            // The last token predicts nothing inside the candidate: run the others.
            for (std::size_t t0 = 0; t0 + 1 < ch.size(); t0 += chunk) {
                const std::size_t len = std::min(chunk, ch.size() - 1 - t0);
                m.forward(std::span<const std::int32_t>(ch.data() + t0, len), cache, spec,
                    kdial::matrix_view<float>(logits.data(), len, V), true);
                for (std::size_t t = 0; t < len; ++t) {
                    log_softmax(logits.data() + t * V, V, lp);
                    s += lp[std::size_t(ch[t0 + t + 1])];
                }
            }
            scores[i].push_back(s);
        }
        if (progress)
            progress(i + 1, items.size());
    }
    return scores;
}

// The chosen candidate of each item: the first with the highest score.
inline std::vector<int> cloze_choices(const std::vector<std::vector<double>>& scores)
{
    std::vector<int> picks;
    picks.reserve(scores.size());
    for (const auto& s : scores)
        picks.push_back(int(std::max_element(s.begin(), s.end()) - s.begin()));
    return picks;
}

struct cloze_result {
    std::size_t items = 0;
    double accuracy = 0; // share of items whose choice is the answer
    double agreement = 0; // share of items whose choice equals the reference's
    std::vector<int> picks; // [items]
};

// Accuracy of picks, and their agreement with ref_picks (same length).
inline cloze_result cloze_summary(
    const std::vector<cloze_item>& items, std::vector<int> picks, const std::vector<int>& ref_picks)
{
    using kdial::detail::check;
    check(picks.size() == items.size() && ref_picks.size() == items.size(), "cloze: ", picks.size(), " and ",
        ref_picks.size(), " choices for ", items.size(), " items");
    cloze_result r;
    r.items = items.size();
    std::size_t right = 0, same = 0;
    for (std::size_t i = 0; i < items.size(); ++i) {
        right += picks[i] == items[i].answer;
        same += picks[i] == ref_picks[i];
    }
    const double n = double(std::max<std::size_t>(1, items.size()));
    r.accuracy = double(right) / n;
    r.agreement = double(same) / n;
    r.picks = std::move(picks);
    return r;
}

// Scores the probe at every point and at the reference; the reference pass is
// shared with a point that routes the same way. progress(fraction, what).
inline std::vector<cloze_result> run_cloze(model& m, const std::vector<cloze_item>& items,
    const std::vector<operating_point>& points, const operating_point& ref,
    const std::function<void(double, const std::string&)>& progress = {})
{
    const auto same_route = [](const operating_point& a, const operating_point& b) {
        return !a.threshold && !b.threshold && a.k_per_layer == b.k_per_layer;
    };
    const std::size_t passes = points.size() + 1;
    std::size_t pass = 0;
    auto scored = [&](const operating_point& p) {
        const auto s = cloze_scores(m, items, p, [&](std::size_t done, std::size_t n) {
            if (progress)
                progress((double(pass) + double(done) / double(n)) / double(passes), "cloze " + p.label);
        });
        ++pass;
        return cloze_choices(s);
    };
    const auto ref_picks = scored(ref);
    std::vector<cloze_result> res;
    for (const auto& p : points)
        res.push_back(cloze_summary(items, same_route(p, ref) ? ref_picks : scored(p), ref_picks));
    return res;
}

} // namespace olmoe
