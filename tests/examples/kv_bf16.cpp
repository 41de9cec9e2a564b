// The bf16 KV cache (olmoe --kv bf16, model.hpp kv_cache): every cached key
// and value is the round-to-nearest-even of the f32 one, attention reads
// them widened exactly (simd::dot_w / axpy_w), so the logits move by the
// rounding only. On the goldens, whole sequence in one prefill call and
// decoded one token at a time: max |logit diff| / max |logit| against the
// f32 cache and argmax agreement are printed (README "bf16 KV cache" has
// the figures); asserted <= 0.02 and >= 90 %: a wrong layout or a dropped
// position moves logits by O(1), rounding by ~1e-3.
#include <doctest/doctest.h>

#include "model_fixture.hpp"
#include "test_util.hpp"

#include <cstring>
#include <string>
#include <vector>

using namespace kdial;

namespace {

// All positions' logits: one prefill call (chunk = n) or one token per call.
std::vector<float> run(
    olmoe::model& m, const std::vector<std::int32_t>& toks, std::size_t chunk, olmoe::kv_cache* keep = nullptr)
{
    const std::size_t V = std::size_t(m.config().vocab), n = toks.size();
    const std::vector<int> ks(std::size_t(m.config().layers), m.config().top_k);
    olmoe::kv_cache cache(m.config(), n);
    std::vector<float> out(n * V);
    for (std::size_t t = 0; t < n; t += chunk) {
        const std::size_t c = std::min(chunk, n - t);
        m.forward(std::span<const std::int32_t>(toks.data() + t, c), cache, ks,
            matrix_view<float>(out.data() + t * V, c, V), true);
    }
    if (keep)
        *keep = std::move(cache);
    return out;
}

} // namespace

TEST_CASE("olmoe --kv bf16: the cache holds the f32 values rounded, logits within the rounding's bound [examples][kv]")
{
    const auto toks = test::golden_tokens();
    const std::size_t n = toks.size();
    for (const char* name :
        { "olmoe-tiny-f32", "olmoe-tiny-bf16", "qwen2-moe-tiny-f32", "mixtral-tiny-bf16", "qwen3-moe-tiny-bf16" }) {
        const std::string nm = name;
        CAPTURE(nm);
        const auto m = test::load_golden(name, n);
        const auto& c = m->config();
        olmoe::kv_cache c32, c16;
        m->set_kv_dtype(olmoe::kv_dtype::f32);
        const auto pre32 = run(*m, toks, n, &c32);
        const auto dec32 = run(*m, toks, 1);
        m->set_kv_dtype(olmoe::kv_dtype::bf16);
        const auto pre16 = run(*m, toks, n, &c16);
        std::vector<float> dec16, dec16_2;
        test::with_threads(1, [&] { dec16 = run(*m, toks, 1); });
        test::with_threads(2, [&] { dec16_2 = run(*m, toks, 1); });

        // The caches: same shape, bf16 half the bytes; layer 0's keys and
        // values (computed from the same inputs) are the f32 ones rounded.
        REQUIRE(c16.dtype == olmoe::kv_dtype::bf16);
        REQUIRE(c32.dtype == olmoe::kv_dtype::f32);
        CHECK(c16.kb.size() == std::size_t(c.layers));
        CHECK(c16.k.empty());
        CHECK(c16.bytes_per_position() * 2 == c32.bytes_per_position());
        CHECK(c16.pos == n);
        std::size_t rounded = 0, checked = 0;
        for (std::size_t h = 0; h < std::size_t(c.kv_heads); ++h)
            for (std::size_t p = 0; p < n; ++p)
                for (std::size_t i = 0; i < std::size_t(c.head_dim); ++i) {
                    const std::size_t at = (h * c16.capacity + p) * std::size_t(c.head_dim) + i;
                    rounded += c16.kb[0][at].bits == bf16::from_float(c32.k[0][at]).bits;
                    rounded += c16.vb[0][at].bits == bf16::from_float(c32.v[0][at]).bits;
                    checked += 2;
                }
        CHECK(rounded == checked);

        const test::logits_gap pe = test::compare_logits(pre32, pre16, n), de = test::compare_logits(dec32, dec16, n);
        MESSAGE(nm, ": bf16 KV vs f32 KV, prefill max |logit diff| ", pe.worst, " (ratio ", pe.worst / pe.scale,
            "), argmax ", pe.agree, "/", n, "; decode ", de.worst, " (ratio ", de.worst / de.scale, "), argmax ",
            de.agree, "/", n);
        CHECK(pe.worst > 0.0); // the bf16 cache was read
        CHECK(de.worst > 0.0);
        CHECK(pe.worst / pe.scale <= 0.02);
        CHECK(de.worst / de.scale <= 0.02);
        CHECK(pe.agree * 10 >= n * 9);
        CHECK(de.agree * 10 >= n * 9);
        CHECK(test::same_bytes(dec16, dec16_2)); // any thread count, the same bits
        m->set_kv_dtype(olmoe::kv_dtype::f32);
    }
}
