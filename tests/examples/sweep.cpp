// `olmoe sweep`'s evaluation: perplexity against the PyTorch reference on the
// golden checkpoint (the mean next-token log-likelihood computed here in
// double from the committed ref_logits.k{1,2,4}.npy), agreement of a k with
// itself (1, KL 0), agreement and KL against the reference's own numbers,
// windows, token files and the SVG writer.
#include <doctest/doctest.h>

#include "model_fixture.hpp"
#include "svg.hpp"
#include "sweep.hpp"
#include "test_util.hpp"

#include <cmath>
#include <string>
#include <vector>

using namespace kdial;

namespace {

olmoe::operating_point global_k(int k, int layers)
{
    return { "k=" + std::to_string(k), std::vector<int>(std::size_t(layers), k), std::nullopt };
}

// Mean next-token log-likelihood of rows [0, n - 1) of logits [n, V].
double mean_loglik(const float* logits, std::size_t n, std::size_t V, const std::vector<std::int32_t>& tok)
{
    std::vector<double> lp;
    double s = 0;
    for (std::size_t t = 0; t + 1 < n; ++t) {
        olmoe::log_softmax(logits + t * V, V, lp);
        s += lp[std::size_t(tok[t + 1])];
    }
    return s / double(n - 1);
}

} // namespace

TEST_CASE("sweep: perplexity matches the PyTorch reference; a k agrees with itself [examples][sweep]")
{
    auto m = test::load_golden();
    const auto tok = test::golden_tokens();
    const int L = m->config().layers;
    const std::size_t V = std::size_t(m->config().vocab), T = tok.size();
    std::vector<olmoe::operating_point> pts;
    for (int k : { 1, 2, 4 })
        pts.push_back(global_k(k, L));
    olmoe::sweep_options o;
    o.context = T;
    o.decode_prompt = 4;
    o.decode_tokens = 4;
    const auto res = olmoe::run_sweep(*m, tok, pts, global_k(4, L), o);
    REQUIRE(res.size() == 3);
    const auto ref4 = test::golden_ref_logits(4);
    for (std::size_t i = 0; i < res.size(); ++i) {
        const int k = pts[i].k_per_layer[0];
        const auto ref = test::golden_ref_logits(k);
        REQUIRE(ref.rows() == T);
        // The golden bound: every logit within 1e-4 of the float64 reference,
        // so every log-softmax within 2e-4, and so is their mean.
        const double want = mean_loglik(ref.data.data(), T, V, tok);
        CHECK_MESSAGE(
            std::fabs(res[i].mean_loglik - want) <= 2e-4, "k=", k, ": ", res[i].mean_loglik, " vs reference ", want);
        CHECK(std::fabs(std::log(res[i].perplexity) + want) <= 2e-4);
        CHECK(res[i].predicted == T - 1);
        CHECK(res[i].prefill_tokens == T);
        CHECK(res[i].decode_steps == 3);
        CHECK(res[i].experts_per_token == doctest::Approx(k));
        CHECK(res[i].active_expert_params == doctest::Approx(double(k * L) * double(m->params_per_expert())));
        // Agreement and KL against the reference's own k = 4 logits.
        std::vector<double> lp, lq;
        double kl = 0, agree = 0;
        for (std::size_t t = 0; t + 1 < T; ++t) {
            olmoe::log_softmax(ref4.data.data() + t * V, V, lp);
            olmoe::log_softmax(ref.data.data() + t * V, V, lq);
            kl += olmoe::kl_divergence(lp, lq);
            agree += olmoe::argmax_of(lp) == olmoe::argmax_of(lq);
        }
        CHECK(res[i].agreement == doctest::Approx(agree / double(T - 1)));
        CHECK(std::fabs(res[i].mean_kl - kl / double(T - 1)) <= 1e-3);
    }
    // k = 4 against the reference k = 4: the same bytes, so exactly 1 and 0.
    CHECK(res[2].agreement == 1.0);
    CHECK(res[2].mean_kl == 0.0);
}

