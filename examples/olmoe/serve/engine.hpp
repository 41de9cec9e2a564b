// The engine of `olmoe serve`: continuous batching over one model.
//
// One thread runs the loop. Between forward steps it admits queued requests
// into free slots (a slot owns a KV cache of --ctx positions, allocated once
// at startup) and drops cancelled ones. Each step is ONE batched forward
// call (olmoe::model::forward_batch): every decoding sequence contributes
// its last token with its own routing (k, a per-layer schedule or
// threshold), and the remaining token budget (--prefill-chunk) goes to
// prompt chunks of sequences still in prefill, oldest first, so a long
// prompt is fed in pieces between decode steps instead of stalling them.
// After the step each sequence whose logits are final samples a token,
// streams its text to its request, and retires on EOS, a stop sequence or
// max_tokens. Request threads (HTTP) only enqueue and wait on their
// request's own queue; nothing they do blocks the loop.
#pragma once

#include "../model.hpp"
#include "api.hpp"
#include "metrics.hpp"
#include "policy.hpp"
#include "sampler.hpp"

#include <kdial/io/tokenizer.hpp>

#include <tbb/task_arena.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

namespace olmoe::serve {

using clock = std::chrono::steady_clock;

// One request as the engine and its HTTP thread share it.
struct request_state {
    request_params p;
    clock::time_point enqueued = clock::now();
    std::atomic<bool> cancelled { false }; // set by the HTTP thread (client gone)

    // Output so far, guarded by mu; the HTTP thread takes text and ids.
    std::mutex mu;
    std::condition_variable cv;
    std::string text;
    std::vector<std::int32_t> ids;
    bool done = false;
    std::string finish_reason; // stop, length, cancelled
    std::string error; // set when the request failed (finish_reason "error")
    std::size_t completion_tokens = 0;
    double experts_per_token = 0;

    // What the HTTP thread takes at once.
    struct delta {
        std::string text;
        std::vector<std::int32_t> ids;
        bool done = false;
    };
    // Waits up to `timeout` for new output; done: the request is finished
    // (then the fields above are final).
    delta take(std::chrono::milliseconds timeout)
    {
        std::unique_lock l(mu);
        cv.wait_for(l, timeout, [&] { return done || !text.empty() || !ids.empty(); });
        delta d { std::move(text), std::move(ids), done };
        text.clear();
        ids.clear();
        return d;
    }
};

struct engine_options {
    std::size_t max_batch = 8; // slots: sequences decoded together
    std::size_t max_queue = 64; // requests waiting for a slot; more: 503
    std::size_t ctx = 2048; // KV cache positions per slot
    std::size_t prefill_chunk = 128; // most tokens per step (decode tokens + prompt chunks)
    int threads = 1;
};

class engine {
public:
    enum class admit { ok, full, draining };

    engine(
        model& m, const kdial::io::bpe_tokenizer* tok, engine_options o, std::unique_ptr<k_policy> policy, metrics& met)
        : m_(m)
        , tok_(tok)
        , o_(o)
        , policy_(std::move(policy))
        , met_(met)
        , V_(std::size_t(m.config().vocab))
    {
        const auto& c = m.config();
        using kdial::detail::check;
        check(o.max_batch >= 1 && o.max_batch <= m.max_chunk(), "--max-batch ", o.max_batch, " must be in [1, ",
            m.max_chunk(), "]");
        check(o.prefill_chunk >= 1 && o.prefill_chunk <= m.max_chunk(), "--prefill-chunk ", o.prefill_chunk,
            " must be in [1, ", m.max_chunk(), "]");
        // Decode steps of max_batch sequences must fit the MoE workspace at any k.
        check(m.max_k(o.max_batch) >= c.experts, "--max-batch ", o.max_batch,
            " is too large for the MoE workspace at k = num_experts = ", c.experts);
        for (const auto& L : m.weights().layers)
            moe_layers_ += L.dense ? 0 : 1;
        slots_.resize(o.max_batch);
        for (auto& s : slots_) {
            s.cache = kv_cache(c, o.ctx);
            s.smp = sampler(V_);
        }
        logits_.resize(o.max_batch * 2 * V_);
        met_.set_gauges(0, 0, o.max_batch);
    }

