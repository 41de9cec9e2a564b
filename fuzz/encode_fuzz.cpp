// libFuzzer target for tokenizer encode / decode on arbitrary bytes, with four
// fixed tokenizers (GPT-2 and Qwen2 split regexes, with and without added
// tokens; every byte symbol in the vocab, no prefix space). Build and run
// with fuzz/run.sh. Invariants checked, for every input s:
//   decode_bytes(encode(s)) == NFC(s)   (no added tokens, or parse_special off)
//   decode_bytes(encode(s)) == the NFC of each gap between raw special tokens,
//                              with the specials in between (added tokens)
//   decode(ids) == utf8_sanitize(decode_bytes(ids)), streamed decode == decode,
//   NFC(NFC(s)) == NFC(s).
#include "tokenizer_fixture.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace kdial::io;

void require(bool ok)
{
    if (!ok)
        std::abort();
}

struct fixtures {
    bpe_tokenizer gpt2 = bpe_tokenizer::from_json(kdial::fuzz::tokenizer_json(false, false), "gpt2");
    bpe_tokenizer qwen2 = bpe_tokenizer::from_json(kdial::fuzz::tokenizer_json(true, false), "qwen2");
    bpe_tokenizer gpt2_added = bpe_tokenizer::from_json(kdial::fuzz::tokenizer_json(false, true), "gpt2+added");
    bpe_tokenizer qwen2_added = bpe_tokenizer::from_json(kdial::fuzz::tokenizer_json(true, true), "qwen2+added");
};

// The oracle for tokenizers with added tokens: the special (unnormalised)
// ones split the raw text leftmost-first (neither is a prefix of the other),
// each gap is normalised on its own; "[MASK]" (normalised) matches after NFC
// and decodes to itself, so it does not change the bytes.
std::string expected_with_specials(std::string_view s)
{
    static constexpr std::string_view specials[] = { "<|endoftext|>", "<|im_start|>" };
    std::string out;
    std::size_t gap = 0;
    for (std::size_t i = 0; i < s.size();) {
        std::size_t len = 0;
        for (const auto sp : specials)
            if (s.substr(i, sp.size()) == sp)
                len = sp.size();
        if (len == 0) {
            ++i;
            continue;
        }
        out += nfc_normalize(s.substr(gap, i - gap));
        out += s.substr(i, len);
        i += len;
        gap = i;
    }
    out += nfc_normalize(s.substr(gap));
    return out;
}

void check_decode(const bpe_tokenizer& t, const std::vector<std::int32_t>& ids)
{
    const std::string bytes = t.decode_bytes(ids);
    const std::string text = t.decode(ids);
    require(text == utf8_sanitize(bytes));
    bpe_stream_decoder d(t);
    std::string streamed;
    for (const auto id : ids)
        streamed += d.push(id);
    streamed += d.flush();
    require(streamed == text);
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    static const fixtures f;
    const std::string_view s(reinterpret_cast<const char*>(data), size);
    const std::string nfc = nfc_normalize(s);
    require(nfc_normalize(nfc) == nfc);
    for (const bpe_tokenizer* t : { &f.gpt2, &f.qwen2 }) {
        const auto ids = t->encode(s);
        require(t->decode_bytes(ids) == nfc);
        check_decode(*t, ids);
    }
    const std::string with_specials = expected_with_specials(s);
    for (const bpe_tokenizer* t : { &f.gpt2_added, &f.qwen2_added }) {
        const auto ids = t->encode(s);
        require(t->decode_bytes(ids) == with_specials);
        check_decode(*t, ids);
        const auto plain = t->encode(s, /*parse_special=*/false);
        require(t->decode_bytes(plain) == nfc);
        check_decode(*t, plain);
    }
    return 0;
}
