// kdial: Mixture-of-Experts routing and kernel primitives for the CPU, with
// k (experts per token) as a dial. The stages in data-flow order:
// route -> dispatch -> experts -> combine, then the layer that composes them.
#pragma once

#include "version.hpp"

#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/extent.hpp"
#include "core/views.hpp"
#include "parallel/executor.hpp"
#include "parallel/for_each.hpp"
#include "simd/compat.hpp"
#include "simd/vec.hpp"

#include "routing/router.hpp" // 1. route
#include "routing/policy.hpp" // 1. route: the routing policies
#include "dispatch/plan.hpp" // 2. dispatch
#include "combine/combine.hpp" // 4. combine
#include "kernels/linear.hpp" // 3. experts: GEMV / small-row / GEMM kernels
#include "experts/swiglu.hpp" // 3. experts: one SwiGLU expert
#include "experts/expert_set.hpp" // 3. experts: the E experts of a layer
#include "layer/moe.hpp" // the whole layer: weights, workspace, one forward and its stages