    ~engine() { stop(); }
    engine(const engine&) = delete;
    engine& operator=(const engine&) = delete;

    k_policy& policy() noexcept { return *policy_; }
    const engine_options& options() const noexcept { return o_; }

    // Times a few decode steps at batch size 1 for each k in `ks` and
    // reports them to the policy (the latency policy's starting estimates).
    // Call before start().
    void calibrate(std::span<const int> ks, int steps = 4)
    {
        tbb::task_arena arena(o_.threads);
        arena.execute([&] {
            auto& s = slots_[0];
            std::vector<std::int32_t> prompt(std::min<std::size_t>(8, o_.ctx / 2), 0);
            for (std::size_t i = 0; i < prompt.size(); ++i)
                prompt[i] = std::int32_t((i * 7919 + 13) % V_);
            const kdial::matrix_view<float> lv(logits_.data(), 1, V_);
            for (int k : ks) {
                std::vector<int> kl(std::size_t(m_.config().layers), k);
                s.cache.reset();
                m_.forward(prompt, s.cache, kl, lv, false);
                std::vector<double> t;
                for (int i = 0; i < steps && s.cache.pos < o_.ctx; ++i) {
                    const std::int32_t next = std::int32_t(
                        std::max_element(logits_.begin(), logits_.begin() + std::ptrdiff_t(V_)) - logits_.begin());
                    const auto t0 = clock::now();
                    m_.forward(std::span<const std::int32_t>(&next, 1), s.cache, kl, lv, false);
                    t.push_back(std::chrono::duration<double>(clock::now() - t0).count());
                }
                std::sort(t.begin(), t.end());
                if (!t.empty())
                    policy_->observe(1, k, t[t.size() / 2]);
            }
            s.cache.reset();
        });
    }

    void start()
    {
        thread_ = std::thread([this] {
            tbb::task_arena arena(o_.threads);
            arena.execute([this] { loop(); });
        });
    }

    // Queues a request (checked by parse_request). full: the queue is at
    // --max-queue; draining: the server is shutting down.
    admit submit(const std::shared_ptr<request_state>& r)
    {
        {
            std::lock_guard l(mu_);
            if (draining_)
                return admit::draining;
            if (queue_.size() >= o_.max_queue + (o_.max_batch - active_))
                return admit::full;
            queue_.push_back(r);
            met_.set_gauges(queue_.size(), active_, o_.max_batch);
        }
        cv_.notify_all();
        return admit::ok;
    }

    std::size_t queued() const
    {
        std::lock_guard l(mu_);
        return queue_.size();
    }
    std::size_t active() const
    {
        std::lock_guard l(mu_);
        return active_;
    }
    bool draining() const
    {
        std::lock_guard l(mu_);
        return draining_;
    }

    // Stops admitting, lets queued and running requests finish for up to
    // `timeout`, then cancels what is left and stops the loop. Returns the
    // number of requests cancelled.
    std::size_t drain(std::chrono::milliseconds timeout)
    {
        std::unique_lock l(mu_);
        draining_ = true;
        cv_.notify_all();
        const bool idle = idle_cv_.wait_for(l, timeout, [&] { return queue_.empty() && active_ == 0; });
        std::size_t n = 0;
        if (!idle) {
            n = queue_.size() + active_;
            abort_ = true;
            cv_.notify_all();
            idle_cv_.wait(l, [&] { return queue_.empty() && active_ == 0; });
        }
        l.unlock();
        stop();
        return n;
    }

