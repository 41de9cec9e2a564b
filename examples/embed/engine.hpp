// A small engine of its own, shaped like the ones that embed kdial: it owns
// its weights as one stacked buffer per tensor (as a GGUF or vLLM engine
// holds them: router [E, d], fused gate+up [E, 2F, d], down [E, d, F], bf16),
// runs its own std::thread pool, serves several request streams at once,
// and adds the MoE output into each stream's residual. kdial sees views of
// the buffers (moe_weights, shared by every stream), one moe_workspace per
// stream, and the pool through the executor hook (parallel_for).
#pragma once

#include <kdial/kdial.hpp>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace embed {

// The engine's thread pool. parallel_for(n, f) is kdial's executor hook:
// the caller and the workers claim indices of the job from an atomic
// counter until all n have run. Jobs of several callers (streams) may be in
// flight at once; each lives on its caller's stack (no allocation per call).
class thread_pool {
public:
    explicit thread_pool(int workers)
    {
        for (int i = 0; i < workers; ++i)
            threads_.emplace_back([this] { work(); });
    }
    ~thread_pool()
    {
        {
            std::lock_guard lk(m_);
            stop_ = true;
        }
        cv_work_.notify_all();
        for (auto& t : threads_)
            t.join();
    }
    thread_pool(const thread_pool&) = delete;
    thread_pool& operator=(const thread_pool&) = delete;

    void parallel_for(std::size_t n, kdial::parallel::tile_fn f) const
    {
        job j { f, n };
        {
            std::lock_guard lk(m_);
            j.next_job = jobs_;
            jobs_ = &j;
        }
        cv_work_.notify_all();
        while (run_one(j)) { }
        std::unique_lock lk(m_);
        cv_done_.wait(lk, [&] { return j.done.load() == n && j.users == 0; });
        job** p = &jobs_;
        while (*p != &j)
            p = &(*p)->next_job;
        *p = j.next_job;
    }

private:
    struct job {
        kdial::parallel::tile_fn f;
        std::size_t n;
        std::atomic<std::size_t> next { 0 }, done { 0 };
        int users = 0; // workers inside the job (guarded by m_)
        job* next_job = nullptr;
    };

    static bool run_one(job& j)
    {
        const std::size_t i = j.next.fetch_add(1);
        if (i >= j.n)
            return false;
        j.f(i);
        j.done.fetch_add(1);
        return true;
    }

    job* open_job() const
    {
        for (job* j = jobs_; j; j = j->next_job)
            if (j->next.load() < j->n)
                return j;
        return nullptr;
    }

    void work() const
    {
        std::unique_lock lk(m_);
        for (;;) {
            cv_work_.wait(lk, [&] { return stop_ || open_job(); });
            if (stop_)
                return;
            job* j = open_job();
            ++j->users;
            lk.unlock();
            while (run_one(*j)) { }
            lk.lock();
            --j->users;
            cv_done_.notify_all();
        }
    }

    mutable std::mutex m_;
    mutable std::condition_variable cv_work_, cv_done_;
    mutable job* jobs_ = nullptr;
    bool stop_ = false;
    std::vector<std::thread> threads_;
};
static_assert(kdial::parallel::executor<thread_pool>);

// The engine's weights for one MoE layer: one buffer per tensor.
struct layer_buffers {
    std::size_t E, d, F;
    std::vector<float> router; // [E, d]
    std::vector<kdial::bf16> w13; // [E, 2F, d]: expert e's gate rows, then its up rows
    std::vector<kdial::bf16> w2; // [E, d, F]

    layer_buffers(std::size_t E_, std::size_t d_, std::size_t F_, std::uint32_t seed)
        : E(E_)
        , d(d_)
        , F(F_)
        , router(E * d)
        , w13(E * 2 * F * d)
        , w2(E * d * F)
    {
        std::uint32_t x = seed;
        auto next = [&] { // xorshift, values in [-1, 1)
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            return float(x >> 8) / float(1 << 23) - 1.0f;
        };
        for (auto& v : router)
            v = next();
        for (auto& v : w13)
            v = kdial::bf16::from_float(0.2f * next());
        for (auto& v : w2)
            v = kdial::bf16::from_float(0.2f * next());
    }

    // kdial's view of the buffers: nothing is copied.
    kdial::moe_weights stacked() const
    {
        using SW = kdial::stacked_weight<kdial::bf16_t>;
        return kdial::moe_weights(kdial::cmatrix_view<float>(router.data(), E, d),
            kdial::expert_set::stacked_fused(E, SW { w13.data(), 2 * F, d }, SW { w2.data(), d, F }));
    }

    // The same weights as kdial's per-expert list (the classic layer path).
    kdial::moe_weights per_expert() const
    {
        std::vector<kdial::expert_weights<kdial::bf16_t>> v;
        for (std::size_t e = 0; e < E; ++e) {
            const kdial::bf16* g = w13.data() + e * 2 * F * d;
            v.push_back({ { g, F, d }, { g + F * d, F, d }, { w2.data() + e * d * F, d, F } });
        }
        return kdial::moe_weights(
            kdial::cmatrix_view<float>(router.data(), E, d), kdial::expert_set(std::move(v), d, F));
    }
};

// One request stream: its own workspace and residual [T, d]; each step adds
// the MoE output of its hidden states into the residual.
struct stream {
    kdial::moe_workspace ws;
    std::vector<float> x, residual; // [T, d]
    std::size_t T, d;

    stream(const kdial::moe_weights& w, std::size_t T_, std::uint32_t seed)
        : ws(w.shape(T_, 4))
        , x(T_ * w.hidden())
        , residual(T_ * w.hidden())
        , T(T_)
        , d(w.hidden())
    {
        for (std::size_t i = 0; i < x.size(); ++i) {
            x[i] = float(int((i * 2654435761u + seed) % 2001) - 1000) / 1000.0f;
            residual[i] = float(int((i * 40503u + seed) % 201) - 100) / 100.0f;
        }
    }

    // `steps` decode-like steps at k = 1 + (step + seed) % 4, on executor ex.
    void run(const kdial::moe_weights& w, int steps, kdial::executor_ref ex)
    {
        for (int s = 0; s < steps; ++s) {
            kdial::moe::forward(w, ws, kdial::cmatrix_view<float>(x.data(), T, d), 1 + (s + int(T)) % 4,
                kdial::matrix_view<float>(residual.data(), T, d), kdial::combine_mode::accumulate, ex);
            // The next step's input: the residual so far (like a real stack).
            x = residual;
        }
    }
};

} // namespace embed
