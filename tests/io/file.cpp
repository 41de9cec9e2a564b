// Checked reads (regular files only, no hang on a FIFO, "symlink loop"),
// atomic checked writes (a failed write leaves the old file byte-identical
// and no .partial behind), same_file, and the non-finite scans.
#include <doctest/doctest.h>

#include "io_test_util.hpp"

#include <kdial/io/file.hpp>
#include <kdial/io/finite.hpp>
#include <kdial/io/npy.hpp>
#include <kdial/io/safetensors_writer.hpp>
#include <kdial/kernels/finite.hpp>

#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

using kdial::test::check_error;
using kdial::test::temp_dir;
using kdial::test::write_file;
namespace fs = std::filesystem;

namespace {

using kdial::test::slurp;

// Runs f with the process's file-size limit at `bytes` (writes beyond it
// fail with EFBIG; SIGXFSZ ignored), restoring both afterwards.
template <class F> void with_file_size_limit(rlim_t bytes, F&& f)
{
    rlimit old {};
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    const auto old_sig = std::signal(SIGXFSZ, SIG_IGN);
    rlimit lim = old;
    lim.rlim_cur = bytes;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
    try {
        f();
    } catch (...) {
        ::setrlimit(RLIMIT_FSIZE, &old);
        std::signal(SIGXFSZ, old_sig);
        throw;
    }
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_sig);
}

} // namespace

TEST_CASE("read_file: regular files only, clear errors for directories, FIFOs, loops, missing files")
{
    temp_dir d;
    write_file(d / "a.txt", "hello");
    CHECK(kdial::io::read_file(d / "a.txt", 100) == "hello");
    CHECK(kdial::io::read_file(d / "a.txt", 5) == "hello");
    check_error([&] { kdial::io::read_file(d / "a.txt", 4); }, { "a.txt", "larger than the limit of 4" });
    check_error([&] { kdial::io::read_file(d.path, 100); }, { d.path.string(), "is a directory" });
    REQUIRE(::mkfifo((d / "fifo").c_str(), 0600) == 0);
    // Would block forever in open() without O_NONBLOCK (nobody writes).
    check_error([&] { kdial::io::read_file(d / "fifo", 100); }, { "fifo", "is a FIFO" });
    fs::create_symlink(d / "loop2", d / "loop1");
    fs::create_symlink(d / "loop1", d / "loop2");
    check_error([&] { kdial::io::read_file(d / "loop1", 100); }, { "loop1", "symlink loop" });
    check_error([&] { kdial::io::read_file(d / "nope", 100); }, { "nope", "no such file" });
    write_file(d / "empty", "");
    CHECK(kdial::io::read_file(d / "empty", 0).empty());
}

TEST_CASE("read_npy refuses FIFOs and directories")
{
    temp_dir d;
    REQUIRE(::mkfifo((d / "x.npy").c_str(), 0600) == 0);
    check_error([&] { kdial::io::read_npy(d / "x.npy"); }, { "x.npy", "is a FIFO" });
    check_error([&] { kdial::io::read_npy(d.path); }, { "is a directory" });
}