    // Stops the loop (requests still running are cancelled).
    void stop()
    {
        {
            std::lock_guard l(mu_);
            abort_ = true;
            stop_ = true;
        }
        cv_.notify_all();
        if (thread_.joinable())
            thread_.join();
    }

private:
    struct slot {
        std::shared_ptr<request_state> r; // null: free
        std::uint64_t order = 0; // admission order
        kv_cache cache;
        sampler smp;
        std::size_t prefilled = 0; // prompt tokens in the cache
        std::int32_t next = -1; // the token to feed when decoding
        bool policy_k = false; // k chosen by the policy every step
        std::vector<int> ks;
        std::optional<kdial::threshold_options> threshold;
        std::optional<kdial::io::bpe_stream_decoder> dec;
        std::string gen; // generated text (stop sequences are searched here)
        std::size_t sent = 0; // bytes of gen handed to the request
        std::size_t generated = 0;
        double kept_sum = 0; // experts used, summed over the request's tokens and MoE layers
        std::size_t kept_tokens = 0;
        bool decoding() const { return prefilled == r->p.prompt.size(); }
    };

    void loop()
    {
        for (;;) {
            {
                std::unique_lock l(mu_);
                cv_.wait(l, [&] { return stop_ || abort_ || !queue_.empty() || active_ > 0; });
                if (abort_) {
                    l.unlock();
                    abort_all();
                    l.lock();
                    if (stop_)
                        return;
                    abort_ = false;
                    continue;
                }
                admit_locked();
            }
            try {
                step();
            } catch (const std::exception& e) {
                fail_all(e.what());
            }
        }
    }

    // Moves queued requests into free slots (mu_ held).
    void admit_locked()
    {
        const auto& c = m_.config();
        for (auto& s : slots_) {
            if (queue_.empty())
                break;
            if (s.r)
                continue;
            auto r = std::move(queue_.front());
            queue_.pop_front();
            if (r->cancelled) {
                finish_request(*r, "cancelled", "", 0, 0);
                met_.cancelled();
                continue;
            }
            s.r = std::move(r);
            s.order = next_order_++;
            s.cache.reset();
            s.prefilled = 0;
            s.next = -1;
            s.policy_k = s.r->p.ks.empty() && !s.r->p.threshold;
            s.ks = s.policy_k ? std::vector<int>(std::size_t(c.layers), c.top_k) : s.r->p.ks;
            s.threshold = s.r->p.threshold;
            if (s.threshold) // the k list is not read; any valid value
                s.ks.assign(std::size_t(c.layers), s.threshold->k_max);
            sampling_params sp = s.r->p.sampling;
            if (!s.r->p.seeded)
                sp.seed = seed_rng_();
            s.smp.reset(sp);
            if (tok_)
                s.dec.emplace(*tok_, true);
            else
                s.dec.reset();
            s.gen.clear();
            s.sent = 0;
            s.generated = 0;
            s.kept_sum = 0;
            s.kept_tokens = 0;
            ++active_;
            met_.prompt_tokens(s.r->p.prompt.size());
        }
        met_.set_gauges(queue_.size(), active_, o_.max_batch);
    }

