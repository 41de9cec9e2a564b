// Server metrics of `olmoe serve`, rendered in the Prometheus text format
// (version 0.0.4) at GET /metrics. One mutex guards everything: the engine
// updates once per step, request threads once per request.
#pragma once

#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace olmoe::serve {

// A cumulative histogram with fixed upper bounds (le), as Prometheus expects.
struct histogram {
    std::vector<double> bounds;
    std::vector<std::uint64_t> counts; // [bounds + 1], the last is +Inf
    double sum = 0;
    std::uint64_t n = 0;

    explicit histogram(std::vector<double> b = {})
        : bounds(std::move(b))
        , counts(bounds.size() + 1, 0)
    {
    }
    void add(double x, std::uint64_t times = 1)
    {
        std::size_t i = 0;
        while (i < bounds.size() && x > bounds[i])
            ++i;
        counts[i] += times;
        sum += x * double(times);
        n += times;
    }
};

class metrics {
public:
    explicit metrics(int experts)
    {
        std::vector<double> kb;
        for (int k = 1; k < experts; k *= 2)
            kb.push_back(k);
        kb.push_back(experts);
        k_ = histogram(kb);
        std::vector<double> bb;
        for (int b = 1; b <= 256; b *= 2)
            bb.push_back(b);
        batch_ = histogram(bb);
        const std::vector<double> secs { 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30 };
        prefill_ = histogram(secs);
        decode_ = histogram(secs);
        ttft_ = histogram(secs);
    }

    // A finished HTTP request with its status code and endpoint.
    void request(int status, const std::string& endpoint)
    {
        std::lock_guard l(mu_);
        ++requests_[{ endpoint, status }];
    }
    void cancelled()
    {
        std::lock_guard l(mu_);
        ++cancelled_;
    }
    void prompt_tokens(std::size_t n)
    {
        std::lock_guard l(mu_);
        prompt_tokens_ += n;
    }
    void ttft(double s)
    {
        std::lock_guard l(mu_);
        ttft_.add(s);
    }
    // A forward step: decoding sequences, their generated tokens' k values
    // (mean over layers, one per sequence), prefill tokens, its time.
    void step(std::size_t decoding, const std::vector<double>& ks, std::size_t prefill_tokens, double seconds)
    {
        std::lock_guard l(mu_);
        ++steps_;
        if (decoding > 0) {
            batch_.add(double(decoding));
            if (prefill_tokens == 0)
                decode_.add(seconds);
        }
        if (prefill_tokens > 0)
            prefill_.add(seconds);
        for (double k : ks)
            k_.add(k);
        prefill_tokens_total_ += prefill_tokens;
    }
    void generated(std::size_t n)
    {
        std::lock_guard l(mu_);
        generated_ += n;
    }
    void set_gauges(std::size_t queued, std::size_t active, std::size_t max_batch)
    {
        std::lock_guard l(mu_);
        queued_ = queued;
        active_ = active;
        max_batch_ = max_batch;
    }

    std::string render() const
    {
        std::lock_guard l(mu_);
        std::string o;
        auto line = [&](const char* fmt, auto... a) {
            char buf[512];
            std::snprintf(buf, sizeof buf, fmt, a...);
            o += buf;
        };
        o += "# HELP kdial_requests_total HTTP requests answered, by endpoint and status code.\n"
             "# TYPE kdial_requests_total counter\n";
        for (const auto& [key, n] : requests_)
            line("kdial_requests_total{endpoint=\"%s\",code=\"%d\"} %llu\n", key.first.c_str(), key.second,
                (unsigned long long)n);
        counter(
            o, "kdial_requests_cancelled_total", "Requests cancelled (client gone, or shutdown timeout).", cancelled_);
        counter(o, "kdial_prompt_tokens_total", "Prompt tokens admitted.", prompt_tokens_);
        counter(o, "kdial_prefill_tokens_total", "Prompt tokens run through the model.", prefill_tokens_total_);
        counter(o, "kdial_generated_tokens_total", "Tokens generated.", generated_);
        counter(o, "kdial_steps_total", "Forward steps of the engine.", steps_);
        gauge(o, "kdial_queue_length", "Requests waiting for a slot.", queued_);
        gauge(o, "kdial_active_sequences", "Slots (KV caches) in use.", active_);
        gauge(o, "kdial_max_batch", "Slots (--max-batch).", max_batch_);
        hist(o, "kdial_batch_size", "Sequences decoded per forward step.", batch_);
        hist(o, "kdial_experts_per_token", "k of each generated token (mean over layers).", k_);
        hist(o, "kdial_prefill_step_seconds", "Time of forward steps that ran prompt tokens.", prefill_);
        hist(o, "kdial_decode_step_seconds", "Time of decode-only forward steps (per-token latency).", decode_);
        hist(o, "kdial_time_to_first_token_seconds", "From admission to the queue to the first token.", ttft_);
        return o;
    }

private:
    static void counter(std::string& o, const char* name, const char* help, std::uint64_t v)
    {
        o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " counter\n" + name + " "
            + std::to_string(v) + "\n";
    }
    static void gauge(std::string& o, const char* name, const char* help, std::uint64_t v)
    {
        o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " gauge\n" + name + " "
            + std::to_string(v) + "\n";
    }
    static std::string num(double x)
    {
        char b[64];
        std::snprintf(b, sizeof b, "%.17g", x);
        return b;
    }
    static void hist(std::string& o, const char* name, const char* help, const histogram& h)
    {
        o += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " histogram\n";
        std::uint64_t c = 0;
        for (std::size_t i = 0; i < h.bounds.size(); ++i) {
            c += h.counts[i];
            o += std::string(name) + "_bucket{le=\"" + num(h.bounds[i]) + "\"} " + std::to_string(c) + "\n";
        }
        c += h.counts.back();
        o += std::string(name) + "_bucket{le=\"+Inf\"} " + std::to_string(c) + "\n";
        o += std::string(name) + "_sum " + num(h.sum) + "\n" + name + "_count " + std::to_string(h.n) + "\n";
    }

    mutable std::mutex mu_;
    std::map<std::pair<std::string, int>, std::uint64_t> requests_;
    std::uint64_t cancelled_ = 0, prompt_tokens_ = 0, prefill_tokens_total_ = 0, generated_ = 0, steps_ = 0;
    std::size_t queued_ = 0, active_ = 0, max_batch_ = 0;
    histogram k_, batch_, prefill_, decode_, ttft_;
};

} // namespace olmoe::serve
