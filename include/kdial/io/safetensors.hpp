// safetensors reading: mmap a checkpoint file, validate its header, hand out views.
// Stage: io (the edge before the layer: weights come from here as views).
// Invariants: nothing is trusted before it is checked (every failure is a
// kdial::error naming the file and, where relevant, the tensor and the value);
// opening reads only the header, tensor bytes stay in the read-only mapping
// until a view or read_floats() touches them; no copies unless asked for.
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/views.hpp"
#include "json.hpp"

namespace kdial::io {

namespace detail {
using ::kdial::detail::cat;
using ::kdial::detail::check;
} // namespace detail

static_assert(
    std::endian::native == std::endian::little, "safetensors data are little-endian; views reinterpret them in place");

// ---------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------

// Every dtype string of the safetensors format (spec §6.4). All are parsed and
// reported; typed views exist for F32, BF16 and F16 only.
enum class st_dtype : std::uint8_t {
    boolean,
    u8,
    i8,
    f8_e5m2,
    f8_e4m3,
    i16,
    u16,
    f16,
    bf16,
    i32,
    u32,
    f32,
    f64,
    i64,
    u64
};

inline constexpr std::string_view st_dtype_name(st_dtype t) noexcept
{
    switch (t) {
    case st_dtype::boolean:
        return "BOOL";
    case st_dtype::u8:
        return "U8";
    case st_dtype::i8:
        return "I8";
    case st_dtype::f8_e5m2:
        return "F8_E5M2";
    case st_dtype::f8_e4m3:
        return "F8_E4M3";
    case st_dtype::i16:
        return "I16";
    case st_dtype::u16:
        return "U16";
    case st_dtype::f16:
        return "F16";
    case st_dtype::bf16:
        return "BF16";
    case st_dtype::i32:
        return "I32";
    case st_dtype::u32:
        return "U32";
    case st_dtype::f32:
        return "F32";
    case st_dtype::f64:
        return "F64";
    case st_dtype::i64:
        return "I64";
    case st_dtype::u64:
        return "U64";
    }
    return "?";
}

// Bytes per element.
inline constexpr std::size_t st_dtype_size(st_dtype t) noexcept
{
    switch (t) {
    case st_dtype::boolean:
    case st_dtype::u8:
    case st_dtype::i8:
    case st_dtype::f8_e5m2:
    case st_dtype::f8_e4m3:
        return 1;
    case st_dtype::i16:
    case st_dtype::u16:
    case st_dtype::f16:
    case st_dtype::bf16:
        return 2;
    case st_dtype::i32:
    case st_dtype::u32:
    case st_dtype::f32:
        return 4;
    case st_dtype::f64:
    case st_dtype::i64:
    case st_dtype::u64:
        return 8;
    }
    return 0;
}

// The dtype a header string names, or nothing for an unknown string.
inline std::optional<st_dtype> parse_st_dtype(std::string_view s) noexcept
{
    for (int i = 0; i <= static_cast<int>(st_dtype::u64); ++i) {
        const auto t = static_cast<st_dtype>(i);
        if (st_dtype_name(t) == s)
            return t;
    }
    return std::nullopt;
}

// The kernels' weight dtype for a stored dtype, where one exists (F32, BF16).
inline std::optional<kdial::dtype> weight_dtype(st_dtype t) noexcept
{
    if (t == st_dtype::f32)
        return kdial::dtype::f32;
    if (t == st_dtype::bf16)
        return kdial::dtype::bf16;
    return std::nullopt;
}

// IEEE binary16 -> float, exact for every input: normals re-bias the exponent,
// subnormals are mant * 2^-24 (exact in float), inf stays inf and NaN keeps
// its payload bits (shifted into the float mantissa).
inline float half_to_float(std::uint16_t h) noexcept
{
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    const std::uint32_t mant = h & 0x3ffu;
    if (exp == 0) {
        const float mag = static_cast<float>(mant) * 0x1p-24f;
        return sign ? -mag : mag;
    }
    if (exp == 31)
        return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
    return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (mant << 13));
}

