// libFuzzer target for the GGUF parser (include/kdial/io/gguf.hpp).
// Stage: io (untrusted files). Build and run with fuzz/run.sh.
// Invariant checked: on any input the parser either succeeds, with every
// tensor's bytes inside the input, aligned to the file's alignment and sized
// (numel / block) x block bytes, every metadata value readable, or throws
// kdial::error. Any other exception, a crash, a leak or UB is a bug.
#include <kdial/io/gguf.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace {

void require(bool ok)
{
    if (!ok)
        std::abort();
}

void walk(const kdial::io::gguf_value& v)
{
    (void)v.describe();
    if (v.type != kdial::io::gguf_type::array)
        return;
    for (std::uint64_t i = 0; i < v.count && i < 64; ++i) {
        (void)v.int_at(i);
        (void)v.float_at(i);
    }
    for (const auto& a : v.arrays)
        walk(a);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    using namespace kdial::io;
    const auto* bytes = reinterpret_cast<const std::byte*>(data);
    try {
        const auto f = gguf_file::from_memory({ bytes, size }, "fuzz.gguf");
        for (const auto& [key, v] : f.metadata()) {
            require(f.find_key(key) == &v);
            walk(v);
        }
        for (const auto& t : f.tensors()) {
            require(t.bytes.data() >= bytes && t.bytes.size() <= size
                && static_cast<std::size_t>(t.bytes.data() - bytes) <= size - t.bytes.size());
            require(t.bytes.size() == t.numel() / t.traits.block * t.traits.bytes);
            require(static_cast<std::size_t>(t.bytes.data() - bytes) % f.alignment() == 0);
            require(f.find(t.name) == &t);
            if (t.numel() <= (1u << 16)) {
                try {
                    const auto out = f.read_floats(t.name);
                    require(out.size() == t.numel());
                } catch (const kdial::error&) {
                    // a type without a float reader
                }
            }
        }
    } catch (const kdial::error&) {
    }
    return 0;
}
