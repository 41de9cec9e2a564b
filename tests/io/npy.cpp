// .npy: the exact header NumPy writes, round trips of 1-D and 2-D float32
// arrays (strided views included), and malformed files rejected by name.
#include <doctest/doctest.h>
#include <kdial/io/npy.hpp>

#include "io/io_test_util.hpp"

#include <cstring>
#include <string>
#include <vector>

using namespace kdial;
using namespace kdial::io;
using kdial::test::check_error;
using kdial::test::temp_dir;
using kdial::test::write_file;

namespace {

using kdial::test::slurp;

// A v1.0 file with the given header dict text (padded to 64 like NumPy) and data bytes.
std::string npy_image(std::string dict, std::size_t data_bytes)
{
    while ((10 + dict.size() + 1) % 64)
        dict += ' ';
    dict += '\n';
    std::string out = "\x93NUMPY\x01";
    out += '\0';
    out += static_cast<char>(dict.size() & 0xff);
    out += static_cast<char>(dict.size() >> 8);
    return out + dict + std::string(data_bytes, '\0');
}

} // namespace

TEST_SUITE("io")
{

    TEST_CASE("write_npy: NumPy's v1.0 header, data 64-byte aligned [io][npy]")
    {
        temp_dir dir;
        const std::vector<float> v = { 1, 2, 3, 4, 5, 6 };
        write_npy(dir / "a.npy", v, 2, 3);
        const std::string img = slurp(dir / "a.npy");
        REQUIRE(img.size() == 128 + 24); // 10 + 60-char dict + '\n' > 64, so the data starts at 128
        CHECK(img.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
        CHECK(static_cast<unsigned char>(img[8]) == 118); // header length: 128 - 10
        CHECK(img[9] == 0);
        const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        CHECK(img.substr(10, dict.size()) == dict);
        CHECK(img[127] == '\n');
        CHECK(img.find_first_not_of(' ', 10 + dict.size()) == 127);
        CHECK(std::memcmp(img.data() + 128, v.data(), 24) == 0);

        write_npy(dir / "b.npy", std::span<const float>(v));
        const std::string b = slurp(dir / "b.npy");
        CHECK(b.find("'shape': (6,), }") != std::string::npos);
        CHECK((b.size() - 24) % 64 == 0);
    }

    TEST_CASE("read_npy: round trips 1-D, 2-D, strided and empty arrays [io][npy]")
    {
        temp_dir dir;
        std::vector<float> v(7 * 5);
        for (std::size_t i = 0; i < v.size(); ++i)
            v[i] = static_cast<float>(i) * 0.25f - 3.0f;
        write_npy(dir / "m.npy", v, 7, 5);
        const auto m = read_npy(dir / "m.npy");
        CHECK(m.shape == std::vector<std::size_t> { 7, 5 });
        CHECK(m.data == v);
        CHECK(m.rows() == 7);
        CHECK(m.cols() == 5);
        CHECK(m.matrix()(6, 4) == v[34]);

        // Columns 1..3 of a [7, 5] matrix: stride 5, 3 columns.
        write_npy(dir / "s.npy", cmatrix_view<float>(v.data() + 1, 7, 3, 5));
        const auto s = read_npy(dir / "s.npy");
        CHECK(s.shape == std::vector<std::size_t> { 7, 3 });
        for (std::size_t r = 0; r < 7; ++r)
            for (std::size_t c = 0; c < 3; ++c)
                CHECK(s.matrix()(r, c) == v[r * 5 + 1 + c]);

        write_npy(dir / "v.npy", std::span<const float>(v).first(4));
        const auto one = read_npy(dir / "v.npy");
        CHECK(one.shape == std::vector<std::size_t> { 4 });
        CHECK(one.rows() == 1);
        CHECK(one.data == std::vector<float>(v.begin(), v.begin() + 4));

        write_npy(dir / "e.npy", std::span<const float>(), 0, 3);
        const auto e = read_npy(dir / "e.npy");
        CHECK(e.shape == std::vector<std::size_t> { 0, 3 });
        CHECK(e.data.empty());

        // Hand-written headers in other spellings NumPy accepts.
        write_file(dir / "h.npy", npy_image("{\"shape\": (2,), \"fortran_order\": False, \"descr\": \"<f4\"}", 8));
        CHECK(read_npy(dir / "h.npy").shape == std::vector<std::size_t> { 2 });
        write_file(dir / "l.npy", npy_image("{'descr':'<f4','fortran_order':False,'shape':(2L,1L)}", 8));
        CHECK(read_npy(dir / "l.npy").shape == std::vector<std::size_t> { 2, 1 });
    }

    TEST_CASE("read_npy: malformed files are rejected with the file and field named [io][npy][errors]")
    {
        temp_dir dir;
        const auto p = dir / "bad.npy";
        const std::string P = p.string();
        const auto with = [&](const std::string& img) {
            write_file(p, img);
            return [&] { (void)read_npy(p); };
        };
        const std::string good = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
        check_error([&] { (void)read_npy(dir / "none.npy"); }, { (dir / "none.npy").string(), "cannot open" });
        check_error(with("hello"), { P, "magic" });
        check_error(with("\x93NUMPX\x01\x00\x00\x00"), { P, "magic" });
        std::string v9 = npy_image(good, 24);
        v9[6] = 9;
        check_error(with(v9), { P, "version 9.0" });
        std::string longhdr = npy_image(good, 0);
        longhdr[9] = '\x7f';
        check_error(with(longhdr), { P, "header length", "past the end" });
        check_error(with(npy_image(good, 20)), { P, "20 bytes", "needs 24" });
        check_error(with(npy_image(good, 28)), { P, "28 bytes", "needs 24" });
        check_error(with(npy_image("{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }", 48)),
            { P, "'<f8'", "'<f4'" });
        check_error(with(npy_image("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", 24)), { P, "'>f4'" });
        check_error(
            with(npy_image("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24)), { P, "Fortran order" });
        check_error(
            with(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }", 24)), { P, "3 dims" });
        check_error(with(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (), }", 4)), { P, "0 dims" });
        check_error(with(npy_image("{'descr': '<f4', 'shape': (2, 3), }", 24)), { P, "lacks 'fortran_order'" });
        check_error(with(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", 24)),
            { P, "non-negative integer" });
        check_error(with(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'extra': 1}", 24)),
            { P, "'extra'" });
        check_error(with(npy_image("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}", 24)),
            { P, "repeated" });
        check_error(
            with(npy_image("{'descr': '<f4', 'fortran_order': Nope, 'shape': (2, 3), }", 24)), { P, "True or False" });
        check_error(
            with(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), } x", 24)), { P, "trailing" });
        check_error(with(npy_image("{'descr': '<f4 , 'fortran_order': False", 24)), { P, "expects" });
        check_error(
            with(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999999, 3), }", 24)),
            { P, "overflows" });
        check_error(
            with(npy_image("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4), }", 24)),
            { P, "overflows" });
        check_error([&] { write_npy(dir / "w.npy", std::vector<float>(5), 2, 3); }, { "w.npy", "[2, 3]", "5 floats" });
        check_error(
            [&] { write_npy(dir / "nodir" / "w.npy", std::vector<float>(6), 2, 3); }, { "w.npy", "cannot create" });
    }

} // TEST_SUITE