// C++ element type -> the stored dtype a view of it reads. F16 has no C++
// type here, so view<std::uint16_t> hands out F16 raw bits (half_to_float
// converts them).
template <class T> struct st_view_dtype;
template <> struct st_view_dtype<float> {
    static constexpr st_dtype value = st_dtype::f32;
};
template <> struct st_view_dtype<kdial::bf16> {
    static constexpr st_dtype value = st_dtype::bf16;
};
template <> struct st_view_dtype<std::uint16_t> {
    static constexpr st_dtype value = st_dtype::f16;
};

template <class T>
concept st_viewable = requires
{
    st_view_dtype<T>::value;
}
&&sizeof(T) == st_dtype_size(st_view_dtype<T>::value);

// ---------------------------------------------------------------------------
// tensor_info and the header parser
// ---------------------------------------------------------------------------

// One validated header entry.
struct tensor_info {
    std::string name;
    st_dtype dtype = st_dtype::f32;
    std::vector<std::size_t> shape; // row-major dims; [] is a scalar (one element)
    std::size_t begin = 0; // data_offsets, relative to the data area (file offset 8 + N)
    std::size_t end = 0;
    std::span<const std::byte> bytes; // the tensor's bytes: [8 + N + begin, 8 + N + end) of the file

    std::size_t rank() const noexcept { return shape.size(); }
    // Element count; the header parser has checked that it does not overflow.
    std::size_t numel() const noexcept
    {
        std::size_t n = 1;
        for (std::size_t d : shape)
            n *= d;
        return n;
    }
};

// What parse_header() returns: the tensors sorted by name, and the metadata.
struct safetensors_header {
    std::size_t header_size = 0; // N, the JSON length
    std::size_t data_offset = 0; // 8 + N, where the data area starts
    std::vector<tensor_info> tensors;
    std::map<std::string, std::string, std::less<>> metadata; // "__metadata__", if any
};

namespace detail {

// The reference reader's limit on N ("header too large").
inline constexpr std::size_t st_max_header_size = 100'000'000;
// "[2, 3]"
inline std::string shape_str(std::span<const std::size_t> shape)
{
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) {
        if (i)
            s += ", ";
        s += std::to_string(shape[i]);
    }
    return s + "]";
}

} // namespace detail