TEST_CASE("atomic_file: all or nothing")
{
    temp_dir d;
    const fs::path p = d / "out.bin";
    kdial::io::write_file_atomic(p, "first");
    CHECK(slurp(p) == "first");
    kdial::io::write_file_atomic(p, "second version");
    CHECK(slurp(p) == "second version");
    CHECK(!fs::exists(d / "out.bin.partial"));

    SUBCASE("destroyed before commit: the old file stays, no partial")
    {
        {
            kdial::io::atomic_file f(p);
            f.write(std::string_view("half"));
            CHECK(fs::exists(d / "out.bin.partial"));
        }
        CHECK(slurp(p) == "second version");
        CHECK(!fs::exists(d / "out.bin.partial"));
    }
    SUBCASE("a failing write (file-size limit) names the file and errno, leaves the old file")
    {
        const std::string big(1 << 16, 'x');
        with_file_size_limit(4096, [&] {
            check_error([&] { kdial::io::write_file_atomic(p, big); },
                { "out.bin.partial", "write failed", "File too large", "is unchanged" });
        });
        CHECK(slurp(p) == "second version");
        CHECK(!fs::exists(d / "out.bin.partial"));
    }
    SUBCASE("an existing .partial is not overwritten")
    {
        write_file(d / "out.bin.partial", "someone's file");
        check_error([&] { kdial::io::write_file_atomic(p, "x"); }, { "out.bin.partial", "already exists" });
        CHECK(slurp(d / "out.bin.partial") == "someone's file");
        CHECK(slurp(p) == "second version");
    }
    SUBCASE("a .partial symlink is not followed")
    {
        write_file(d / "target", "keep me");
        fs::create_symlink(d / "target", d / "out.bin.partial");
        check_error([&] { kdial::io::write_file_atomic(p, "x"); }, { "out.bin.partial" });
        CHECK(slurp(d / "target") == "keep me");
    }
    SUBCASE("the target is a directory or a FIFO: refused, not replaced")
    {
        fs::create_directory(d / "sub");
        check_error([&] { kdial::io::write_file_atomic(d / "sub", "x"); }, { "sub", "is a directory" });
        CHECK(fs::is_directory(d / "sub"));
        CHECK(!fs::exists(d / "sub.partial"));
        REQUIRE(::mkfifo((d / "fifo").c_str(), 0600) == 0);
        check_error([&] { kdial::io::write_file_atomic(d / "fifo", "x"); }, { "fifo", "is a FIFO" });
        CHECK(fs::is_fifo(d / "fifo"));
        check_error([&] { kdial::io::write_file_atomic("/dev/null", "x"); }, { "/dev/null", "is a character device" });
    }
    SUBCASE("a symlink: its target is replaced, the link stays")
    {
        fs::create_symlink(p, d / "link");
        kdial::io::write_file_atomic(d / "link", "through the link");
        CHECK(fs::is_symlink(d / "link"));
        CHECK(slurp(p) == "through the link");
        fs::create_symlink(d / "loop2", d / "loop1");
        fs::create_symlink(d / "loop1", d / "loop2");
        check_error([&] { kdial::io::write_file_atomic(d / "loop1", "x"); }, { "loop1", "symlink loop" });
    }
    SUBCASE("the directory does not exist")
    {
        check_error([&] { kdial::io::write_file_atomic(d / "no" / "f", "x"); }, { "f.partial", "cannot create" });
    }
}

TEST_CASE("write_npy and write_safetensors are atomic and checked")
{
    temp_dir d;
    const std::vector<float> small(4, 1.0f), big(1 << 16, 2.0f);
    kdial::io::write_npy(d / "a.npy", small, 2, 2);
    const std::string before = slurp(d / "a.npy");
    with_file_size_limit(8192, [&] {
        check_error([&] { kdial::io::write_npy(d / "a.npy", big, 256, 256); },
            { "a.npy.partial", "File too large", "a.npy is unchanged" });
    });
    CHECK(slurp(d / "a.npy") == before);
    CHECK(!fs::exists(d / "a.npy.partial"));
    CHECK(kdial::io::read_npy(d / "a.npy").data == small);

    const kdial::io::tensor_data t[] = { kdial::io::make_tensor("w", { 256, 256 }, std::span<const float>(big)) };
    write_file(d / "m.safetensors", "user data");
    with_file_size_limit(8192, [&] {
        check_error([&] { kdial::io::write_safetensors(d / "m.safetensors", t); },
            { "m.safetensors.partial", "File too large" });
    });
    CHECK(slurp(d / "m.safetensors") == "user data");
    CHECK(!fs::exists(d / "m.safetensors.partial"));
}

TEST_CASE("same_file: hard links, symlinks and dot paths")
{
    temp_dir d;
    write_file(d / "a", "x");
    write_file(d / "b", "x");
    fs::create_hard_link(d / "a", d / "hard");
    fs::create_symlink(d / "a", d / "sym");
    CHECK(kdial::io::same_file(d / "a", d / "hard"));
    CHECK(kdial::io::same_file(d / "sym", d / "a"));
    CHECK(kdial::io::same_file(d / "." / "a", d / "a"));
    CHECK(!kdial::io::same_file(d / "a", d / "b"));
    CHECK(!kdial::io::same_file(d / "a", d / "missing"));
}

