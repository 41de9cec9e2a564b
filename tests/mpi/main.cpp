// The doctest main of kdial_mpi_tests (expert parallelism over MPI): every
// rank runs every test case (the cases are collective); rank 0 reports in
// full, the others only their failures; the run fails if any rank failed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <mpi.h>

int main(int argc, char** argv)
{
    MPI_Init(&argc, &argv);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    doctest::Context ctx(argc, argv);
    if (rank != 0)
        ctx.setOption("minimal", true);
    int rc = ctx.run();
    int worst = 0;
    MPI_Allreduce(&rc, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return worst;
}
