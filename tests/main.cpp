// Test runner: Catch2's own session, plus --skip-without-gpu, which makes the process exit with
// 77 (ctest's SKIP_RETURN_CODE) on a machine without a CUDA device, so GPU suites are reported as
// skipped, never as passed.
#include <cstdio>
#include <cstring>
#include <vector>

#if CLSA_CATCH2_MAJOR == 3
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include "clsa/types.hpp"

int main(int argc, char** argv) {
  std::vector<char*> arguments;
  bool skip_without_gpu = false;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--skip-without-gpu") == 0) {
      skip_without_gpu = true;
    } else {
      arguments.push_back(argv[i]);
    }
  }
  if (skip_without_gpu && clsa::cuda_device_count() == 0) {
    std::printf("SKIPPED: no CUDA device present (%s)\n",
                clsa::built_with_cuda() ? "built with CUDA" : "built without CUDA");
    return 77;
  }
  return Catch::Session().run(static_cast<int>(arguments.size()), arguments.data());
}