// Parses and validates the header of a safetensors file held in memory:
// `data` is the whole file (size bytes); `file_name` is used in messages.
// On success every tensor's bytes lie inside `data`, are exactly
// numel x dtype size long, and the tensors tile the data area without gap,
// overlap or trailing bytes (the reference reader's rules, spec §6.2).
// Reads only the first 8 + N bytes; tensor bytes are never touched.
inline safetensors_header parse_header(const std::byte* data, std::size_t size, std::string_view file_name)
{
    using detail::check;
    using json = nlohmann::json;
    check(size >= 8, file_name, ": file is ", size, " bytes, shorter than the 8-byte header length");
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i)
        n = (n << 8) | std::to_integer<std::uint64_t>(data[i]);
    check(n <= detail::st_max_header_size, file_name, ": header length ", n, " is larger than the limit of ",
        detail::st_max_header_size, " bytes");
    check(n <= size - 8, file_name, ": header length ", n, " runs past the end of the file (", size, " bytes)");

    safetensors_header h;
    h.header_size = static_cast<std::size_t>(n);
    h.data_offset = 8 + h.header_size;
    const std::string_view text(reinterpret_cast<const char*>(data + 8), h.header_size);
    check(!text.empty() && text.front() == '{', file_name, ": header does not start with '{' (a JSON object)");
    const json root = parse_json_strict(text, file_name, "header");
    check(root.is_object(), file_name, ": header is JSON ", root.type_name(), ", expected an object");

    const std::size_t data_size = size - h.data_offset;
    const std::byte* data_area = data + h.data_offset;
    h.tensors.reserve(root.size());
    for (const auto& item : root.items()) {
        const std::string& key = item.key(); // (not a structured binding: clang 14 cannot capture those)
        const json& entry = item.value();
        if (key == "__metadata__") {
            check(entry.is_object(), file_name, ": __metadata__ is ", entry.type_name(),
                ", expected an object of strings");
            for (const auto& [mk, mv] : entry.items()) {
                if (!mv.is_string())
                    throw error(detail::cat(file_name, ": __metadata__ value of \"", detail::brief_cut(mk, 200),
                        "\" is ", mv.type_name(), " ", json_brief(mv), ", expected a string"));
                h.metadata.emplace(mk, mv.get<std::string>());
            }
            continue;
        }
        tensor_info t;
        t.name = key;
        // Messages are built only on failure: a header can hold thousands of tensors.
        const auto fail = [&](const auto&... a) {
            throw error(detail::cat(file_name, ": tensor '", detail::brief_cut(key, 200), "'", a...));
        };
        if (!entry.is_object())
            fail(": entry is ", entry.type_name(), ", expected an object");

        const auto dt = entry.find("dtype");
        if (dt == entry.end())
            fail(": no \"dtype\"");
        if (!dt->is_string())
            fail(": dtype is ", dt->type_name(), " ", json_brief(*dt), ", expected a string");
        const auto parsed_dtype = parse_st_dtype(dt->get_ref<const std::string&>());
        if (!parsed_dtype)
            fail(": unknown dtype ", json_brief(*dt));
        t.dtype = *parsed_dtype;

        const auto sh = entry.find("shape");
        if (sh == entry.end())
            fail(": no \"shape\"");
        if (!sh->is_array())
            fail(": shape is ", sh->type_name(), " ", json_brief(*sh), ", expected an array");
        std::size_t numel = 1;
        t.shape.reserve(sh->size());
        for (std::size_t i = 0; i < sh->size(); ++i) {
            const auto d = json_uint((*sh)[i]);
            if (!d)
                fail(": shape[", i, "] is ", json_brief((*sh)[i]), ", expected a non-negative integer");
            if (*d > std::numeric_limits<std::size_t>::max())
                fail(": shape[", i, "] = ", *d, " is too large");
            const auto dim = static_cast<std::size_t>(*d);
            if (dim != 0 && numel > std::numeric_limits<std::size_t>::max() / dim)
                fail(": shape ", json_brief(*sh), " overflows the element count");
            numel *= dim;
            t.shape.push_back(dim);
        }
        const std::size_t esize = st_dtype_size(t.dtype);
        if (numel > std::numeric_limits<std::size_t>::max() / esize)
            fail(": shape ", json_brief(*sh), " x ", st_dtype_name(t.dtype), " overflows the byte count");
        const std::size_t nbytes = numel * esize;

        const auto off = entry.find("data_offsets");
        if (off == entry.end())
            fail(": no \"data_offsets\"");
        if (!off->is_array() || off->size() != 2)
            fail(": data_offsets is ", json_brief(*off), ", expected [begin, end]");
        const auto b = json_uint((*off)[0]);
        const auto e = json_uint((*off)[1]);
        if (!b || !e)
            fail(": data_offsets ", json_brief(*off), " are not non-negative integers");
        if (*b > *e)
            fail(": data_offsets [", *b, ", ", *e, "] have begin > end");
        if (*e > data_size)
            fail(": data_offsets end ", *e, " is past the data area of ", data_size, " bytes");
        t.begin = static_cast<std::size_t>(*b);
        t.end = static_cast<std::size_t>(*e);
        if (t.end - t.begin != nbytes)
            fail(": data_offsets [", t.begin, ", ", t.end, ") hold ", t.end - t.begin, " bytes, but shape ",
                detail::shape_str(t.shape), " x ", st_dtype_name(t.dtype), " needs ", nbytes);
        t.bytes = { data_area + t.begin, nbytes };
        h.tensors.push_back(std::move(t));
    }

    // The tensors must tile the data area: sorted by offsets, each begins
    // where the previous one ended, the first at 0, the last at the end.
    std::vector<const tensor_info*> by_offset;
    by_offset.reserve(h.tensors.size());
    for (const auto& t : h.tensors)
        by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const tensor_info* a, const tensor_info* b) {
        return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::size_t pos = 0;
    const tensor_info* prev = nullptr;
    for (const tensor_info* t : by_offset) {
        if (t->begin < pos)
            throw error(detail::cat(file_name, ": tensor '", t->name, "' [", t->begin, ", ", t->end,
                ") overlaps tensor '", prev->name, "' [", prev->begin, ", ", prev->end, ")"));
        if (t->begin > pos) {
            if (prev)
                throw error(detail::cat(file_name, ": gap of ", t->begin - pos, " bytes between tensor '", prev->name,
                    "' (ends at ", pos, ") and tensor '", t->name, "' (begins at ", t->begin, ")"));
            throw error(detail::cat(file_name, ": tensor '", t->name, "' begins at data offset ", t->begin,
                ", but the first tensor must begin at 0"));
        }
        pos = t->end;
        prev = t;
    }
    check(pos == data_size, file_name, ": data area is ", data_size, " bytes but the tensors end at ", pos, " (",
        data_size - pos, " trailing bytes)");

    // nlohmann objects iterate in key order, so the tensors are sorted by name already.
    KDIAL_ASSERT(std::is_sorted(h.tensors.begin(), h.tensors.end(),
        [](const tensor_info& a, const tensor_info& b) { return a.name < b.name; }));
    return h;
}

