// Checked file access for everything kdial reads or writes outside the
// mapped checkpoint: whole-file reads that accept only regular files (a FIFO
// would block open() forever, a directory gives a confusing stream error),
// and atomic writes (data goes to "<path>.partial", every write is checked,
// the file is fsynced and then renamed over `path`, so a crash or a full disk
// never leaves a truncated file under the final name).
// Stage: io. Errors are kdial::error naming the path and the errno text.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "../core/error.hpp"

namespace kdial::io {

namespace detail {

inline std::string errno_text(int e)
{
    switch (e) {
    case ENOENT:
        return "no such file or directory";
    case ELOOP:
        return "symlink loop (too many levels of symbolic links)";
    case EACCES:
    case EPERM:
        return "permission denied";
    case ENOTDIR:
        return "a component of the path is not a directory";
    case ENAMETOOLONG:
        return "file name too long";
    default:
        return std::generic_category().message(e);
    }
}

// "a directory", "a FIFO (named pipe)", ... for a non-regular st_mode.
inline const char* file_kind(mode_t m)
{
    if (S_ISDIR(m))
        return "a directory";
    if (S_ISFIFO(m))
        return "a FIFO (named pipe)";
    if (S_ISCHR(m))
        return "a character device";
    if (S_ISBLK(m))
        return "a block device";
    if (S_ISSOCK(m))
        return "a socket";
    return "not a regular file";
}

inline std::string file_errno_text(int e)
{
    return errno_text(e);
}

// Why open() failed, in words a user can act on.
inline std::string open_error_text(int e)
{
    return errno_text(e);
}

} // namespace detail

// Default size limit of a whole-file read.
inline constexpr std::size_t default_max_file_bytes = 100'000'000;

// ---------------------------------------------------------------------------
// Reading a file
// ---------------------------------------------------------------------------

// Opens `path` read-only after stat says it is a regular file (symlinks
// followed), with O_NONBLOCK so that a FIFO or device swapped in between never
// blocks, and checks the descriptor again. Returns the descriptor (the caller
// closes it). Errors name the path and `what` the file is: no such file,
// symlink loop, permission denied, a directory / FIFO / device / socket.
inline int open_regular_file(const std::filesystem::path& path, std::string_view what)
{
    using ::kdial::detail::cat;
    const std::string p = path.string();
    struct stat sb { };
    if (::stat(p.c_str(), &sb) != 0)
        throw error(cat(p, ": cannot open ", what, ": ", detail::errno_text(errno)));
    if (!S_ISREG(sb.st_mode))
        throw error(cat(p, ": cannot open ", what, ": it is ", detail::file_kind(sb.st_mode), ", not a regular file"));
    const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0)
        throw error(cat(p, ": cannot open ", what, ": ", detail::errno_text(errno)));
    if (::fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        const int e = errno;
        ::close(fd);
        throw error(cat(p, ": cannot open ", what, ": ",
            S_ISREG(sb.st_mode) ? detail::errno_text(e) : std::string("it is ") + detail::file_kind(sb.st_mode)));
    }
    return fd;
}

// Reads the whole of `path`, a regular file of at most `max_bytes`, opened by
// open_regular_file. Errors name the path and `what` the file is (e.g.
// "config file"): those of open_regular_file, too large, a read error.
inline std::string read_file_checked(
    const std::filesystem::path& path, std::string_view what, std::size_t max_bytes = default_max_file_bytes)
{
    using ::kdial::detail::cat;
    const std::string p = path.string();
    const int fd = open_regular_file(path, what);
    struct closer {
        int fd;
        ~closer() { ::close(fd); }
    } guard { fd };
    struct stat sb { };
    if (::fstat(fd, &sb) != 0)
        throw error(cat(p, ": cannot stat ", what, ": ", detail::errno_text(errno)));
    if (sb.st_size < 0 || static_cast<std::uint64_t>(sb.st_size) > max_bytes)
        throw error(cat(p, ": ", what, " is ", sb.st_size, " bytes, larger than the limit of ", max_bytes, " bytes"));
    std::string text(static_cast<std::size_t>(sb.st_size), '\0');
    std::size_t got = 0;
    for (;;) {
        if (got == text.size()) {
            // The file may have grown since fstat: read on, up to the limit.
            if (text.size() > max_bytes)
                throw error(cat(p, ": ", what, " grew past the limit of ", max_bytes, " bytes while being read"));
            text.resize(std::min(std::max<std::size_t>(text.size() * 2, 4096), max_bytes + 1));
        }
        const ::ssize_t r = ::read(fd, text.data() + got, text.size() - got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            throw error(cat(p, ": cannot read ", what, ": ", detail::errno_text(errno)));
        }
        if (r == 0)
            break;
        got += static_cast<std::size_t>(r);
    }
    text.resize(got);
    if (got > max_bytes)
        throw error(cat(p, ": ", what, " grew past the limit of ", max_bytes, " bytes while being read"));
    return text;
}

