// Catch2 v2 (Debian) and v3 (elsewhere) behind one include; CLSA_CATCH2_MAJOR comes from CMake.
#pragma once

#if CLSA_CATCH2_MAJOR == 3
#include <catch2/catch_test_macros.hpp>
#include <catch2/generators/catch_generators.hpp>
#include <catch2/matchers/catch_matchers_string.hpp>
#define CLSA_SKIP(message) SKIP(message)
#define CLSA_CONTAINS(text) Catch::Matchers::ContainsSubstring(text)
#else
#include <catch2/catch.hpp>
// v2 has no SKIP: say why and leave the test case (ctest reports the GPU suites as skipped via
// the runner's exit code 77, see main.cpp).
#define CLSA_SKIP(message) \
  do {                     \
    WARN(message);         \
    return;                \
  } while (false)
#define CLSA_CONTAINS(text) Catch::Matchers::Contains(text)
#endif

#include <string>

#include "clsa/types.hpp"

/// Requires `expression` to throw clsa::Error with `error_code` and a message containing `fragment`.
#define CLSA_REQUIRE_ERROR(expression, error_code, fragment)               \
  do {                                                                     \
    bool clsa_thrown = false;                                              \
    try {                                                                  \
      expression;                                                          \
    } catch (const clsa::Error& clsa_error) {                              \
      clsa_thrown = true;                                                  \
      INFO("message: " << clsa_error.what());                              \
      CHECK(clsa_error.code() == (error_code));                            \
      CHECK_THAT(std::string(clsa_error.what()), CLSA_CONTAINS(fragment)); \
    }                                                                      \
    CHECK(clsa_thrown);                                                    \
  } while (false)

/// Leaves a test case that needs a CUDA device when none is present (reported as skipped).
#define CLSA_SKIP_WITHOUT_GPU()                                              \
  do {                                                                       \
    if (clsa::cuda_device_count() == 0) CLSA_SKIP("no CUDA device present"); \
  } while (false)

/// Defines one test body run as two test cases: on the CPU backend, and on the CUDA backend
/// (tagged [cuda], skipped without a GPU).
#define CLSA_BACKEND_TEST(function, name, tags) \
  static void function(clsa::Backend backend);  \
  TEST_CASE(name " (cpu)", tags) {              \
    function(clsa::Backend::cpu);               \
  }                                             \
  TEST_CASE(name " (cuda)", tags "[cuda]") {    \
    CLSA_SKIP_WITHOUT_GPU();                    \
    function(clsa::Backend::cuda);              \
  }                                             \
  static void function(clsa::Backend backend)