TEST_CASE("first_non_finite: every float format, any position, unaligned")
{
    std::mt19937 rng(3);
    const float bad[] = { std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
        -std::numeric_limits<float>::infinity() };
    for (std::size_t n : { 0u, 1u, 7u, 255u, 256u, 257u, 1000u }) {
        for (int trial = 0; trial < 6; ++trial) {
            std::vector<float> x(n);
            for (auto& v : x)
                v = std::uniform_real_distribution<float>(-1e38f, 1e38f)(rng);
            std::size_t want = n;
            if (n && trial) {
                want = rng() % n;
                x[want] = bad[trial % 3];
                if (want + 1 < n)
                    x[n - 1] = bad[0]; // a later one must not win
            }
            CAPTURE(n);
            CAPTURE(want);
            CHECK(kdial::first_non_finite(std::span<const float>(x)) == want);
            // The same through bf16 / f16 / f64 bits, at an odd byte offset.
            std::vector<kdial::bf16> b(n);
            std::vector<std::uint16_t> h(n);
            std::vector<double> w(n);
            for (std::size_t i = 0; i < n; ++i) {
                b[i] = kdial::bf16::from_float(std::isfinite(x[i]) ? x[i] / 1e30f : x[i]);
                const float hv = std::isfinite(x[i]) ? x[i] / 1e34f : x[i]; // within +-30000: finite in f16
                h[i] = std::isnan(hv) ? 0x7e00 : std::isinf(hv) ? (hv > 0 ? 0x7c00 : 0xfc00) : 0x3c00;
                w[i] = x[i];
            }
            CHECK(kdial::first_non_finite(std::span<const kdial::bf16>(b)) == want);
            std::vector<std::byte> buf(1 + n * 8);
            auto at_odd = [&](const void* src, std::size_t bytes) {
                if (bytes) // memcpy from an empty vector's null data() is UB
                    std::memcpy(buf.data() + 1, src, bytes);
                return buf.data() + 1;
            };
            CHECK(kdial::first_non_finite(at_odd(h.data(), n * 2), n, kdial::float_format::f16) == want);
            CHECK(kdial::first_non_finite(at_odd(b.data(), n * 2), n, kdial::float_format::bf16) == want);
            CHECK(kdial::first_non_finite(at_odd(x.data(), n * 4), n, kdial::float_format::f32) == want);
            CHECK(kdial::first_non_finite(at_odd(w.data(), n * 8), n, kdial::float_format::f64) == want);
        }
    }
    // The largest finite values are finite; subnormals too.
    const float edge[] = { std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
        std::numeric_limits<float>::denorm_min(), 0.0f, -0.0f };
    CHECK(kdial::first_non_finite(std::span<const float>(edge)) == 5);
    const std::uint16_t hmax[] = { 0x7bff, 0xfbff, 0x0001 };
    CHECK(kdial::first_non_finite(reinterpret_cast<const std::byte*>(hmax), 3, kdial::float_format::f16) == 3);
}

TEST_CASE("check_finite names the shard, tensor, element and value")
{
    temp_dir d;
    std::vector<float> a(6, 0.5f), b(12, 0.25f);
    std::vector<std::int32_t> ints(3, -1); // integer tensors are skipped (all bits set is not a NaN there)
    b[7] = std::numeric_limits<float>::quiet_NaN();
    const kdial::io::tensor_data ts[] = { kdial::io::make_tensor("a", { 2, 3 }, std::span<const float>(a)),
        kdial::io::make_tensor("b", { 3, 4 }, std::span<const float>(b)),
        { "ids", kdial::io::st_dtype::i32, { 3 }, std::as_bytes(std::span<const std::int32_t>(ints)) } };
    kdial::io::write_safetensors(d / "model.safetensors", ts);
    const auto ck = kdial::io::safetensors_checkpoint::open(d.path);
    check_error([&] { kdial::io::check_finite(ck); },
        { "model.safetensors", "tensor 'b'", "element 7 [1, 3]", "nan", "non-finite" });
    CHECK(kdial::io::find_non_finite(ck.info("b")) == std::optional<std::size_t>(7));
    CHECK(!kdial::io::find_non_finite(ck.info("a")));
    CHECK(!kdial::io::find_non_finite(ck.info("ids")));

    // A bf16 -inf.
    std::vector<kdial::bf16> c(5, kdial::bf16::from_float(1.0f));
    c[4] = kdial::bf16::from_float(-std::numeric_limits<float>::infinity());
    const kdial::io::tensor_data t2[] = { kdial::io::make_tensor("c", { 5 }, std::span<const kdial::bf16>(c)) };
    kdial::io::write_safetensors(d / "c.safetensors", t2);
    const auto ck2 = kdial::io::safetensors_checkpoint::open(d / "c.safetensors");
    check_error([&] { kdial::io::check_finite(ck2); }, { "tensor 'c'", "element 4 [4]", "-inf" });
}