// Reads the whole regular file `path` (symlinks followed), at most
// `max_bytes` long: read_file_checked naming it just "file".
inline std::string read_file(const std::filesystem::path& path, std::size_t max_bytes)
{
    return read_file_checked(path, "file", max_bytes);
}

// True when a and b both exist and are the same file (device and inode,
// symlinks followed): catches hard links, symlinks and "dir/../dir/x".
inline bool same_file(const std::filesystem::path& a, const std::filesystem::path& b) noexcept
{
    struct stat sa {
    }, sb {};
    return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev
        && sa.st_ino == sb.st_ino;
}

// A file written atomically: the bytes go to "<path>.partial" (created
// exclusively, never through a symlink: an existing .partial is an error,
// not overwritten), every write is checked; commit() fsyncs, renames it over
// `path` and fsyncs the directory. Destroyed without commit() (an error
// anywhere), the partial file is removed and `path` is untouched. A symlink
// `path` is followed; an existing `path` that is not a regular file (a
// directory, FIFO, /dev/null) is refused rather than replaced.
class atomic_file {
public:
    explicit atomic_file(std::filesystem::path path)
        : path_(resolve(std::move(path)))
        , partial_(path_.string() + ".partial")
    {
        using ::kdial::detail::cat;
        fd_ = ::open(partial_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0666);
        if (fd_ < 0) {
            const int e = errno;
            if (e == EEXIST)
                throw error(cat(partial_.string(),
                    ": already exists (left by an interrupted write?); remove it to write ", path_.string()));
            throw error(cat(partial_.string(), ": cannot create: ", detail::file_errno_text(e)));
        }
    }
    atomic_file(const atomic_file&) = delete;
    atomic_file& operator=(const atomic_file&) = delete;
    ~atomic_file() { abandon(); }

    const std::filesystem::path& path() const noexcept { return path_; }

    void write(std::span<const std::byte> bytes)
    {
        const char* p = reinterpret_cast<const char*>(bytes.data());
        std::size_t left = bytes.size();
        while (left > 0) {
            const ssize_t n = ::write(fd_, p, left);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                fail("write failed", n < 0 ? errno : EIO);
            p += n;
            left -= static_cast<std::size_t>(n);
        }
    }
    void write(std::string_view s) { write(std::as_bytes(std::span<const char>(s.data(), s.size()))); }

    // Makes the file durable under its final name.
    void commit()
    {
        using ::kdial::detail::cat;
        if (::fsync(fd_) != 0)
            fail("fsync failed", errno);
        const int fd = std::exchange(fd_, -1);
        if (::close(fd) != 0)
            fail("close failed", errno);
        if (::rename(partial_.c_str(), path_.c_str()) != 0) {
            const int e = errno;
            abandon();
            throw error(
                cat(path_.string(), ": cannot rename ", partial_.string(), " to it: ", detail::file_errno_text(e)));
        }
        committed_ = true;
        std::filesystem::path dir = path_.parent_path();
        if (dir.empty())
            dir = ".";
        const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) { // best effort: the data itself is already synced
            ::fsync(dfd);
            ::close(dfd);
        }
    }

private:
    // A symlink is followed (its target is replaced, the link stays); an
    // existing target must be a regular file: renaming over /dev/null, a
    // FIFO or a directory would replace it.
    static std::filesystem::path resolve(std::filesystem::path p)
    {
        using ::kdial::detail::cat;
        namespace fs = std::filesystem;
        std::error_code ec;
        if (fs::is_symlink(fs::symlink_status(p, ec))) {
            fs::path t = fs::weakly_canonical(p, ec);
            if (ec)
                throw error(cat(p.string(), ": cannot resolve the symlink: ",
                    ec == std::errc::too_many_symbolic_link_levels ? detail::open_error_text(ELOOP) : ec.message()));
            p = std::move(t);
        }
        struct stat sb { };
        if (::stat(p.c_str(), &sb) == 0 && !S_ISREG(sb.st_mode))
            throw error(cat(p.string(), ": is ", detail::file_kind(sb.st_mode),
                "; only regular files are written (atomically, by renaming a new file over them)"));
        return p;
    }

    [[noreturn]] void fail(const char* what, int e)
    {
        abandon();
        throw error(::kdial::detail::cat(
            partial_.string(), ": ", what, ": ", detail::file_errno_text(e), " (", path_.string(), " is unchanged)"));
    }
    void abandon() noexcept
    {
        if (fd_ >= 0)
            ::close(std::exchange(fd_, -1));
        if (!committed_)
            ::unlink(partial_.c_str());
        committed_ = true; // nothing left to clean
    }

    std::filesystem::path path_, partial_;
    int fd_ = -1;
    bool committed_ = false;
};

// Writes `text` to `path` atomically (see atomic_file).
inline void write_file_atomic(const std::filesystem::path& path, std::string_view text)
{
    atomic_file f(path);
    f.write(text);
    f.commit();
}

} // namespace kdial::io