// ---------------------------------------------------------------------------
// typed access to one tensor (shared by safetensors_file and the checkpoint)
// ---------------------------------------------------------------------------

namespace detail {

inline void check_dtype(const tensor_info& t, st_dtype want, std::string_view file_name, std::string_view what)
{
    check(t.dtype == want, file_name, ": tensor '", t.name, "' is ", st_dtype_name(t.dtype), ", ", what, " needs ",
        st_dtype_name(want));
}

// A typed view in place. Requires the bytes to be aligned for T: files from
// the reference writer are, files from other writers may not be.
template <st_viewable T> std::span<const T> typed_view(const tensor_info& t, std::string_view file_name)
{
    check_dtype(t, st_view_dtype<T>::value, file_name, "view<T>");
    if (t.bytes.empty())
        return {};
    const auto addr = reinterpret_cast<std::uintptr_t>(t.bytes.data());
    check(addr % alignof(T) == 0, file_name, ": tensor '", t.name, "' at data offset ", t.begin, " is not aligned to ",
        alignof(T), " bytes; use read_floats(), which copies");
    return { reinterpret_cast<const T*>(t.bytes.data()), t.numel() };
}

template <st_viewable T> cmatrix_view<T> typed_matrix(const tensor_info& t, std::string_view file_name)
{
    if (t.rank() != 2)
        throw error(
            cat(file_name, ": tensor '", t.name, "' has shape ", shape_str(t.shape), ", a matrix view needs 2 dims"));
    const auto s = typed_view<T>(t, file_name);
    return { s.data(), t.shape[0], t.shape[1] };
}

// F32, BF16 or F16 -> float, any alignment (element bytes are memcpy'd).
// Elements [first, first + out.size()) of t (F32 / BF16 / F16) as floats,
// for any alignment of the data.
inline void read_floats_range(const tensor_info& t, std::size_t first, std::span<float> out, std::string_view file_name)
{
    if (first > t.numel() || out.size() > t.numel() - first)
        throw error(cat(file_name, ": tensor '", t.name, "' has ", t.numel(), " elements (shape ", shape_str(t.shape),
            "), elements [", first, ", ", first + out.size(), ") were asked for"));
    switch (t.dtype) {
    case st_dtype::f32:
        if (!out.empty())
            std::memcpy(out.data(), t.bytes.data() + 4 * first, out.size() * sizeof(float));
        return;
    case st_dtype::bf16:
    case st_dtype::f16: {
        const std::byte* src = t.bytes.data() + 2 * first;
        const bool bf = t.dtype == st_dtype::bf16;
        for (std::size_t i = 0; i < out.size(); ++i) {
            std::uint16_t b;
            std::memcpy(&b, src + 2 * i, 2);
            out[i] = bf ? std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16) : half_to_float(b);
        }
        return;
    }
    default:
        throw error(cat(file_name, ": tensor '", t.name, "' is ", st_dtype_name(t.dtype),
            ", read_floats() reads F32, BF16 or F16"));
    }
}

