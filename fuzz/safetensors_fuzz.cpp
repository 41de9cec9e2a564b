// libFuzzer target for the io parsers: safetensors headers, index.json and .npy.
// Stage: io (untrusted files). Build and run with fuzz/run.sh.
// Invariant checked: on any input the parsers either succeed, with every
// tensor's bytes inside the input and sized numel x dtype size, or throw
// kdial::error. Any other exception, a crash, a leak or UB is a bug.
#include <kdial/io/npy.hpp>
#include <kdial/io/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>
#include <vector>

namespace {

void require(bool ok)
{
    if (!ok)
        std::abort();
}

void fuzz_safetensors(const std::byte* data, std::size_t size)
{
    using namespace kdial::io;
    try {
        const auto f = safetensors_file::from_memory({ data, size }, "fuzz.safetensors");
        for (const auto& t : f.tensors()) {
            require(t.bytes.data() >= data && t.bytes.size() <= size
                && static_cast<std::size_t>(t.bytes.data() - data) <= size - t.bytes.size());
            require(t.bytes.size() == t.numel() * st_dtype_size(t.dtype));
            require(t.end - t.begin == t.bytes.size());
            require(f.has(t.name) && &f.info(t.name) == &t);
            (void)f.expect(t.name, t.shape);
            if (t.dtype == st_dtype::f32 || t.dtype == st_dtype::bf16 || t.dtype == st_dtype::f16) {
                std::vector<float> out = f.read_floats(t.name);
                require(out.size() == t.numel());
            }
            try {
                if (t.dtype == st_dtype::f32)
                    require(f.view<float>(t.name).size() == t.numel());
                else if (t.dtype == st_dtype::bf16)
                    require(f.view<kdial::bf16>(t.name).size() == t.numel());
                else if (t.dtype == st_dtype::f16)
                    require(f.view<std::uint16_t>(t.name).size() == t.numel());
                if (t.rank() == 2 && t.dtype == st_dtype::f32)
                    (void)f.matrix<float>(t.name);
            } catch (const kdial::error&) {
                // misaligned data: view<T> refuses, read_floats above copied
            }
        }
    } catch (const kdial::error&) {
    }
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    const auto* bytes = reinterpret_cast<const std::byte*>(data);
    fuzz_safetensors(bytes, size);
    try {
        (void)kdial::io::parse_index(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.index.json");
    } catch (const kdial::error&) {
    }
    try {
        (void)kdial::io::parse_npy({ bytes, size }, "fuzz.npy");
    } catch (const kdial::error&) {
    }
    return 0;
}
