// A self-contained SVG scatter plot written without any library: panels of
// quality against latency, axes with "nice" ticks (1, 2, 5 x 10^n), axis
// labels, one labelled point per operating point (the on-curve ones joined
// in order, the others drawn hollow). With named series (several models in
// one plot) each series is a line of its own colour, named in a legend.
// Opens in any browser.
#pragma once

#include <kdial/core/error.hpp>
#include <kdial/io/file.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace olmoe::svg {

struct point {
    double x, y;
    std::string label;
    bool on_curve = true; // joined, in order, with the other on-curve points
    int series = 0; // index into render's series names (one line per series)
};

struct panel {
    std::string title, x_label, y_label;
    std::vector<point> points;
    bool x_from_zero = true; // the x axis starts at 0 (latency: cost ratios read directly)
};

namespace detail {

inline std::string esc(const std::string& s)
{
    std::string o;
    for (char c : s)
        switch (c) {
        case '<':
            o += "&lt;";
            break;
        case '>':
            o += "&gt;";
            break;
        case '&':
            o += "&amp;";
            break;
        case '"':
            o += "&quot;";
            break;
        default:
            o += c;
        }
    return o;
}

inline std::string num(double v)
{
    char b[32];
    std::snprintf(b, sizeof b, "%.6g", v);
    return b;
}

// Ticks covering [lo, hi] at a 1/2/5 step, about n of them; widens the range
// to whole steps.
inline std::vector<double> nice_ticks(double& lo, double& hi, int n = 5)
{
    if (!(hi > lo)) {
        const double pad = lo != 0 ? std::fabs(lo) * 0.1 : 1.0;
        lo -= pad;
        hi += pad;
    }
    const double raw = (hi - lo) / n;
    const double mag = std::pow(10.0, std::floor(std::log10(raw)));
    const double f = raw / mag;
    const double step = (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * mag;
    lo = std::floor(lo / step) * step;
    hi = std::ceil(hi / step) * step;
    std::vector<double> t;
    for (double v = lo; v <= hi + step * 1e-9; v += step)
        t.push_back(std::fabs(v) < step * 1e-9 ? 0.0 : v);
    return t;
}

} // namespace detail

// Renders the panels side by side, `columns` to a row (0: all in one row).
// With series names, the points of series s form line s (its own colour, no
// point labels: the legend under the title names the lines).
inline std::string render(const std::string& title, const std::vector<panel>& panels,
    const std::vector<std::string>& series = {}, std::size_t columns = 0)
{
    using detail::esc;
    using detail::num;
    static const char* const palette[]
        = { "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22" };
    const std::size_t n_palette = sizeof palette / sizeof palette[0];
    const bool multi = !series.empty();
    const std::size_t cols = columns == 0 ? std::max<std::size_t>(1, panels.size()) : columns;
    const std::size_t rows = (panels.size() + cols - 1) / cols;
    const double pw = 460, ph = 360, ml = 70, mr = 20, mt = multi ? 84 : 60, mb = 60;
    const double head = multi ? 24 : 0; // the legend's row under the title
    const double width = double(std::min(cols, panels.size())) * (pw + ml + mr),
                 height = double(rows) * (ph + mt - head + mb) + head;
    std::ostringstream o;
    o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << width << "\" height=\"" << height
      << "\" viewBox=\"0 0 " << width << ' ' << height << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
      << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      << "<text x=\"" << width / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"16\" font-weight=\"bold\">"
      << esc(title) << "</text>\n";
    if (multi) { // legend: a short line of each series' colour and its name
        const double step = std::min(160.0, width / double(series.size()));
        double lx = width / 2 - step * double(series.size()) / 2;
        for (std::size_t s = 0; s < series.size(); ++s, lx += step)
            o << "<line x1=\"" << lx << "\" y1=\"42\" x2=\"" << lx + 24 << "\" y2=\"42\" stroke=\""
              << palette[s % n_palette] << "\" stroke-width=\"3\"/>\n<text x=\"" << lx + 30 << "\" y=\"46\">"
              << esc(series[s]) << "</text>\n";
    }
    for (std::size_t p = 0; p < panels.size(); ++p) {
        const panel& pn = panels[p];
        const double x0 = double(p % cols) * (pw + ml + mr) + ml, y0 = double(p / cols) * (ph + mt - head + mb) + mt;
        double xlo = 1e300, xhi = -1e300, ylo = 1e300, yhi = -1e300;
        for (const auto& q : pn.points) {
            if (!std::isfinite(q.x) || !std::isfinite(q.y))
                continue;
            xlo = std::min(xlo, q.x);
            xhi = std::max(xhi, q.x);
            ylo = std::min(ylo, q.y);
            yhi = std::max(yhi, q.y);
        }
        if (xlo > xhi) {
            xlo = ylo = 0;
            xhi = yhi = 1;
        }
        if (pn.x_from_zero)
            xlo = std::min(xlo, 0.0); // latency from 0: cost ratios read directly
        const auto xt = detail::nice_ticks(xlo, xhi), yt = detail::nice_ticks(ylo, yhi);
        auto X = [&](double v) { return x0 + (v - xlo) / (xhi - xlo) * pw; };
        auto Y = [&](double v) { return y0 + ph - (v - ylo) / (yhi - ylo) * ph; };
        o << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << y0 - 14 << "\" text-anchor=\"middle\" font-size=\"14\">"
          << esc(pn.title) << "</text>\n";
        for (double v : xt)
            o << "<line x1=\"" << X(v) << "\" y1=\"" << y0 << "\" x2=\"" << X(v) << "\" y2=\"" << y0 + ph
              << "\" stroke=\"#e4e4e4\"/>\n<line x1=\"" << X(v) << "\" y1=\"" << y0 + ph << "\" x2=\"" << X(v)
              << "\" y2=\"" << y0 + ph + 5 << "\" stroke=\"black\"/>\n<text x=\"" << X(v) << "\" y=\"" << y0 + ph + 18
              << "\" text-anchor=\"middle\">" << num(v) << "</text>\n";
        for (double v : yt)
            o << "<line x1=\"" << x0 << "\" y1=\"" << Y(v) << "\" x2=\"" << x0 + pw << "\" y2=\"" << Y(v)
              << "\" stroke=\"#e4e4e4\"/>\n<line x1=\"" << x0 - 5 << "\" y1=\"" << Y(v) << "\" x2=\"" << x0
              << "\" y2=\"" << Y(v) << "\" stroke=\"black\"/>\n<text x=\"" << x0 - 8 << "\" y=\"" << Y(v) + 4
              << "\" text-anchor=\"end\">" << num(v) << "</text>\n";
        o << "<rect x=\"" << x0 << "\" y=\"" << y0 << "\" width=\"" << pw << "\" height=\"" << ph
          << "\" fill=\"none\" stroke=\"black\"/>\n";
        o << "<text x=\"" << x0 + pw / 2 << "\" y=\"" << y0 + ph + 40 << "\" text-anchor=\"middle\">" << esc(pn.x_label)
          << "</text>\n";
        o << "<text transform=\"translate(" << x0 - 52 << ',' << y0 + ph / 2
          << ") rotate(-90)\" text-anchor=\"middle\">" << esc(pn.y_label) << "</text>\n";
        const std::size_t n_series = multi ? series.size() : 1;
        for (std::size_t s = 0; s < n_series; ++s) {
            std::string path;
            for (const auto& q : pn.points)
                if (q.on_curve && std::size_t(q.series) == s && std::isfinite(q.x) && std::isfinite(q.y))
                    path += (path.empty() ? "M" : " L") + num(X(q.x)) + ',' + num(Y(q.y));
            if (!path.empty())
                o << "<path d=\"" << path << "\" fill=\"none\" stroke=\""
                  << (multi ? palette[s % n_palette] : "#7aa6d6") << "\" stroke-width=\"" << (multi ? 2 : 1.5)
                  << "\"/>\n";
        }
        for (const auto& q : pn.points) {
            if (!std::isfinite(q.x) || !std::isfinite(q.y))
                continue;
            if (multi) {
                const std::string name = std::size_t(q.series) < series.size() ? series[std::size_t(q.series)] : "";
                o << "<circle cx=\"" << X(q.x) << "\" cy=\"" << Y(q.y) << "\" r=\"4\" fill=\""
                  << palette[std::size_t(q.series) % n_palette] << "\"><title>" << esc(name) << " " << esc(q.label)
                  << ": " << num(q.y) << "</title></circle>\n";
                continue;
            }
            o << "<circle cx=\"" << X(q.x) << "\" cy=\"" << Y(q.y) << "\" r=\"5\" "
              << (q.on_curve ? "fill=\"#1f5fa8\"" : "fill=\"white\" stroke=\"#c0392b\" stroke-width=\"2\"")
              << "><title>" << esc(q.label) << ": " << num(q.x) << ", " << num(q.y) << "</title></circle>\n"
              << "<text x=\"" << X(q.x) + 8 << "\" y=\"" << Y(q.y) - 8 << "\" font-size=\"11\">" << esc(q.label)
              << "</text>\n";
        }
    }
    o << "</svg>\n";
    return o.str();
}

// Writes the plot atomically (kdial/io/file.hpp).
inline void write(const std::string& path, const std::string& title, const std::vector<panel>& panels,
    const std::vector<std::string>& series = {}, std::size_t columns = 0)
{
    kdial::io::write_file_atomic(path, render(title, panels, series, columns));
}

} // namespace olmoe::svg
