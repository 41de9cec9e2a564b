// Rotary position embedding, rotate-half ("NeoX") pairing: for i < rot/2
// the pair (x_i, x_{i + rot/2}) of each head is rotated by pos * inv_freq[i].
// inv_freq and the angles are computed in fp32 exactly as Hugging Face does
// (inv_freq = 1 / theta^(2i/rot) in fp32, angle = float(pos) * inv_freq),
// cos/sin in double then rounded, so tables match the reference bit for bit
// up to libm rounding. Views only; deterministic.
#pragma once

#include <cmath>
#include <cstddef>

#include "../core/error.hpp"
#include "../core/views.hpp"

namespace kdial {

// inv_freq[i] = 1 / theta^(2i / rot_dim), i < rot_dim / 2, in fp32.
inline void rope_inv_freq(double theta, std::size_t rot_dim, float* inv_freq) noexcept
{
    for (std::size_t i = 0; i < rot_dim / 2; ++i) {
        const float e = float(2 * i) / float(rot_dim);
        inv_freq[i] = 1.0f / std::pow(float(theta), e);
    }
}

// cos/sin tables [T, rot_dim/2] for positions pos0 .. pos0 + T - 1.
inline void rope_tables(
    std::size_t pos0, std::size_t T, const float* inv_freq, std::size_t rot_dim, float* cos_t, float* sin_t) noexcept
{
    const std::size_t h = rot_dim / 2;
    for (std::size_t t = 0; t < T; ++t)
        for (std::size_t i = 0; i < h; ++i) {
            const float a = float(pos0 + t) * inv_freq[i];
            cos_t[t * h + i] = float(std::cos(double(a)));
            sin_t[t * h + i] = float(std::sin(double(a)));
        }
}

// Rotates the first rot_dim dims of every head of X [T, heads * head_dim]
// in place, row t with the angles of table row t.
inline void apply_rope(matrix_view<float> X, std::size_t heads, std::size_t head_dim, std::size_t rot_dim,
    const float* cos_t, const float* sin_t) noexcept
{
    const std::size_t h = rot_dim / 2;
    for (std::size_t t = 0; t < X.rows; ++t) {
        const float* c = cos_t + t * h;
        const float* s = sin_t + t * h;
        for (std::size_t hd = 0; hd < heads; ++hd) {
            float* x = X.row(t) + hd * head_dim;
            for (std::size_t i = 0; i < h; ++i) {
                const float a = x[i], b = x[i + h];
                x[i] = a * c[i] - b * s[i];
                x[i + h] = b * c[i] + a * s[i];
            }
        }
    }
}

} // namespace kdial
