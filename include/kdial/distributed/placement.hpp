// Expert placement for expert parallelism: which rank owns which routed
// expert. Contiguous blocks by default (rank r owns a run of about E / N
// experts, the first E % N ranks one more), or any map. The placement also
// fixes the "wire order" of the experts (sorted by owner, then by id), in
// which every rank's rows for one destination form one contiguous block.
// Needs no MPI: the distributed layer (expert_parallel.hpp) uses it, and so
// can a loader that reads only its own experts' tensors.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "../core/error.hpp"

namespace kdial::distributed {

class expert_placement {
public:
    expert_placement() = default;

    // owner[e] in [0, ranks): the rank that holds expert e.
    expert_placement(std::vector<int> owner, int ranks)
        : owner_(std::move(owner))
        , ranks_(ranks)
    {
        constexpr const char* where = "kdial::distributed::expert_placement";
        detail::check(ranks >= 1, where, ": rank count ", ranks, " must be >= 1");
        detail::check(!owner_.empty(), where, ": no experts");
        for (std::size_t e = 0; e < owner_.size(); ++e)
            detail::check(owner_[e] >= 0 && owner_[e] < ranks, where, ": expert ", e, " placed on rank ", owner_[e],
                ", outside [0, ", ranks, ")");
        const std::size_t E = owner_.size();
        first_.assign(std::size_t(ranks) + 1, 0);
        for (int o : owner_)
            ++first_[std::size_t(o) + 1];
        for (int r = 0; r < ranks; ++r)
            first_[std::size_t(r) + 1] += first_[std::size_t(r)];
        wire_.resize(E);
        by_wire_.resize(E);
        std::vector<std::int32_t> fill(first_.begin(), first_.end() - 1);
        for (std::size_t e = 0; e < E; ++e) {
            const std::int32_t w = fill[std::size_t(owner_[e])]++;
            wire_[e] = w;
            by_wire_[std::size_t(w)] = std::int32_t(e);
        }
    }

    // Rank r owns experts [E r / N .. E (r + 1) / N) rounded so that the
    // first E % N ranks hold one more (E = 64, N = 3: 22, 21, 21).
    static expert_placement contiguous(std::size_t num_experts, int ranks)
    {
        detail::check(
            ranks >= 1, "kdial::distributed::expert_placement::contiguous: rank count ", ranks, " must be >= 1");
        std::vector<int> owner(num_experts);
        const std::size_t N = std::size_t(ranks), base = num_experts / N, extra = num_experts % N;
        std::size_t e = 0;
        for (std::size_t r = 0; r < N; ++r)
            for (std::size_t i = 0; i < base + (r < extra ? 1 : 0); ++i)
                owner[e++] = int(r);
        return expert_placement(std::move(owner), ranks);
    }

    int ranks() const noexcept { return ranks_; }
    std::size_t num_experts() const noexcept { return owner_.size(); }
    int owner(std::size_t e) const noexcept { return owner_[e]; }
    // Experts on rank r, ascending: the rank's local expert i is experts_of(r)[i].
    std::span<const std::int32_t> experts_of(int r) const noexcept
    {
        return { by_wire_.data() + first_[std::size_t(r)],
            std::size_t(first_[std::size_t(r) + 1] - first_[std::size_t(r)]) };
    }
    std::size_t count(int r) const noexcept { return experts_of(r).size(); }
    // Position of expert e in wire order; rank r's experts are the wire
    // positions [wire_begin(r), wire_begin(r + 1)).
    std::int32_t wire(std::size_t e) const noexcept { return wire_[e]; }
    std::int32_t wire_begin(int r) const noexcept { return first_[std::size_t(r)]; }
    std::span<const std::int32_t> wire_map() const noexcept { return wire_; }

    // A hash of the map (FNV-1a), for checking that ranks agree.
    std::uint64_t hash() const noexcept
    {
        std::uint64_t h = 1469598103934665603ull;
        auto mix = [&](std::uint64_t v) {
            for (int i = 0; i < 8; ++i) {
                h ^= (v >> (8 * i)) & 0xff;
                h *= 1099511628211ull;
            }
        };
        mix(std::uint64_t(ranks_));
        for (int o : owner_)
            mix(std::uint64_t(o));
        return h;
    }

private:
    std::vector<int> owner_;
    int ranks_ = 0;
    std::vector<std::int32_t> first_; // [ranks + 1] first wire position of each rank
    std::vector<std::int32_t> wire_; // [E] expert -> wire position
    std::vector<std::int32_t> by_wire_; // [E] wire position -> expert
};

} // namespace kdial::distributed
