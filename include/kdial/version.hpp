// kdial version: the one source of the version number; CMake parses it.
#pragma once

#define KDIAL_VERSION_MAJOR 0
#define KDIAL_VERSION_MINOR 1
#define KDIAL_VERSION_PATCH 0
