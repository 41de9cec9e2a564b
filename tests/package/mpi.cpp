// kdial::mpi through the package: kdial's headers and MPI's come with the
// target, and MPI's library is linked (MPI_Get_version may run before
// MPI_Init).
#include <kdial/distributed/placement.hpp>

#include <mpi.h>

#include <cstdio>

int main()
{
    int version = 0, subversion = 0;
    MPI_Get_version(&version, &subversion);
    const auto p = kdial::distributed::expert_placement::contiguous(8, 2);
    std::printf("kdial::mpi: MPI %d.%d, expert 7 on rank %d\n", version, subversion, p.owner(7));
    return version >= 1 && p.owner(7) == 1 ? 0 : 1;
}
