// What the yoco_decoder test programs share: counting failed expectations (each is reported and
// the run goes on), the relative error measure, and the program's exit code.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

namespace yoco_test {

inline int& failures() {
  static int count = 0;
  return count;
}

inline void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures();
    std::printf("FAILED: %s\n", what.c_str());
  }
}

/// max |got - expected| / (1 + |expected|); a size mismatch or a NaN counts as infinitely wrong.
template <class Expected>
double worst_error(const std::vector<float>& got, const std::vector<Expected>& expected) {
  double worst = got.size() == expected.size() ? 0.0 : INFINITY;
  for (std::size_t i = 0; i < std::min(got.size(), expected.size()); ++i) {
    const double reference = static_cast<double>(expected[i]);
    const double error = std::abs(static_cast<double>(got[i]) - reference) / (1.0 + std::abs(reference));
    worst = std::isnan(error) ? INFINITY : std::max(worst, error);
  }
  return worst;
}

/// The program's exit code: 1 (after saying how many) when an expectation failed.
inline int exit_code() {
  if (failures() != 0) {
    std::printf("%d expectation(s) failed\n", failures());
    return 1;
  }
  std::printf("all passed\n");
  return 0;
}

}  // namespace yoco_test
