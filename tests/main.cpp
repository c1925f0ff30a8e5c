// Test runner: Catch2's own session, plus two options that make the process exit with 77 (ctest's
// SKIP_RETURN_CODE) so that GPU suites are reported as skipped, never as passed, where they cannot
// run:
//   --skip-without-gpu   on a machine without a CUDA device;
//   --require-gpus N     on a machine with fewer than N CUDA devices (multi-GPU suites).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if CLSA_CATCH2_MAJOR == 3
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include "clsa/types.hpp"

namespace {

/// A positive device count, or -1 when `text` is not one.
int parse_count(const char* text) {
  if (text == nullptr || *text == '\0') return -1;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*end != '\0' || value < 1 || value > 1024) return -1;
  return static_cast<int>(value);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<char*> arguments;
  bool skip_without_gpu = false;
  int required_gpus = 0;
  const char* const require_option = "--require-gpus";
  const std::size_t require_length = std::strlen(require_option);
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--skip-without-gpu") == 0) {
      skip_without_gpu = true;
    } else if (std::strncmp(argv[i], require_option, require_length) == 0 &&
               (argv[i][require_length] == '\0' || argv[i][require_length] == '=')) {
      // --require-gpus N or --require-gpus=N
      const char* value =
          argv[i][require_length] == '=' ? argv[i] + require_length + 1 : (i + 1 < argc ? argv[++i] : nullptr);
      const int count = parse_count(value);
      if (count < 0) {
        std::fprintf(stderr, "%s needs a positive device count (got %s)\n", require_option,
                     value != nullptr ? value : "nothing");
        return 2;
      }
      if (count > required_gpus) required_gpus = count;
    } else {
      arguments.push_back(argv[i]);
    }
  }
  if (skip_without_gpu && clsa::cuda_device_count() == 0) {
    std::printf("SKIPPED: no CUDA device present (%s)\n",
                clsa::built_with_cuda() ? "built with CUDA" : "built without CUDA");
    return 77;
  }
  if (required_gpus > 0 && clsa::cuda_device_count() < required_gpus) {
    std::printf("SKIPPED: needs %d CUDA devices, found %d (%s)\n", required_gpus, clsa::cuda_device_count(),
                clsa::built_with_cuda() ? "built with CUDA" : "built without CUDA");
    return 77;
  }
  return Catch::Session().run(static_cast<int>(arguments.size()), arguments.data());
}