inline void read_floats(const tensor_info& t, std::span<float> out, std::string_view file_name)
{
    if (out.size() != t.numel())
        throw error(cat(file_name, ": tensor '", t.name, "' has ", t.numel(), " elements (shape ", shape_str(t.shape),
            "), the output buffer ", out.size()));
    read_floats_range(t, 0, out, file_name);
}

inline const tensor_info& check_shape(
    const tensor_info& t, std::span<const std::size_t> shape, std::string_view file_name)
{
    if (!std::equal(t.shape.begin(), t.shape.end(), shape.begin(), shape.end()))
        throw error(
            cat(file_name, ": tensor '", t.name, "' has shape ", shape_str(t.shape), ", expected ", shape_str(shape)));
    return t;
}

inline std::string errno_message(int e)
{
    return std::generic_category().message(e);
}

} // namespace detail

// ---------------------------------------------------------------------------
// mapped_file
// ---------------------------------------------------------------------------

// A whole file mapped read-only (PROT_READ, MAP_PRIVATE). Pages are read by
// the OS on first touch. Truncating the file while it is mapped makes later
// accesses fault (SIGBUS): checkpoints must not be rewritten in place.
class mapped_file {
public:
    mapped_file() = default;
    explicit mapped_file(const std::filesystem::path& path)
    {
        const std::string p = path.string();
        const int fd = open_regular_file(path, "file");
        struct stat sb { };
        if (::fstat(fd, &sb) != 0) {
            const int e = errno;
            ::close(fd);
            throw error(detail::cat(p, ": cannot stat: ", detail::errno_message(e)));
        }
        size_ = static_cast<std::size_t>(sb.st_size);
        if (size_ > 0) {
            void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
            if (m == MAP_FAILED) {
                const int e = errno;
                ::close(fd);
                throw error(detail::cat(p, ": cannot mmap ", size_, " bytes: ", detail::errno_message(e)));
            }
            data_ = m;
        }
        ::close(fd); // the mapping keeps the file alive
    }
    ~mapped_file() { reset(); }
    mapped_file(mapped_file&& o) noexcept
        : data_(std::exchange(o.data_, nullptr))
        , size_(std::exchange(o.size_, 0))
    {
    }
    mapped_file& operator=(mapped_file&& o) noexcept
    {
        if (this != &o) {
            reset();
            data_ = std::exchange(o.data_, nullptr);
            size_ = std::exchange(o.size_, 0);
        }
        return *this;
    }
    mapped_file(const mapped_file&) = delete;
    mapped_file& operator=(const mapped_file&) = delete;

    std::span<const std::byte> bytes() const noexcept { return { static_cast<const std::byte*>(data_), size_ }; }
    std::size_t size() const noexcept { return size_; }

private:
    void reset() noexcept
    {
        if (data_)
            ::munmap(data_, size_);
        data_ = nullptr;
        size_ = 0;
    }
    void* data_ = nullptr;
    std::size_t size_ = 0;
};

// ---------------------------------------------------------------------------
// safetensors_file
// ---------------------------------------------------------------------------

// One validated safetensors file. Movable, not copyable; views and
// tensor_info references stay valid while the object lives (moves included).
class safetensors_file {
public:
    // Maps `path` and validates its header (tensor bytes are not read).
    static safetensors_file open(const std::filesystem::path& path)
    {
        safetensors_file f;
        f.name_ = path.string();
        f.map_ = mapped_file(path);
        f.bytes_ = f.map_.bytes();
        f.header_ = parse_header(f.bytes_.data(), f.bytes_.size(), f.name_);
        return f;
    }
    // Validates a file image in memory; `bytes` must outlive the object.
    static safetensors_file from_memory(std::span<const std::byte> bytes, std::string name)
    {
        safetensors_file f;
        f.name_ = std::move(name);
        f.bytes_ = bytes;
        f.header_ = parse_header(f.bytes_.data(), f.bytes_.size(), f.name_);
        return f;
    }