TEST_CASE("sweep: windows, thresholds, schedules and token files [examples][sweep]")
{
    auto m = test::load_golden();
    const auto tok = test::golden_tokens();
    const int L = m->config().layers;
    std::vector<olmoe::operating_point> pts = { global_k(2, L), { "4@0,1@1", { 4, 1 }, std::nullopt },
        { "p=1", {}, threshold_options { 1.0f, 1, 3 } }, { "p=0", {}, threshold_options { 0.0f, 1, 3 } } };
    olmoe::sweep_options o;
    o.context = 6; // windows of 6, 6 and 4 tokens: 5 + 5 + 3 predictions
    o.decode_tokens = 2;
    const auto res = olmoe::run_sweep(*m, tok, pts, global_k(2, L), o);
    CHECK(res[0].predicted == 13);
    CHECK(res[0].agreement == 1.0);
    CHECK(res[0].mean_kl == 0.0);
    CHECK(res[1].experts_per_token == doctest::Approx(2.5));
    CHECK(res[2].experts_per_token == doctest::Approx(3.0));
    CHECK(res[3].experts_per_token == doctest::Approx(1.0));
    // Windows restart the cache: the mean over windows of each window alone.
    olmoe::sweep_options one;
    double ll = 0;
    for (std::size_t w0 = 0; w0 < tok.size(); w0 += 6) {
        const std::vector<std::int32_t> part(
            tok.begin() + std::ptrdiff_t(w0), tok.begin() + std::ptrdiff_t(std::min(tok.size(), w0 + 6)));
        one.context = part.size();
        one.decode_tokens = 1;
        const auto r = olmoe::run_sweep(*m, part, { pts[0] }, pts[0], one);
        ll += r[0].mean_loglik * double(r[0].predicted);
    }
    CHECK(res[0].mean_loglik == doctest::Approx(ll / 13.0).epsilon(1e-12));

    CHECK(olmoe::parse_token_ids("1, 2,3\n 4\t5,,", "ids.txt", 384) == std::vector<std::int32_t> { 1, 2, 3, 4, 5 });
    CHECK_THROWS_WITH_AS(olmoe::parse_token_ids("1,384", "ids.txt", 384),
        "ids.txt: '384' (token 1) is not a token id in [0, vocab_size = 384)", kdial::error);
    CHECK_THROWS_WITH_AS(olmoe::parse_token_ids("1,x2", "ids.txt", 384),
        "ids.txt: 'x2' (token 1) is not a token id in [0, vocab_size = 384)", kdial::error);
    CHECK_THROWS_WITH_AS(olmoe::run_sweep(*m, { 5 }, pts, pts[0], o),
        "sweep: the text has 1 tokens, at least 2 are needed", kdial::error);
}

TEST_CASE(
    "svg: a self-contained plot with axes, ticks, labels and one labelled point per operating point [examples][svg]")
{
    olmoe::svg::panel p { "perplexity vs decode latency", "decode latency (ms / token)", "perplexity",
        { { 12.5, 30.1, "k=1" }, { 20.0, 21.7, "k=2" }, { 35.2, 20.3, "k=4 <ref>" } } };
    const std::string s = olmoe::svg::render("sweep", { p, p });
    CHECK(s.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0) == 0);
    CHECK(s.find("</svg>") != std::string::npos);
    CHECK(s.find(">k=4 &lt;ref&gt;</text>") != std::string::npos);
    CHECK(s.find("decode latency (ms / token)") != std::string::npos);
    CHECK(s.find(">40</text>") != std::string::npos); // x ticks reach past 35.2 at a 1/2/5 step
    CHECK(s.find(">0</text>") != std::string::npos); // latency from 0
    std::size_t circles = 0;
    for (std::size_t at = s.find("<circle"); at != std::string::npos; at = s.find("<circle", at + 1))
        ++circles;
    CHECK(circles == 6);
    double lo = 20.3, hi = 30.1;
    const auto t = olmoe::svg::detail::nice_ticks(lo, hi);
    CHECK(lo == 20.0);
    CHECK(hi == 32.0);
    CHECK(t.size() == 7);
}
