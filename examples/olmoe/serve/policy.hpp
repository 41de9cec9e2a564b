// The k policy of `olmoe serve`: which k a request gets when it does not
// declare one ("k", "k_schedule" or "threshold" in the request). The engine
// asks the policy before every forward step, so a policy may follow the load;
// it reports each decode-only step's measured time back. Add a policy by
// deriving from k_policy.
#pragma once

#include <kdial/core/error.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace olmoe::serve {

class k_policy {
public:
    virtual ~k_policy() = default;
    virtual std::string name() const = 0;
    // k (every MoE layer) for the sequences without their own, in a step
    // that decodes `batch` sequences (at least 1).
    virtual int choose(std::size_t batch) = 0;
    // A decode-only step (no prefill tokens) of `batch` sequences that all
    // ran at k took `seconds`.
    virtual void observe(std::size_t /*batch*/, int /*k*/, double /*seconds*/) { }
};

// Always the same k: --k, or the checkpoint's trained k.
class fixed_policy final : public k_policy {
public:
    explicit fixed_policy(int k)
        : k_(k)
    {
    }
    std::string name() const override { return "fixed"; }
    int choose(std::size_t) override { return k_; }

private:
    int k_;
};

// Holds a per-token decode latency target. Rule: among the candidate k
// (powers of two up to k_max, and k_max), pick the largest whose estimated
// decode step time at the current batch size B is at most the target; if
// none meets it, the smallest. The estimate for (B, k) is the running mean
// (exponential, weight 0.25 on the newest) of the measured decode-only steps
// of B sequences all at k; a pair not yet measured borrows the estimate of
// the largest measured batch size below B at that k (a step costs at least
// as much with more sequences, so this errs towards larger k, and the first
// step at (B, k) then measures it); a k never measured at all counts as
// meeting the target, so it gets measured. The server seeds batch size 1 by
// timing a few decode steps at every candidate k at startup.
class latency_policy final : public k_policy {
public:
    latency_policy(double target_seconds, int k_max, std::size_t max_batch)
        : target_(target_seconds)
    {
        kdial::detail::check(target_seconds > 0, "latency policy: the target must be > 0");
        kdial::detail::check(k_max >= 1, "latency policy: k_max must be >= 1");
        for (int k = 1; k < k_max; k *= 2)
            ks_.push_back(k);
        ks_.push_back(k_max);
        cost_.assign((max_batch + 1) * ks_.size(), -1.0);
        max_batch_ = max_batch;
    }

    std::string name() const override { return "latency"; }
    const std::vector<int>& candidates() const noexcept { return ks_; }
    double target() const noexcept { return target_; }

    int choose(std::size_t batch) override
    {
        for (std::size_t i = ks_.size(); i-- > 0;) {
            const double e = estimate(batch, i);
            if (e < 0 || e <= target_)
                return ks_[i];
        }
        return ks_[0];
    }

    void observe(std::size_t batch, int k, double seconds) override
    {
        const auto it = std::find(ks_.begin(), ks_.end(), k);
        if (it == ks_.end() || batch == 0 || batch > max_batch_)
            return;
        double& c = cost_[batch * ks_.size() + std::size_t(it - ks_.begin())];
        c = c < 0 ? seconds : 0.75 * c + 0.25 * seconds;
    }

    // The estimate for `batch` sequences at candidate k (-1: no measurement
    // at that k for any batch size up to `batch`).
    double estimate_for(std::size_t batch, int k) const
    {
        const auto it = std::find(ks_.begin(), ks_.end(), k);
        return it == ks_.end() ? -1 : estimate(batch, std::size_t(it - ks_.begin()));
    }

private:
    double estimate(std::size_t batch, std::size_t i) const
    {
        for (std::size_t b = std::min(batch, max_batch_); b >= 1; --b)
            if (const double c = cost_[b * ks_.size() + i]; c >= 0)
                return c;
        return -1;
    }

    double target_;
    std::vector<int> ks_;
    std::vector<double> cost_; // [max_batch + 1][ks], -1: not measured
    std::size_t max_batch_ = 0;
};

} // namespace olmoe::serve
