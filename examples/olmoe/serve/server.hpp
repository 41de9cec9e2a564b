// The HTTP side of `olmoe serve` on cpp-httplib: the OpenAI-compatible
// endpoints, server-sent events, 400/503 answers, and the SIGINT/SIGTERM
// drain. Each request runs on an httplib worker thread that parses and
// checks the body (api.hpp), queues it to the engine (engine.hpp) and waits
// on its own request_state for tokens; the engine thread does all the
// model work.
#pragma once

#include "api.hpp"
#include "engine.hpp"
#include "metrics.hpp"
#include "policy.hpp"

#include <httplib.h>

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <ctime>
#include <memory>
#include <string>
#include <thread>

namespace olmoe::serve {

struct server_options {
    std::string host = "127.0.0.1";
    int port = 8080; // 0: any free port (printed)
    std::string model_name; // GET /v1/models and the responses' "model"
    engine_options engine;
    std::chrono::milliseconds drain_timeout { 30000 };
};

namespace detail {

inline json usage_json(const request_state& r)
{
    return { { "prompt_tokens", r.p.prompt.size() }, { "completion_tokens", r.completion_tokens },
        { "total_tokens", r.p.prompt.size() + r.completion_tokens },
        { "experts_per_token", std::round(r.experts_per_token * 1e4) / 1e4 } };
}

// One choice of a response or of a stream chunk.
inline json choice(const request_state& r, const std::string& text, const std::vector<std::int32_t>* ids,
    const json& finish, bool chunk, bool first)
{
    json c = { { "index", 0 } };
    if (r.p.kind == endpoint::completions)
        c["text"] = text;
    else if (!chunk)
        c["message"] = { { "role", "assistant" }, { "content", text } };
    else {
        c["delta"] = json::object();
        if (first)
            c["delta"]["role"] = "assistant";
        if (!text.empty() || first)
            c["delta"]["content"] = text;
    }
    c["logprobs"] = nullptr;
    c["finish_reason"] = finish;
    if (ids && r.p.return_token_ids)
        c["token_ids"] = *ids;
    return c;
}

inline std::string sse(const json& j)
{
    return "data: " + j.dump() + "\n\n";
}

} // namespace detail

// Serves until SIGINT or SIGTERM, then drains: new requests get 503, queued
// and running ones finish within drain_timeout (then they are cancelled),
// and the function returns 0. Blocks both signals in every thread it starts
// and waits for them on a thread of its own.
inline int run_server(model& m, const kdial::io::bpe_tokenizer* tok, const server_options& o,
    std::unique_ptr<k_policy> pol, const std::string& policy_desc)
{
    const auto& cfg = m.config();
    const limits lim { o.engine.ctx };
    metrics met(cfg.experts);

    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, nullptr); // inherited by every thread started below
    std::signal(SIGPIPE, SIG_IGN); // a client gone mid-write is an error return, not a kill

    engine eng(m, tok, o.engine, std::move(pol), met);
    if (auto* lp = dynamic_cast<latency_policy*>(&eng.policy())) {
        std::fprintf(stderr, "olmoe serve: timing decode at k =");
        for (int k : lp->candidates())
            std::fprintf(stderr, " %d", k);
        std::fprintf(stderr, " for the latency policy\n");
        eng.calibrate(lp->candidates());
        for (int k : lp->candidates())
            std::fprintf(stderr, "  k=%d: %.2f ms per decode step (batch 1)\n", k, lp->estimate_for(1, k) * 1e3);
    }
    eng.start();

    httplib::Server svr;
    const std::size_t pool = o.engine.max_batch + o.engine.max_queue + 8;
    svr.new_task_queue = [pool] { return new httplib::ThreadPool(pool); };
    svr.set_payload_max_length(std::size_t(64) << 20);
    std::atomic<std::uint64_t> next_id { 1 };

    auto reply_error = [&](httplib::Response& res, const api_error& e) {
        res.status = e.status;
        if (e.status == 503)
            res.set_header("Retry-After", "1");
        res.set_content(e.body().dump(), "application/json");
    };

