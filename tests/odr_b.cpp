// ODR check, second translation unit (see odr_a.cpp).
#include <kdial/kdial.hpp>

int kdial_odr_b()
{
    return KDIAL_VERSION_MINOR;
}