    void step()
    {
        // Cancelled (client gone): free the slot and its cache now.
        for (auto& s : slots_)
            if (s.r && s.r->cancelled) {
                met_.cancelled();
                retire(s, "cancelled");
            }
        std::vector<slot*> live;
        for (auto& s : slots_)
            if (s.r)
                live.push_back(&s);
        if (live.empty())
            return;
        std::sort(live.begin(), live.end(), [](const slot* a, const slot* b) { return a->order < b->order; });

        const int pk = policy_->choose(live.size());
        int kmax = 1;
        for (slot* s : live) {
            if (s->policy_k)
                std::fill(s->ks.begin(), s->ks.end(), pk);
            for (int k : s->ks)
                kmax = std::max(kmax, k);
        }
        std::size_t cap = std::min(o_.prefill_chunk, m_.max_chunk());
        while (cap > 1 && m_.max_k(cap) < std::min(kmax, m_.config().experts))
            cap /= 2;

        // Decoders first (one token each), then prompt chunks in the room left.
        seqs_.clear();
        who_.clear();
        std::size_t T = 0, prefill_tokens = 0, decoding = 0;
        for (slot* s : live)
            if (s->decoding()) {
                seqs_.push_back({ std::span<const std::int32_t>(&s->next, 1), &s->cache, route(*s), false });
                who_.push_back(s);
                ++T;
                ++decoding;
            }
        for (slot* s : live)
            if (!s->decoding()) {
                const std::size_t room = T < cap ? cap - T : 0;
                // A lone sequence may exceed the budget only if the decoders
                // left none (they never exceed cap: max_batch <= max_chunk).
                if (room == 0)
                    break;
                const std::size_t n = std::min(room, s->r->p.prompt.size() - s->prefilled);
                seqs_.push_back({ std::span<const std::int32_t>(s->r->p.prompt.data() + s->prefilled, n), &s->cache,
                    route(*s), false });
                who_.push_back(s);
                T += n;
                prefill_tokens += n;
            }
        if (seqs_.empty())
            return;
        const kdial::matrix_view<float> lv(logits_.data(), seqs_.size(), V_);
        const auto t0 = clock::now();
        m_.forward_batch(seqs_, lv);
        const double dt = std::chrono::duration<double>(clock::now() - t0).count();

        // Experts used per token (summed over MoE layers), per sequence.
        const auto kept = m_.last_kept();
        std::size_t row = 0;
        for (std::size_t i = 0; i < seqs_.size(); ++i) {
            slot& s = *who_[i];
            for (std::size_t t = 0; t < seqs_[i].tokens.size(); ++t)
                s.kept_sum += kept[row + t];
            s.kept_tokens += seqs_[i].tokens.size();
            row += seqs_[i].tokens.size();
        }

        // Sample where the logits are final; collect k of the decoded tokens.
        step_ks_.clear();
        const double L = double(std::max(1, moe_layers_));
        row = 0;
        std::size_t sampled = 0;
        for (std::size_t i = 0; i < seqs_.size(); ++i) {
            slot& s = *who_[i];
            const bool was_decoding = s.decoding();
            const std::size_t n = seqs_[i].tokens.size();
            if (!was_decoding)
                s.prefilled += n;
            if (was_decoding)
                step_ks_.push_back(double(kept[row]) / L);
            row += n;
            if (!s.decoding())
                continue;
            if (!was_decoding)
                met_.ttft(std::chrono::duration<double>(clock::now() - s.r->enqueued).count());
            ++sampled;
            emit(s, s.smp(std::span<const float>(lv.row(i), V_)));
        }
        met_.step(decoding, step_ks_, prefill_tokens, dt);
        met_.generated(sampled);

        // A decode-only step with one k everywhere is a measurement for the policy.
        if (prefill_tokens == 0 && decoding > 0) {
            bool uniform = true;
            const int k0 = who_[0]->ks[0];
            for (slot* s : who_)
                uniform = uniform && !s->threshold
                    && std::all_of(s->ks.begin(), s->ks.end(), [&](int k) { return k == k0; });
            if (uniform)
                policy_->observe(decoding, k0, dt);
        }
    }

    route_spec route(const slot& s) const { return route_spec { std::span<const int>(s.ks), s.threshold }; }

