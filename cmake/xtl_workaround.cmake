# Debian 12's xsimd 8.1 package exports a target that links "xtl" without
# requiring it (xsimd only needs xtl for optional xtensor interop). Use the
# real xtl package when it is installed; otherwise give the name an empty
# interface target so the link line does not ask for -lxtl.
if(TARGET xsimd AND NOT TARGET xtl)
  find_package(xtl QUIET CONFIG)
  if(NOT TARGET xtl)
    add_library(xtl INTERFACE IMPORTED)
  endif()
endif()