    auto handle = [&](const httplib::Request& req, httplib::Response& res, endpoint kind) {
        try {
            auto r = std::make_shared<request_state>();
            r->p = parse_request(req.body, kind, cfg, tok, lim);
            switch (eng.submit(r)) {
            case engine::admit::full:
                throw api_error(503,
                    "the server is busy: " + std::to_string(eng.queued()) + " requests wait for "
                        + std::to_string(o.engine.max_batch) + " slots (--max-queue "
                        + std::to_string(o.engine.max_queue) + "); retry later",
                    "", "server_busy", "server_error");
            case engine::admit::draining:
                throw api_error(503, "the server is shutting down", "", "shutting_down", "server_error");
            case engine::admit::ok:
                break;
            }
            res.status = 200;
            const bool chat = kind == endpoint::chat;
            const std::string id = std::string(chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id++);
            const std::int64_t created = std::int64_t(std::time(nullptr));
            json head = { { "id", id },
                { "object", chat ? (r->p.stream ? "chat.completion.chunk" : "chat.completion") : "text_completion" },
                { "created", created }, { "model", o.model_name } };
            if (!r->p.stream) {
                std::string text;
                std::vector<std::int32_t> ids;
                for (;;) {
                    auto d = r->take(std::chrono::milliseconds(1000));
                    text += d.text;
                    ids.insert(ids.end(), d.ids.begin(), d.ids.end());
                    if (d.done)
                        break;
                }
                if (!r->error.empty())
                    throw api_error(r->finish_reason == "cancelled" ? 503 : 500, r->error, "",
                        r->finish_reason == "cancelled" ? "shutting_down" : "internal_error", "server_error");
                json out = head;
                out["choices"] = json::array({ detail::choice(*r, text, &ids, r->finish_reason, false, false) });
                out["usage"] = detail::usage_json(*r);
                res.set_content(out.dump(), "application/json");
            } else {
                auto first = std::make_shared<bool>(true);
                auto quiet = std::make_shared<int>(0);
                res.set_header("Cache-Control", "no-cache");
                res.set_chunked_content_provider(
                    "text/event-stream",
                    [r, head, first, quiet](std::size_t, httplib::DataSink& sink) {
                        auto d = r->take(std::chrono::milliseconds(200));
                        auto write = [&](const std::string& s) {
                            if (!sink.write(s.data(), s.size())) {
                                r->cancelled = true; // the client is gone: free its slot
                                return false;
                            }
                            return true;
                        };
                        if (!d.text.empty() || !d.ids.empty() || (*first && d.done && r->error.empty())) {
                            json c = head;
                            c["choices"] = json::array({ detail::choice(*r, d.text, &d.ids, nullptr, true, *first) });
                            *first = false;
                            *quiet = 0;
                            if (!write(detail::sse(c)))
                                return false;
                        } else if (!d.done && ++*quiet >= 5) { // ~1 s without output: probe the connection
                            *quiet = 0;
                            if (!write(": keep-alive\n\n"))
                                return false;
                        }
                        if (d.done) {
                            if (!r->error.empty()) {
                                const api_error e(r->finish_reason == "cancelled" ? 503 : 500, r->error, "",
                                    r->finish_reason == "cancelled" ? "shutting_down" : "internal_error",
                                    "server_error");
                                if (!write(detail::sse(e.body())))
                                    return false;
                            } else {
                                json c = head;
                                c["choices"]
                                    = json::array({ detail::choice(*r, "", nullptr, r->finish_reason, true, false) });
                                c["usage"] = detail::usage_json(*r);
                                if (!write(detail::sse(c)))
                                    return false;
                            }
                            if (!write("data: [DONE]\n\n"))
                                return false;
                            sink.done();
                        }
                        return true;
                    },
                    [r](bool success) {
                        if (!success)
                            r->cancelled = true;
                    });
            }
        } catch (const api_error& e) {
            reply_error(res, e);
        }
        met.request(res.status, kind == endpoint::chat ? "/v1/chat/completions" : "/v1/completions");
    };

    svr.Post("/v1/completions",
        [&](const httplib::Request& q, httplib::Response& s) { handle(q, s, endpoint::completions); });
    svr.Post(
        "/v1/chat/completions", [&](const httplib::Request& q, httplib::Response& s) { handle(q, s, endpoint::chat); });
    svr.Get("/v1/models", [&](const httplib::Request&, httplib::Response& res) {
        const json j = { { "object", "list" },
            { "data",
                json::array({ { { "id", o.model_name }, { "object", "model" }, { "created", 0 },
                    { "owned_by", "kdial" }, { "num_experts", cfg.experts }, { "trained_k", cfg.top_k },
                    { "num_layers", cfg.layers }, { "context", o.engine.ctx }, { "policy", policy_desc } } }) } };
        res.status = 200;
        res.set_content(j.dump(), "application/json");
        met.request(200, "/v1/models");
    });
    svr.Get("/health", [&](const httplib::Request&, httplib::Response& res) {
        const bool d = eng.draining();
        res.status = d ? 503 : 200;
        res.set_content(json { { "status", d ? "draining" : "ok" } }.dump(), "application/json");
    });
    svr.Get("/metrics", [&](const httplib::Request&, httplib::Response& res) {
        res.set_content(met.render(), "text/plain; version=0.0.4");
    });
    svr.set_exception_handler([&](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "internal error";
        try {
            std::rethrow_exception(ep);
        } catch (const std::exception& e) {
            what = e.what();
        } catch (...) {
        }
        reply_error(res, api_error(500, what, "", "internal_error", "server_error"));
    });

    int port = o.port;
    if (port == 0)
        port = svr.bind_to_any_port(o.host);
    else if (!svr.bind_to_port(o.host, port))
        port = -1;
    if (port < 0) {
        eng.stop();
        throw kdial::error(kdial::detail::cat("cannot listen on ", o.host, ":", o.port));
    }

    std::atomic<bool> signalled { false };
    std::thread waiter([&] {
        int sig = 0;
        sigwait(&sigs, &sig);
        signalled = true;
        std::fprintf(stderr, "olmoe serve: %s: draining (%zu queued, %zu running, up to %.0f s)\n",
            sig == SIGINT ? "SIGINT" : "SIGTERM", eng.queued(), eng.active(), double(o.drain_timeout.count()) / 1e3);
        const std::size_t cancelled = eng.drain(o.drain_timeout);
        if (cancelled)
            std::fprintf(stderr, "olmoe serve: cancelled %zu requests at the drain timeout\n", cancelled);
        svr.stop();
    });
    std::fprintf(stderr, "olmoe serve: listening on http://%s:%d (%s, policy %s, %zu slots of %zu positions)\n",
        o.host.c_str(), port, o.model_name.c_str(), policy_desc.c_str(), o.engine.max_batch, o.engine.ctx);
    std::fflush(stderr);
    svr.listen_after_bind();
    if (!signalled)
        kill(getpid(), SIGTERM); // wakes the waiter, which drains
    waiter.join();
    std::fprintf(stderr, "olmoe serve: stopped\n");
    return 0;
}

} // namespace olmoe::serve
