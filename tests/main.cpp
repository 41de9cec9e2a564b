// The one doctest main of the kdial test executable.
// KDIAL_TEST_MAX_THREADS=N caps oneTBB's parallelism for the whole run (the
// aarch64 CI job sets 1: oneTBB's worker threads hang under qemu-user, while
// the library's results do not depend on the thread count anyway). Under
// that cap the run also ends with std::_Exit: oneTBB's teardown at exit spins
// forever under qemu-user after a parallel_for ran on the capped scheduler.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <tbb/global_control.h>

#include <cstdio>
#include <cstdlib>
#include <memory>

int main(int argc, char** argv)
{
    std::unique_ptr<tbb::global_control> cap;
    if (const char* s = std::getenv("KDIAL_TEST_MAX_THREADS"); s != nullptr && std::atoi(s) > 0)
        cap = std::make_unique<tbb::global_control>(
            tbb::global_control::max_allowed_parallelism, static_cast<std::size_t>(std::atoi(s)));
    doctest::Context ctx(argc, argv);
    const int rc = ctx.run();
    if (cap) { // emulated run: skip oneTBB's teardown (see above)
        std::fflush(nullptr);
        std::_Exit(rc);
    }
    return rc;
}
