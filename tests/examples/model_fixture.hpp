// Loads the committed golden checkpoint (tests/golden/olmoe-tiny-f32) into an
// olmoe::model for the model-level tests, with its token sequence and the
// PyTorch reference's logits.
#pragma once

#include "model.hpp"
#include "weights.hpp"

#include <kdial/io/npy.hpp>

#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

namespace kdial::test {

inline const std::string golden_dir = KDIAL_GOLDEN_DIR;

inline std::unique_ptr<olmoe::model> load_golden(const std::string& name = "olmoe-tiny-f32", std::size_t max_chunk = 64)
{
    const std::string dir = golden_dir + "/" + name;
    const auto cfg = olmoe::load_config(dir);
    olmoe::load_options o;
    o.max_chunk = max_chunk;
    return std::make_unique<olmoe::model>(olmoe::load_weights(dir, cfg, o), max_chunk);
}

// Whether every linear weight of a loaded model (embeddings, attention,
// experts, lm_head) starts 64-byte aligned, as the loaders make them.
inline bool all_weights_aligned64(const olmoe::model_weights& w)
{
    bool ok = true;
    olmoe::for_each_weight(w, [&](const auto& v) { ok = ok && reinterpret_cast<std::uintptr_t>(v.data) % 64 == 0; });
    return ok;
}

inline std::vector<std::int32_t> golden_tokens()
{
    std::ifstream f(golden_dir + "/tokens.txt");
    std::vector<std::int32_t> t;
    std::string s;
    while (std::getline(f, s, ','))
        t.push_back(std::int32_t(std::stoi(s)));
    return t;
}

inline kdial::io::npy_array golden_ref_logits(int k, const std::string& name = "olmoe-tiny-f32")
{
    return kdial::io::read_npy(golden_dir + "/" + name + "/ref_logits.k" + std::to_string(k) + ".npy");
}

} // namespace kdial::test