    // A new token of slot s: streams its text, retires the request if done.
    void emit(slot& s, std::int32_t tok)
    {
        auto& r = *s.r;
        const auto& c = m_.config();
        ++s.generated;
        s.next = tok;
        const bool eos = std::find(c.eos_ids.begin(), c.eos_ids.end(), tok) != c.eos_ids.end();
        std::string delta;
        bool stopped = eos;
        if (!eos && s.dec && tok_->is_valid_id(tok)) {
            const std::size_t before = s.gen.size();
            s.gen += s.dec->push(tok);
            stopped = find_stop(s, before);
        }
        const bool length = !stopped && (s.generated >= std::size_t(r.p.max_tokens) || s.cache.pos + 1 > o_.ctx);
        if ((stopped || length) && s.dec && !eos) {
            if (!stopped) {
                const std::size_t before = s.gen.size();
                s.gen += s.dec->flush();
                stopped = find_stop(s, before);
            }
        }
        const bool done = stopped || length;
        const std::size_t upto = done ? s.gen.size() : s.gen.size() - stop_holdback(s.gen, r.p.stop);
        if (upto > s.sent)
            delta = s.gen.substr(s.sent, upto - s.sent);
        s.sent = std::max(s.sent, upto);
        {
            std::lock_guard l(r.mu);
            r.text += delta;
            r.ids.push_back(tok);
        }
        r.cv.notify_all();
        if (done)
            retire(s, stopped ? "stop" : "length");
    }

    // Looks for a stop sequence in the text appended after `before`; if
    // found, cuts the text there.
    static bool find_stop(slot& s, std::size_t before)
    {
        std::size_t best = std::string::npos;
        for (const auto& st : s.r->p.stop) {
            const std::size_t from = before >= st.size() ? before - st.size() + 1 : 0;
            const std::size_t at = s.gen.find(st, from);
            best = std::min(best, at);
        }
        if (best == std::string::npos)
            return false;
        s.gen.resize(best);
        return true;
    }

    void finish_request(request_state& r, const char* reason, const std::string& error, std::size_t tokens, double ept)
    {
        {
            std::lock_guard l(r.mu);
            r.done = true;
            r.finish_reason = reason;
            r.error = error;
            r.completion_tokens = tokens;
            r.experts_per_token = ept;
        }
        r.cv.notify_all();
    }

    // Frees slot s (its cache is reset at once) and finishes its request.
    void retire(slot& s, const char* reason, const std::string& error = "")
    {
        const double ept = s.kept_tokens ? s.kept_sum / double(s.kept_tokens) / double(std::max(1, moe_layers_)) : 0;
        const auto r = std::move(s.r);
        s.cache.reset();
        {
            std::lock_guard l(mu_);
            --active_;
            met_.set_gauges(queue_.size(), active_, o_.max_batch);
        }
        // The slot is free before the client hears the request is done.
        finish_request(*r, reason, error, s.generated, ept);
        std::lock_guard l(mu_);
        if (active_ == 0 && queue_.empty())
            idle_cv_.notify_all();
    }

    void abort_all()
    {
        for (auto& s : slots_)
            if (s.r) {
                met_.cancelled();
                retire(s, "cancelled", "the server is shutting down");
            }
        std::deque<std::shared_ptr<request_state>> q;
        {
            std::lock_guard l(mu_);
            q.swap(queue_);
            met_.set_gauges(0, active_, o_.max_batch);
        }
        for (auto& r : q) {
            met_.cancelled();
            finish_request(*r, "cancelled", "the server is shutting down", 0, 0);
        }
        std::lock_guard l(mu_);
        idle_cv_.notify_all();
    }

    void fail_all(const std::string& what)
    {
        for (auto& s : slots_)
            if (s.r)
                retire(s, "error", what);
    }

    model& m_;
    const kdial::io::bpe_tokenizer* tok_;
    engine_options o_;
    std::unique_ptr<k_policy> policy_;
    metrics& met_;
    std::size_t V_;
    int moe_layers_ = 0;
    std::vector<slot> slots_;
    std::vector<float> logits_;
    std::vector<sequence_step> seqs_;
    std::vector<slot*> who_;
    std::vector<double> step_ks_;
    std::uint64_t next_order_ = 0;
    std::mt19937_64 seed_rng_ { std::random_device {}() };

    mutable std::mutex mu_;
    std::condition_variable cv_, idle_cv_;
    std::deque<std::shared_ptr<request_state>> queue_;
    std::size_t active_ = 0;
    bool draining_ = false, abort_ = false, stop_ = false;
    std::thread thread_;
};

} // namespace olmoe::serve