    // The path (or the name given to from_memory), as used in messages.
    const std::string& name() const noexcept { return name_; }
    // The whole file image.
    std::span<const std::byte> bytes() const noexcept { return bytes_; }
    const safetensors_header& header() const noexcept { return header_; }
    const std::map<std::string, std::string, std::less<>>& metadata() const noexcept { return header_.metadata; }

    // All tensors, sorted by name.
    std::span<const tensor_info> tensors() const noexcept { return header_.tensors; }
    std::vector<std::string_view> names() const
    {
        std::vector<std::string_view> r;
        r.reserve(header_.tensors.size());
        for (const auto& t : header_.tensors)
            r.push_back(t.name);
        return r;
    }
    std::size_t size() const noexcept { return header_.tensors.size(); }

    const tensor_info* find(std::string_view name) const noexcept
    {
        const auto& ts = header_.tensors;
        const auto it = std::lower_bound(
            ts.begin(), ts.end(), name, [](const tensor_info& t, std::string_view n) { return t.name < n; });
        return it != ts.end() && it->name == name ? &*it : nullptr;
    }
    bool has(std::string_view name) const noexcept { return find(name) != nullptr; }
    const tensor_info& info(std::string_view name) const
    {
        const tensor_info* t = find(name);
        detail::check(t != nullptr, name_, ": no tensor '", name, "'");
        return *t;
    }
    // info(name), after checking that its shape is exactly `shape`.
    const tensor_info& expect(std::string_view name, std::span<const std::size_t> shape) const
    {
        return detail::check_shape(info(name), shape, name_);
    }
    const tensor_info& expect(std::string_view name, std::initializer_list<std::size_t> shape) const
    {
        return expect(name, std::span<const std::size_t>(shape.begin(), shape.size()));
    }

    // In-place views: float <- F32, bf16 <- BF16, std::uint16_t <- F16 bits.
    // Throw on a dtype mismatch and on data not aligned to alignof(T).
    template <st_viewable T> std::span<const T> view(std::string_view name) const
    {
        return detail::typed_view<T>(info(name), name_);
    }
    // A 2-D tensor as a [rows, cols] matrix view.
    template <st_viewable T> cmatrix_view<T> matrix(std::string_view name) const
    {
        return detail::typed_matrix<T>(info(name), name_);
    }
    // F32 / BF16 / F16 -> float into out[numel]; works for any alignment.
    void read_floats(std::string_view name, std::span<float> out) const { detail::read_floats(info(name), out, name_); }
    std::vector<float> read_floats(std::string_view name) const
    {
        const tensor_info& t = info(name);
        std::vector<float> out(t.numel());
        detail::read_floats(t, out, name_);
        return out;
    }

private:
    safetensors_file() = default;
    std::string name_;
    mapped_file map_;
    std::span<const std::byte> bytes_;
    safetensors_header header_;
};

// ---------------------------------------------------------------------------
// model.safetensors.index.json and safetensors_checkpoint
// ---------------------------------------------------------------------------

inline constexpr std::string_view st_single_file_name = "model.safetensors";
inline constexpr std::string_view st_index_file_name = "model.safetensors.index.json";

struct safetensors_index {
    std::map<std::string, std::string, std::less<>> weight_map; // tensor -> shard file name
    std::optional<std::uint64_t> total_size; // metadata.total_size (tensor bytes), if given
};

