// The parts of `olmoe serve` below HTTP: request parsing and its 400s, the
// sampler, the k policies, the metrics text, and the engine (continuous
// batching with per-request k) on the golden checkpoint. The HTTP server
// itself is tested end to end by examples/olmoe/serve/test_serve.py.
#include <doctest/doctest.h>

#include "model_fixture.hpp"
#include "serve/api.hpp"
#include "serve/engine.hpp"
#include "serve/metrics.hpp"
#include "serve/policy.hpp"
#include "serve/sampler.hpp"

#include <cmath>
#include <string>
#include <vector>

using namespace olmoe::serve;

namespace {

olmoe::model_config tiny_config()
{
    olmoe::model_config c;
    c.layers = 2;
    c.experts = 8;
    c.top_k = 4;
    c.vocab = 384;
    return c;
}

// The api_error a body raises (status 0 if it parses).
api_error parse_error(const std::string& body, endpoint kind = endpoint::completions, std::size_t ctx = 64)
{
    try {
        parse_request(body, kind, tiny_config(), nullptr, limits { ctx });
    } catch (const api_error& e) {
        return e;
    }
    return api_error(0, "");
}

} // namespace

TEST_CASE("serve: requests parse into params, with the dial")
{
    const auto c = tiny_config();
    auto r = parse_request(R"({"prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0, "k": 2, "stop": ["x", ""],
        "seed": 9, "unknown": {"ignored": true}})",
        endpoint::completions, c, nullptr, limits { 64 });
    CHECK(r.prompt == std::vector<std::int32_t> { 1, 2, 3 });
    CHECK(r.max_tokens == 5);
    CHECK(r.sampling.temperature == 0);
    CHECK(r.ks == std::vector<int> { 2, 2 });
    CHECK(r.stop == std::vector<std::string> { "x" });
    CHECK((r.seeded && r.sampling.seed == 9));
    r = parse_request(
        R"({"prompt": [[4, 5]], "k_schedule": "1@0,3@1"})", endpoint::completions, c, nullptr, limits { 64 });
    CHECK(r.prompt == std::vector<std::int32_t> { 4, 5 });
    CHECK(r.ks == std::vector<int> { 1, 3 });
    CHECK(r.max_tokens == 16); // OpenAI's default for completions
    r = parse_request(
        R"({"prompt": [4], "threshold": {"p": 0.25, "k_max": 6}})", endpoint::completions, c, nullptr, limits { 64 });
    REQUIRE(r.threshold);
    CHECK((r.threshold->p == 0.25f && r.threshold->k_min == 1 && r.threshold->k_max == 6));
    CHECK(r.ks.empty());
    r = parse_request(R"({"prompt": [4, 4]})", endpoint::completions, c, nullptr, limits { 10 });
    CHECK(r.max_tokens == 8); // capped by the context
}

TEST_CASE("serve: bad requests are 400 naming the field")
{
    struct bad {
        const char* body;
        const char* param;
        const char* message;
    };
    const bad cases[] = {
        { "{oops", "", "not valid JSON" },
        { "[1]", "", "JSON object" },
        { R"({"prompt": [1], "k": 0})", "k", "outside [1, num_experts = 8]" },
        { R"({"prompt": [1], "k": 9})", "k", "outside [1, num_experts = 8]" },
        { R"({"prompt": [1], "k": 2.5})", "k", "integer" },
        { R"({"prompt": [1], "k": 2, "k_schedule": [1, 1]})", "k", "at most one" },
        { R"({"prompt": [1], "k_schedule": [1]})", "k_schedule", "1 entries" },
        { R"({"prompt": [1], "k_schedule": "9,1"})", "k_schedule", "outside" },
        { R"({"prompt": [1], "threshold": {"p": 0.5, "k_min": 5, "k_max": 2}})", "threshold", "k_min <= k_max" },
        { R"({"prompt": [1], "max_tokens": -3})", "max_tokens", "at least 1" },
        { R"({"prompt": [1], "max_tokens": 64})", "max_tokens", "context is 64" },
        { R"({"prompt": [1], "n": 2})", "n", "n = 1" },
        { R"({"prompt": [1], "top_p": 0})", "top_p", "(0, 1]" },
        { R"({"prompt": [1], "stop": [1]})", "stop", "strings" },
        { R"({"prompt": [1, 384]})", "prompt", "vocab_size = 384" },
        { R"({"prompt": "text"})", "prompt", "no tokenizer" },
        { R"({"prompt": ["a", "b"]})", "prompt", "one prompt" },
        { R"({"max_tokens": 1})", "prompt", "required" },
    };
    for (const auto& b : cases) {
        CAPTURE(b.body);
        const auto e = parse_error(b.body);
        CHECK(e.status == 400);
        CHECK(e.param == b.param);
        CHECK(std::string(e.what()).find(b.message) != std::string::npos);
        const auto j = e.body();
        CHECK(j["error"]["type"] == "invalid_request_error");
        CHECK(j["error"].contains("code"));
    }
    std::string longp = R"({"prompt": [)";
    for (int i = 0; i < 64; ++i)
        longp += (i ? ",1" : "1");
    const auto e = parse_error(longp + "]}");
    CHECK(e.code == "context_length_exceeded");
    CHECK(std::string(e.what()).find("context is 64 tokens") != std::string::npos);
    CHECK(parse_error(R"({"messages": []})", endpoint::chat).param == "messages");
    CHECK(parse_error(R"({"messages": [{"role": "robot", "content": "x"}]})", endpoint::chat).param
        == "messages[0].role");
}

