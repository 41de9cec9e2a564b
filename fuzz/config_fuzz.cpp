// libFuzzer target for config.json (examples/olmoe/config.hpp, through the
// strict JSON entry of kdial/io/json.hpp). Build and run with fuzz/run.sh.
// Invariant checked: on any input parse_config either returns a config whose
// every integer lies within config_limits and the cross-field rules (token
// ids below the vocab, layers listed below the layer count, k <= experts), or
// throws kdial::error with a bounded message. Any other exception, a crash,
// a leak or UB is a bug.
#include "config.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace {

void require(bool ok)
{
    if (!ok)
        std::abort();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    using L = olmoe::config_limits;
    const std::string text(reinterpret_cast<const char*>(data), size);
    try {
        const olmoe::model_config c = olmoe::parse_config(text, "fuzz/config.json");
        require(c.hidden >= 1 && c.hidden <= L::max_hidden);
        require(c.layers >= 1 && c.layers <= L::max_layers);
        require(c.heads >= 1 && c.heads <= L::max_heads);
        require(c.kv_heads >= 1 && c.heads % c.kv_heads == 0);
        require(c.head_dim >= 2 && c.head_dim <= L::max_head_dim && c.head_dim % 2 == 0);
        require(static_cast<long long>(c.heads) * c.head_dim <= L::max_attention_width);
        require(c.vocab >= 1 && c.vocab <= L::max_vocab);
        require(c.experts >= 1 && c.experts <= L::max_experts);
        require(c.top_k >= 1 && c.top_k <= c.experts);
        require(c.expert_ffn >= 1 && c.expert_ffn <= L::max_ffn);
        require(c.shared_ffn >= 0 && c.shared_ffn <= L::max_ffn);
        require(c.dense_ffn >= 0 && c.dense_ffn <= L::max_ffn);
        require(c.sparse_step >= 1 && c.sparse_step <= c.layers);
        require(c.max_positions >= 1 && c.max_positions <= L::max_positions);
        require(!c.sliding_window || (*c.sliding_window >= 1 && *c.sliding_window <= L::max_positions));
        for (int l : c.mlp_only_layers)
            require(l >= 0 && l < c.layers);
        for (int id : c.eos_ids)
            require(id >= 0 && id < c.vocab);
        require(!c.bos_id || (*c.bos_id >= 0 && *c.bos_id < c.vocab));
        require(c.rms_norm_eps > 0 && std::isfinite(c.rms_norm_eps));
        require(c.rope_theta > 0 && std::isfinite(c.rope_theta));
        int dense = 0;
        for (int i = 0; i < c.layers; ++i)
            dense += c.is_moe_layer(i) ? 0 : 1;
        require(dense == 0 || c.dense_ffn > 0);
    } catch (const kdial::error& e) {
        require(std::strlen(e.what()) < 1024); // messages are briefs, never whole values
    }
    return 0;
}
