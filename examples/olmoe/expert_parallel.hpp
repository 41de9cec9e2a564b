// `olmoe ... --expert-parallel` under mpirun: every rank runs the dense parts
// (embeddings, attention, norms, lm_head) on every token, as one process
// does; each MoE layer splits the tokens into one contiguous share per rank,
// runs kdial::distributed::forward (each rank computes only its own experts,
// a contiguous block of E / N), and gathers the layer's output rows back to
// every rank. The bits equal one process's at any k and rank count, with
// exact or int8 activations (--act: the model's act mode reaches the
// expert-parallel workspace through model::act_hook). Checkpoint
// tensors are memory-mapped views, so a rank touches (and holds in memory)
// only its own experts' pages (--weights int8 converts every expert on every
// rank: not yet split). Rank 0 prints; the other ranks' stdout and stderr go
// to /dev/null. Without MPI (KDIAL_OLMOE_MPI unset) --expert-parallel fails
// with a clear message.
#pragma once

#include "model.hpp"

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include <sys/resource.h>

#if KDIAL_OLMOE_MPI
#include <kdial/distributed/expert_parallel.hpp>
#endif

namespace olmoe::ep {

inline bool requested(int argc, char** argv)
{
    for (int i = 2; i < argc; ++i)
        if (std::string(argv[i]) == "--expert-parallel")
            return true;
    return false;
}

#if KDIAL_OLMOE_MPI

struct state {
    std::vector<std::unique_ptr<kdial::distributed::ep_weights>> layers; // null for dense layers
    std::unique_ptr<kdial::distributed::ep_workspace> ws;
    std::vector<int> counts, displs;
    int rank = 0, size = 1;
};

inline state*& current()
{
    static state* s = nullptr;
    return s;
}

inline int rank()
{
    return current() ? current()->rank : 0;
}

// MPI_Init; the other ranks print nothing. Call first thing in main.
inline void init(int& argc, char**& argv)
{
    MPI_Init(&argc, &argv);
    static state s;
    current() = &s;
    MPI_Comm_rank(MPI_COMM_WORLD, &s.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &s.size);
    if (s.rank != 0) {
        [[maybe_unused]] auto* o = std::freopen("/dev/null", "w", stdout);
        [[maybe_unused]] auto* e = std::freopen("/dev/null", "w", stderr);
    }
    std::atexit([] {
        current()->ws.reset();
        current()->layers.clear();
        MPI_Finalize();
    });
}

// Binds every MoE layer of m to its rank's experts (collective) and routes
// its MoE layers through kdial::distributed::forward.
inline void attach(model& m)
{
    state& s = *current();
    const auto& c = m.config();
    const std::size_t E = std::size_t(c.experts), N = std::size_t(s.size);
    const auto pl = kdial::distributed::expert_placement::contiguous(E, s.size);
    s.layers.resize(std::size_t(c.layers));
    for (std::size_t l = 0; l < s.layers.size(); ++l) {
        if (!c.is_moe_layer(int(l)))
            continue;
        const kdial::moe_weights& w = m.moe(l);
        kdial::expert_set local = w.experts().visit([&](const auto& list) {
            using EW = typename std::decay_t<decltype(list)>::value_type;
            std::vector<EW> v;
            for (std::int32_t e : pl.experts_of(s.rank))
                v.push_back(list[std::size_t(e)]);
            return v.empty() ? kdial::expert_set {} : kdial::expert_set(std::move(v), w.hidden(), w.ffn());
        });
        s.layers[l] = std::make_unique<kdial::distributed::ep_weights>(
            MPI_COMM_WORLD, pl, w.router(), std::move(local), w.routing(), w.shared());
        if (!s.ws) {
            // A rank gets at most ceil(T / N) of a call's T tokens; the model
            // keeps T * k within max_chunk * max_k(max_chunk) slots.
            const std::size_t T = (m.max_chunk() + N - 1) / N;
            const std::size_t slots = (m.max_chunk() * std::size_t(m.max_k(m.max_chunk())) + N - 1) / N + E;
            s.ws = std::make_unique<kdial::distributed::ep_workspace>(*s.layers[l], T, m.max_k(1), slots);
        }
    }
    // The model's activation mode (--act), now and on every later change.
    if (s.ws)
        s.ws->set_act_mode(m.act_mode());
    m.act_hook = [&s](kdial::act_mode a) {
        if (s.ws)
            s.ws->set_act_mode(a);
    };
    s.counts.resize(N);
    s.displs.resize(N);
    m.moe_hook = [&s](std::size_t l, kdial::cmatrix_view<float> a, kdial::matrix_view<float> h, int k,
                     std::span<const kdial::token_k> rules) {
        const std::size_t T = a.rows, d = a.cols, N = std::size_t(s.size), r = std::size_t(s.rank);
        for (std::size_t q = 0; q < N; ++q) {
            s.displs[q] = int(T * q / N * d);
            s.counts[q] = int((T * (q + 1) / N - T * q / N) * d);
        }
        const std::size_t t0 = T * r / N, n = T * (r + 1) / N - t0;
        const auto x = a.sub_rows(t0, n);
        const auto out = h.sub_rows(t0, n);
        constexpr auto acc = kdial::combine_mode::accumulate;
        if (k > 0)
            kdial::distributed::forward(*s.layers[l], *s.ws, x, kdial::dynamic_k { k }, out, acc);
        else
            kdial::distributed::forward(
                *s.layers[l], *s.ws, x, kdial::per_token_rules { rules.subspan(t0, n) }, out, acc);
        kdial::distributed::detail::mpi_check(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, h.data,
                                                  s.counts.data(), s.displs.data(), MPI_FLOAT, MPI_COMM_WORLD),
            "MPI_Allgatherv (layer output)");
    };
}

// Time in exchanges and rows sent by rank 0, and every rank's peak RSS, as
// a line for rank 0. Collective.
inline std::string summary()
{
    const state& s = *current();
    const auto& st = s.ws->stats();
    rusage ru {};
    getrusage(RUSAGE_SELF, &ru);
    const double gib = double(ru.ru_maxrss) / double(1 << 20); // ru_maxrss: KiB
    std::vector<double> all(std::size_t(s.size));
    MPI_Gather(&gib, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    std::string rss;
    for (double g : all)
        rss += kdial::detail::cat(rss.empty() ? "" : ", ", std::to_string(g).substr(0, 5));
    char b[320];
    std::snprintf(b, sizeof b,
        "[expert parallel: %d ranks; rank 0: %zu layer calls, %.3f s in exchanges, %.3f s in its experts, %zu rows "
        "(%.1f MB) sent; peak RSS per rank (GiB): %s]",
        s.size, st.calls, st.exchange_seconds, st.expert_seconds, st.rows_sent, double(st.bytes_sent) / 1e6,
        rss.c_str());
    return b;
}

#else

inline int rank()
{
    return 0;
}
inline void init(int&, char**&)
{
    throw kdial::error("--expert-parallel: this olmoe was built without MPI (apt-get install libopenmpi-dev "
                       "openmpi-bin, then reconfigure)");
}
inline void attach(model&) { }
inline std::string summary()
{
    return {};
}

#endif

} // namespace olmoe::ep