TEST_CASE("serve: the chat template and the stop hold-back")
{
    const auto j = json::parse(R"([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])");
    CHECK(chat_prompt(j) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n");
    CHECK(stop_holdback("hello wor", { "world" }) == 3);
    CHECK(stop_holdback("hello", { "world" }) == 0);
    CHECK(stop_holdback("ab", { "abc", "b" }) == 2);
}

TEST_CASE("serve: sampler")
{
    const std::vector<float> logits { 0.5f, 2.0f, 2.0f, -1.0f };
    sampler s(logits.size());
    s.reset({ 0.0, 1.0, 0, 1 });
    CHECK(s(logits) == 1); // greedy, the lowest id of a tie
    s.reset({ 1.0, 1.0, 1, 1 });
    CHECK(s(logits) == 1); // top_k = 1 is greedy
    s.reset({ 1.0, 0.01, 0, 1 });
    CHECK(s(logits) == 1); // a tiny top_p keeps one token
    // The same seed repeats; frequencies follow softmax(logits / T).
    auto draw = [&](std::uint64_t seed, double temp, int n) {
        s.reset({ temp, 1.0, 0, seed });
        std::vector<std::int32_t> out;
        for (int i = 0; i < n; ++i)
            out.push_back(s(logits));
        return out;
    };
    CHECK(draw(3, 1.0, 50) == draw(3, 1.0, 50));
    CHECK(draw(3, 1.0, 50) != draw(4, 1.0, 50));
    const auto d = draw(11, 0.5, 20000);
    double z = 0;
    for (float l : logits)
        z += std::exp(double(l) / 0.5);
    for (int t = 0; t < 4; ++t) {
        const double want = std::exp(double(logits[std::size_t(t)]) / 0.5) / z;
        const double got = double(std::count(d.begin(), d.end(), t)) / double(d.size());
        CAPTURE(t);
        CHECK(std::abs(got - want) < 0.02);
    }
    // top_p = 0.9 drops the two least likely tokens here (0.5 / 0.5 of the mass on ids 1, 2).
    s.reset({ 0.5, 0.9, 0, 5 });
    for (int i = 0; i < 200; ++i) {
        const auto t = s(logits);
        CHECK((t == 1 || t == 2));
    }
}

TEST_CASE("serve: the latency policy picks the largest k under the target")
{
    latency_policy p(0.010, 8, 4);
    CHECK(p.candidates() == std::vector<int> { 1, 2, 4, 8 });
    CHECK(p.choose(1) == 8); // nothing measured: try the largest
    p.observe(1, 8, 0.020);
    p.observe(1, 4, 0.009);
    p.observe(1, 2, 0.006);
    p.observe(1, 1, 0.004);
    CHECK(p.choose(1) == 4);
    CHECK(p.choose(3) == 4); // borrowed from batch 1
    p.observe(3, 4, 0.012);
    CHECK(p.choose(3) == 2);
    CHECK(p.choose(4) == 2);
    p.observe(3, 2, 0.030);
    p.observe(3, 1, 0.030);
    CHECK(p.choose(3) == 1); // nothing meets it: the smallest
    // The running mean moves a quarter of the way to each new measurement.
    p.observe(1, 4, 0.017);
    CHECK(p.estimate_for(1, 4) == doctest::Approx(0.75 * 0.009 + 0.25 * 0.017));
    CHECK(p.choose(1) == 2);
    fixed_policy f(3);
    CHECK(f.choose(7) == 3);
}

TEST_CASE("serve: metrics text")
{
    metrics m(8);
    m.request(200, "/v1/completions");
    m.request(400, "/v1/completions");
    m.step(2, { 4.0, 2.0 }, 0, 0.003);
    m.set_gauges(1, 2, 4);
    const std::string t = m.render();
    CHECK(t.find("kdial_requests_total{endpoint=\"/v1/completions\",code=\"400\"} 1") != std::string::npos);
    CHECK(t.find("kdial_experts_per_token_bucket{le=\"2\"} 1") != std::string::npos);
    CHECK(t.find("kdial_experts_per_token_bucket{le=\"4\"} 2") != std::string::npos);
    CHECK(t.find("kdial_batch_size_bucket{le=\"2\"} 1") != std::string::npos);
    CHECK(t.find("kdial_decode_step_seconds_count 1") != std::string::npos);
    CHECK(t.find("kdial_queue_length 1") != std::string::npos);
    CHECK(t.find("kdial_active_sequences 2") != std::string::npos);
}

namespace {

// Greedy tokens of one sequence run alone (prefill in one call, then one token at a time).
std::vector<std::int32_t> greedy_alone(olmoe::model& m, std::vector<std::int32_t> prompt, int k, int n)
{
    const auto& c = m.config();
    olmoe::kv_cache cache(c, prompt.size() + std::size_t(n) + 1);
    std::vector<float> logits(std::size_t(c.vocab));
    const kdial::matrix_view<float> lv(logits.data(), 1, logits.size());
    const std::vector<int> ks(std::size_t(c.layers), k);
    m.forward(prompt, cache, ks, lv, false);
    std::vector<std::int32_t> out;
    for (int i = 0; i < n; ++i) {
        const std::int32_t t = std::int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
        out.push_back(t);
        if (std::find(c.eos_ids.begin(), c.eos_ids.end(), t) != c.eos_ids.end())
            break;
        m.forward(std::span<const std::int32_t>(&t, 1), cache, ks, lv, false);
    }
    return out;
}

std::vector<std::int32_t> wait_ids(request_state& r)
{
    std::vector<std::int32_t> ids;
    for (int i = 0; i < 600; ++i) {
        auto d = r.take(std::chrono::milliseconds(100));
        ids.insert(ids.end(), d.ids.begin(), d.ids.end());
        if (d.done)
            return ids;
    }
    FAIL("request did not finish");
    return ids;
}

} // namespace

TEST_CASE("serve: engine batches requests at different k, each as alone [threads]")
{
    auto m = kdial::test::load_golden("olmoe-tiny-f32", 64);
    const std::vector<std::int32_t> pa { 3, 17, 52, 9, 200 }, pb { 44, 45, 46 };
    const auto want_a = greedy_alone(*m, pa, 1, 12);
    const auto want_b = greedy_alone(*m, pb, 4, 12);

    metrics met(8);
    engine_options o;
    o.max_batch = 2;
    o.max_queue = 1;
    o.ctx = 64;
    o.prefill_chunk = 4; // pa is fed in two chunks, interleaved with b's decode steps
    engine e(*m, nullptr, o, std::make_unique<fixed_policy>(4), met);
    auto req = [&](const std::vector<std::int32_t>& p, int k) {
        auto r = std::make_shared<request_state>();
        r->p.prompt = p;
        r->p.max_tokens = 12;
        r->p.sampling.temperature = 0;
        if (k)
            r->p.ks.assign(2, k);
        return r;
    };
    auto ra = req(pa, 1), rb = req(pb, 0); // b: the policy's k (4)
    CHECK(e.submit(rb) == engine::admit::ok);
    CHECK(e.submit(ra) == engine::admit::ok);
    CHECK(e.submit(req(pb, 2)) == engine::admit::ok); // waits in the queue
    CHECK(e.submit(req(pb, 2)) == engine::admit::full); // 2 slots + 1 queued
    e.start();
    CHECK(wait_ids(*ra) == std::vector<std::int32_t>(want_a.begin(), want_a.end()));
    CHECK(wait_ids(*rb) == want_b);
    CHECK(ra->experts_per_token == doctest::Approx(1.0));
    CHECK(rb->experts_per_token == doctest::Approx(4.0));
    CHECK(ra->finish_reason == (want_a.size() == 12 ? "length" : "stop"));

    // A cancelled request frees its slot at the next step.
    auto rc = req(pa, 2);
    rc->p.max_tokens = 50;
    CHECK(e.submit(rc) == engine::admit::ok);
    rc->cancelled = true;
    wait_ids(*rc);
    CHECK(rc->finish_reason == "cancelled");
    for (int i = 0; i < 100 && e.active() + e.queued() > 0; ++i)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    CHECK(e.active() == 0);
    CHECK(met.render().find("kdial_requests_cancelled_total 1") != std::string::npos);
    CHECK(e.drain(std::chrono::milliseconds(5000)) == 0);
    CHECK(e.submit(req(pb, 2)) == engine::admit::draining);
}
