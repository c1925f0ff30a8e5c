#pragma once

#define CLSA_VERSION_MAJOR 0
#define CLSA_VERSION_MINOR 1
#define CLSA_VERSION_PATCH 0

namespace clsa {
/// "0.1.0"
const char* version();
}  // namespace clsa