// Parses and validates the text of a model.safetensors.index.json. Shard
// names must be plain file names (no directories, no "..").
inline safetensors_index parse_index(std::string_view text, std::string_view file_name)
{
    using detail::check;
    const nlohmann::json root = parse_json_strict(text, file_name, "index");
    check(root.is_object(), file_name, ": index is JSON ", root.type_name(), ", expected an object");
    safetensors_index idx;
    if (const auto md = root.find("metadata"); md != root.end() && !md->is_null()) {
        check(md->is_object(), file_name, ": metadata is ", md->type_name(), ", expected an object");
        if (const auto ts = md->find("total_size"); ts != md->end() && !ts->is_null()) {
            auto v = json_uint(*ts);
            // Some writers store it as a float; accept integral values.
            if (!v && ts->is_number_float()) {
                const double d = ts->get<double>();
                if (d >= 0 && d < 0x1p64 && d == static_cast<double>(static_cast<std::uint64_t>(d)))
                    v = static_cast<std::uint64_t>(d);
            }
            check(v.has_value(), file_name, ": metadata.total_size is ", json_brief(*ts),
                ", expected a non-negative integer");
            idx.total_size = v;
        }
    }
    const auto wm = root.find("weight_map");
    check(wm != root.end(), file_name, ": no \"weight_map\"");
    check(wm->is_object(), file_name, ": weight_map is ", wm->type_name(), ", expected an object");
    for (const auto& [tensor, shard] : wm->items()) {
        if (!shard.is_string())
            throw error(detail::cat(file_name, ": weight_map entry of tensor '", detail::brief_cut(tensor, 200),
                "' is ", shard.type_name(), " ", json_brief(shard), ", expected a shard file name"));
        const auto& s = shard.get_ref<const std::string&>();
        if (s.empty() || s == "." || s == ".." || s.find('/') != std::string::npos || s.find('\\') != std::string::npos
            || s.find('\0') != std::string::npos)
            throw error(detail::cat(file_name, ": weight_map entry of tensor '", detail::brief_cut(tensor, 200),
                "' is ", json_brief(shard), ", expected a plain file name in the checkpoint directory"));
        idx.weight_map.emplace(tensor, s);
    }
    return idx;
}

// A tensor found in a checkpoint: the shard that holds it and its entry.
struct tensor_ref {
    const safetensors_file* file = nullptr;
    const tensor_info* info = nullptr;
};

// A model directory: model.safetensors, or model.safetensors.index.json plus
// its shards. Every shard's header is validated at open; tensor bytes are not
// read. With an index, exactly the tensors of weight_map are visible (a shard
// may hold more; those are ignored), and each must be in the shard named.
class safetensors_checkpoint {
public:
    // `path`: a directory (model.safetensors is preferred over the index, as
    // transformers does), a .safetensors file, or an index .json file.
    static safetensors_checkpoint open(const std::filesystem::path& path)
    {
        namespace fs = std::filesystem;
        std::error_code ec;
        // A directory entry that exists (a symlink counts, even a dangling or
        // looping one) is opened, so that the open names what is wrong with it.
        const auto present = [&](const fs::path& p) { return fs::exists(fs::symlink_status(p, ec)); };
        if (fs::is_directory(path, ec)) {
            if (present(path / st_single_file_name))
                return open_single(path / st_single_file_name);
            if (present(path / st_index_file_name))
                return open_index(path / st_index_file_name);
            throw error(
                detail::cat(path.string(), ": neither ", st_single_file_name, " nor ", st_index_file_name, " found"));
        }
        detail::check(present(path), path.string(), ": no such file or directory");
        const std::string fname = path.filename().string();
        if (fname.size() >= 5 && fname.ends_with(".json"))
            return open_index(path);
        return open_single(path);
    }

    // The directory the checkpoint lives in.
    const std::filesystem::path& directory() const noexcept { return dir_; }
    // The index path, or empty for a single-file checkpoint.
    const std::filesystem::path& index_path() const noexcept { return index_path_; }
    // The shards (one for a single file), sorted by file name.
    std::span<const safetensors_file> files() const noexcept { return files_; }
    // metadata.total_size from the index, when it gives one (not enforced:
    // compare with tensor_bytes() if it matters).
    std::optional<std::uint64_t> total_size() const noexcept { return total_size_; }
    // The sum of the visible tensors' byte sizes.
    std::uint64_t tensor_bytes() const noexcept
    {
        std::uint64_t s = 0;
        for (const auto& [name, shard] : map_)
            s += files_[shard].find(name)->bytes.size();
        return s;
    }

