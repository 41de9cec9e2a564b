// libFuzzer target for tokenizer.json loading (kdial/io/tokenizer.hpp through
// the strict JSON entry). Build and run with fuzz/run.sh.
// Invariant checked: on any input from_json either throws kdial::error with a
// bounded message, or returns a tokenizer whose id table is no larger than
// the input (sized by the entry count, never by the largest id), whose every
// id (ids(): ascending, gaps allowed) round-trips through id_to_token /
// token_bytes, with gaps and id_limit() invalid, and whose encode gives
// valid ids that decode (in one go and streamed) to the same text, and whose
// post-processor (TemplateProcessing, Bert, Roberta, Sequence) adds exactly
// its template's ids: encode(s) == post_process(encode(s) without specials),
// likewise for pairs. Any other exception, a crash, a leak or UB is a bug.
#include <kdial/io/tokenizer.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace {

void require(bool ok)
{
    if (!ok)
        std::abort();
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    using namespace kdial::io;
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    try {
        const bpe_tokenizer t = bpe_tokenizer::from_json(text, "fuzz/tokenizer.json");
        // Ids may have gaps (HF keeps the vocab in a map), so the table is
        // walked through ids(), never 0..vocab_size().
        const auto entries = t.ids();
        require(t.vocab_size() <= size); // every entry takes several bytes of the file
        require(entries.size() <= size);
        for (std::size_t i = 0; i < entries.size(); ++i) {
            const std::int32_t id = entries[i];
            require(id >= 0 && (i == 0 || entries[i - 1] < id));
            require(t.is_valid_id(id));
            (void)t.id_to_token(id);
            (void)t.token_bytes(id);
            if (id > 0 && (i == 0 || entries[i - 1] < id - 1))
                require(!t.is_valid_id(id - 1)); // a gap has no token
        }
        require(t.id_limit() == (entries.empty() ? 0 : std::size_t(entries.back()) + 1));
        require(!t.is_valid_id(-1));
        if (t.id_limit() <= std::size_t(INT32_MAX))
            require(!t.is_valid_id(static_cast<std::int32_t>(t.id_limit())));
        for (const std::string_view s : { std::string_view("hello world  <|endoftext|>\n\n x"),
                 std::string_view("e\xCC\x81 \xC3\xA9\xFF\xE4\xB8"), std::string_view("  a'll 123") }) {
            const auto ids = t.encode(s);
            for (const auto id : ids)
                require(t.is_valid_id(id));
            const std::string whole = t.decode(ids);
            bpe_stream_decoder d(t);
            std::string streamed;
            for (const auto id : ids)
                streamed += d.push(id);
            streamed += d.flush();
            require(streamed == whole);
            const auto plain = t.encode(s, true, false);
            require(t.post_process(plain) == ids);
            require(ids.size() == plain.size() + t.post_processor_added(false));
            const auto pair = t.encode_pair(s, "x y", true, true);
            require(pair == t.post_process(plain, t.encode("x y", true, false)));
            require(pair.size() == plain.size() + t.encode("x y", true, false).size() + t.post_processor_added(true));
            for (const auto id : pair)
                require(t.is_valid_id(id));
        }
    } catch (const kdial::error& e) {
        require(std::strlen(e.what()) < 1024); // messages are briefs, never whole values
    }
    return 0;
}
