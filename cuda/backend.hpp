// The CUDA backend (host side): plans, launches and memory on CUDA devices.
#pragma once

#include "backend/backend.hpp"

namespace clsa {
namespace detail {

const ComputeBackend& cuda_backend();
/// CUDA devices present (0 without driver or device), counted once.
int cuda_device_total();

}  // namespace detail
}  // namespace clsa