    std::size_t size() const noexcept { return map_.size(); }
    // All tensor names, sorted.
    std::vector<std::string_view> names() const
    {
        std::vector<std::string_view> r;
        r.reserve(map_.size());
        for (const auto& kv : map_)
            r.push_back(kv.first);
        return r;
    }
    bool has(std::string_view name) const noexcept { return map_.find(name) != map_.end(); }
    // The shard and entry of `name`; throws naming the checkpoint and tensor.
    tensor_ref find(std::string_view name) const
    {
        const auto it = map_.find(name);
        if (it == map_.end())
            throw error(detail::cat(where(), ": no tensor '", name, "'"));
        const safetensors_file& f = files_[it->second];
        return { &f, f.find(name) };
    }
    const tensor_info& info(std::string_view name) const { return *find(name).info; }
    const tensor_info& expect(std::string_view name, std::span<const std::size_t> shape) const
    {
        const tensor_ref r = find(name);
        return detail::check_shape(*r.info, shape, r.file->name());
    }
    const tensor_info& expect(std::string_view name, std::initializer_list<std::size_t> shape) const
    {
        return expect(name, std::span<const std::size_t>(shape.begin(), shape.size()));
    }
    template <st_viewable T> std::span<const T> view(std::string_view name) const
    {
        const tensor_ref r = find(name);
        return detail::typed_view<T>(*r.info, r.file->name());
    }
    template <st_viewable T> cmatrix_view<T> matrix(std::string_view name) const
    {
        const tensor_ref r = find(name);
        return detail::typed_matrix<T>(*r.info, r.file->name());
    }
    void read_floats(std::string_view name, std::span<float> out) const
    {
        const tensor_ref r = find(name);
        detail::read_floats(*r.info, out, r.file->name());
    }
    std::vector<float> read_floats(std::string_view name) const
    {
        const tensor_ref r = find(name);
        std::vector<float> out(r.info->numel());
        detail::read_floats(*r.info, out, r.file->name());
        return out;
    }

private:
    safetensors_checkpoint() = default;

    std::string where() const { return index_path_.empty() ? files_.front().name() : index_path_.string(); }

    static safetensors_checkpoint open_single(const std::filesystem::path& file)
    {
        safetensors_checkpoint c;
        c.dir_ = file.parent_path();
        c.files_.push_back(safetensors_file::open(file));
        for (const auto& t : c.files_.front().tensors())
            c.map_.emplace(t.name, 0);
        return c;
    }

    static safetensors_checkpoint open_index(const std::filesystem::path& index)
    {
        namespace fs = std::filesystem;
        safetensors_checkpoint c;
        c.dir_ = index.parent_path();
        c.index_path_ = index;
        const std::string iname = index.string();

        std::error_code ec;
        const std::string text = read_file_checked(index, "index", detail::st_max_header_size);
        const safetensors_index idx = parse_index(text, iname);
        c.total_size_ = idx.total_size;

        // Open each shard once, in file-name order.
        std::map<std::string, std::string_view> shard_example; // shard -> a tensor it should hold
        for (const auto& [tensor, shard] : idx.weight_map)
            shard_example.emplace(shard, tensor);
        std::map<std::string, std::size_t, std::less<>> shard_pos;
        for (const auto& [shard, tensor] : shard_example) {
            const fs::path p = c.dir_ / shard;
            detail::check(fs::exists(fs::symlink_status(p, ec)), iname, ": shard '", shard, "' (holding tensor '",
                tensor, "') does not exist in ", c.dir_.string());
            shard_pos.emplace(shard, c.files_.size());
            c.files_.push_back(safetensors_file::open(p));
        }
        for (const auto& [tensor, shard] : idx.weight_map) {
            const std::size_t pos = shard_pos.find(shard)->second;
            detail::check(c.files_[pos].has(tensor), iname, ": tensor '", tensor, "' is mapped to shard '", shard,
                "', which has no such tensor");
            c.map_.emplace(tensor, pos);
        }
        return c;
    }

    std::filesystem::path dir_;
    std::filesystem::path index_path_;
    std::vector<safetensors_file> files_;
    std::map<std::string, std::size_t, std::less<>> map_; // tensor -> position in files_
    std::optional<std::uint64_t> total_size_;
};

} // namespace kdial::io
