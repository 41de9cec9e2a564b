// Per-layer k schedules from the command line: "8,8,4,4" (one k per layer)
// or ranges "4@0-7,2@8-15" (k@first-last, or k@layer). Every layer must be
// covered exactly once and every k be in [1, num_experts]; errors are
// kdial::error naming the item.
#pragma once

#include "parse.hpp"

#include <kdial/core/error.hpp>

#include <string>
#include <vector>

namespace olmoe {

namespace detail {
inline long schedule_int(const std::string& item, const std::string& s)
{
    const auto x = parse_long(s);
    if (item == s)
        kdial::detail::check(x && s[0] != '+' && s[0] != ' ', "--k-schedule: '", s, "' is not an integer");
    else
        kdial::detail::check(
            x && s[0] != '+' && s[0] != ' ', "--k-schedule: '", item, "': '", s, "' is not an integer");
    return *x;
}
} // namespace detail

// Parses a k schedule for `layers` layers of `experts` experts.
inline std::vector<int> parse_k_schedule(const std::string& spec, int layers, int experts)
{
    using kdial::detail::check;
    check(!spec.empty(), "--k-schedule is empty");
    std::vector<std::string> items;
    for (std::size_t p = 0; p <= spec.size();) {
        const std::size_t q = std::min(spec.find(',', p), spec.size());
        items.push_back(spec.substr(p, q - p));
        p = q + 1;
    }
    std::vector<int> ks(std::size_t(layers), 0);
    const bool ranges = spec.find('@') != std::string::npos;
    if (!ranges) // each entry a number first, so "abc" is not reported as a wrong entry count
        for (const auto& it : items)
            detail::schedule_int(it, it);
    if (!ranges)
        check(items.size() == std::size_t(layers), "--k-schedule '", spec, "' has ", items.size(),
            " entries; the model has ", layers, " layers (give one k per layer, or ranges such as 4@0-", layers - 1,
            ")");
    for (std::size_t i = 0; i < items.size(); ++i) {
        const std::string& it = items[i];
        long k;
        long first = long(i), last = long(i);
        if (ranges) {
            const std::size_t at = it.find('@');
            check(at != std::string::npos, "--k-schedule: '", it, "' has no '@' (write k@first-last, e.g. 4@0-7)");
            k = detail::schedule_int(it, it.substr(0, at));
            const std::string r = it.substr(at + 1);
            const std::size_t dash = r.find('-');
            first = detail::schedule_int(it, r.substr(0, dash));
            last = dash == std::string::npos ? first : detail::schedule_int(it, r.substr(dash + 1));
            check(first <= last, "--k-schedule: '", it, "': range ", first, "-", last, " is empty");
            check(first >= 0 && last < layers, "--k-schedule: '", it, "': layers ", first, "-", last,
                " are outside [0, ", layers - 1, "]");
        } else
            k = detail::schedule_int(it, it);
        check(k >= 1 && k <= experts, "--k-schedule: '", it, "': k = ", k, " is outside [1, num_experts = ", experts,
            "]");
        for (long l = first; l <= last; ++l) {
            check(ks[std::size_t(l)] == 0, "--k-schedule: layer ", l, " is given twice (again in '", it, "')");
            ks[std::size_t(l)] = int(k);
        }
    }
    for (int l = 0; l < layers; ++l)
        check(ks[std::size_t(l)] != 0, "--k-schedule '", spec, "' does not cover layer ", l);
    return ks;
}

// A short label for a schedule: "4" when uniform, else ranges "4@0-7,2@8-15".
inline std::string schedule_label(const std::vector<int>& ks)
{
    if (ks.empty())
        return "";
    bool uniform = true;
    for (int k : ks)
        uniform = uniform && k == ks[0];
    if (uniform)
        return std::to_string(ks[0]);
    std::string s;
    for (std::size_t a = 0; a < ks.size();) {
        std::size_t b = a;
        while (b + 1 < ks.size() && ks[b + 1] == ks[a])
            ++b;
        if (!s.empty())
            s += ',';
        s += std::to_string(ks[a]);
        s += '@';
        s += std::to_string(a);
        if (b > a) {
            s += '-';
            s += std::to_string(b);
        }
        a = b + 1;
    }
    return s;
}

} // namespace olmoe
