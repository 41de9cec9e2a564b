// ODR check: two translation units include the umbrella header and link
// into the same executable (every non-template function must be inline).
#include <kdial/kdial.hpp>

int kdial_odr_a()
{
    return KDIAL_VERSION_MAJOR;
}
