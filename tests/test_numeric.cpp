// Dtype conversions and the routing order key.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "clsa/numeric.hpp"
#include "support.hpp"

TEST_CASE("bf16 and f16 conversions round to nearest even and keep specials", "[numeric]") {
  using clsa::to_float;
  // Exactly representable values survive.
  for (float x : {0.0f, 1.0f, -2.5f, 0.15625f, 65504.0f, -1024.0f}) {
    CHECK(to_float(clsa::to_float16(x)) == x);
  }
  for (float x : {0.0f, 1.0f, -2.5f, std::ldexp(1.0f, 127), -1.0e-30f * 0.0f}) {
    CHECK(to_float(clsa::to_bfloat16(x)) == x);
  }
  // Ties go to even: 1 + 2^-8 lies halfway between bf16 1 and 1 + 2^-7.
  CHECK(to_float(clsa::to_bfloat16(1.0f + std::ldexp(1.0f, -8))) == 1.0f);
  CHECK(to_float(clsa::to_bfloat16(1.0f + 3 * std::ldexp(1.0f, -8))) == 1.0f + std::ldexp(1.0f, -6));
  CHECK(to_float(clsa::to_float16(1.0f + std::ldexp(1.0f, -11))) == 1.0f);
  // f16 subnormals, overflow, NaN.
  CHECK(to_float(clsa::to_float16(std::ldexp(1.0f, -24))) == std::ldexp(1.0f, -24));
  CHECK(to_float(clsa::to_float16(std::ldexp(1.0f, -25))) == 0.0f);
  CHECK(to_float(clsa::to_float16(std::ldexp(1.5f, -24))) == std::ldexp(2.0f, -24));
  CHECK(std::isinf(to_float(clsa::to_float16(70000.0f))));
  CHECK(std::isnan(to_float(clsa::to_float16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isnan(to_float(clsa::to_bfloat16(std::numeric_limits<float>::quiet_NaN()))));
  // Every f16 bit pattern round-trips through float.
  for (unsigned bits = 0; bits < 0x10000u; ++bits) {
    const clsa::float16 h{static_cast<std::uint16_t>(bits)};
    const float x = to_float(h);
    if (std::isnan(x)) continue;
    REQUIRE(clsa::to_float16(x).bits == h.bits);
  }
}

TEST_CASE("random floats round to the nearest bf16 and f16", "[numeric]") {
  test::Rng rng(test::base_seed());
  for (int i = 0; i < 100000; ++i) {
    const float x = static_cast<float>(rng.normal() * std::pow(10.0, rng.uniform(-6, 4)));
    const float b = clsa::to_float(clsa::to_bfloat16(x));
    const float h = clsa::to_float(clsa::to_float16(x));
    REQUIRE(std::abs(b - x) <= std::abs(x) * std::ldexp(1.0f, -8));
    if (std::abs(x) > 6.2e-5f && std::abs(x) < 65504.0f)
      REQUIRE(std::abs(h - x) <= std::abs(x) * std::ldexp(1.0f, -11));
  }
}

TEST_CASE("score_key orders floats and merges signed zeros and sinks NaN below -inf", "[numeric]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float values[] = {-inf, -1e30f, -1.0f, -1e-40f, 0.0f, 1e-40f, 1.0f, 1e30f, inf};
  for (std::size_t i = 0; i + 1 < sizeof values / sizeof values[0]; ++i) {
    CHECK(clsa::score_key(values[i]) < clsa::score_key(values[i + 1]));
  }
  CHECK(clsa::score_key(-0.0f) == clsa::score_key(0.0f));
  CHECK(clsa::score_key(std::numeric_limits<float>::quiet_NaN()) == 0u);
  CHECK(clsa::score_key(-std::numeric_limits<float>::quiet_NaN()) == 0u);
  CHECK(clsa::score_key(-inf) > 0u);
  // Equal scores: the lower position ranks first.
  CHECK(clsa::routing_key(1.0f, 3) > clsa::routing_key(1.0f, 4));
  CHECK(clsa::routing_key(1.0f, 4) > clsa::routing_key(0.5f, 0));
  CHECK(clsa::routing_key_position(clsa::routing_key(-2.0f, 123456)) == 123456);
}

using test::e4m3_values;
using test::nearest_e4m3;

TEST_CASE("e4m3: every code round-trips, conversion rounds to nearest even and saturates", "[numeric]") {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (unsigned code = 0; code < 256u; ++code) {
    const float x = clsa::to_float(clsa::float8_e4m3{static_cast<std::uint8_t>(code)});
    if ((code & 0x7fu) == 0x7fu) {
      REQUIRE(std::isnan(x));
      REQUIRE(clsa::to_float8_e4m3(x).bits == code);  // NaN keeps its sign bit
      continue;
    }
    REQUIRE(clsa::to_float8_e4m3(x).bits == code);
    REQUIRE(static_cast<double>(x) == (code & 0x80u ? -1.0 : 1.0) * e4m3_values()[code & 0x7fu].first);
  }
  CHECK(clsa::to_float8_e4m3(448.0f).bits == 0x7eu);
  CHECK(clsa::to_float8_e4m3(1.0f).bits == 0x38u);
  CHECK(clsa::to_float8_e4m3(-1.75f).bits == 0xbeu);
  CHECK(clsa::to_float8_e4m3(std::ldexp(1.0f, -9)).bits == 0x01u);
  CHECK(clsa::to_float8_e4m3(-0.0f).bits == 0x80u);
  // Saturation instead of overflow: no infinity exists and NaN is never made from a number.
  CHECK(clsa::to_float8_e4m3(464.0f).bits == 0x7eu);
  CHECK(clsa::to_float8_e4m3(1e30f).bits == 0x7eu);
  CHECK(clsa::to_float8_e4m3(inf).bits == 0x7eu);
  CHECK(clsa::to_float8_e4m3(-inf).bits == 0xfeu);
  CHECK(clsa::to_float8_e4m3(nan).bits == 0x7fu);
  CHECK(clsa::to_float8_e4m3(-nan).bits == 0xffu);
  // Ties to even at both ends of the subnormal range and in the normals.
  CHECK(clsa::to_float8_e4m3(std::ldexp(1.0f, -10)).bits == 0x00u);
  CHECK(clsa::to_float8_e4m3(std::ldexp(3.0f, -10)).bits == 0x02u);
  CHECK(clsa::to_float8_e4m3(1.0625f).bits == 0x38u);  // between 1 and 1.125
  CHECK(clsa::to_float8_e4m3(1.1875f).bits == 0x3au);  // between 1.125 and 1.25
  // Every midpoint between neighbours, a float ulp either side of it, and random values, against
  // the float64 oracle.
  const auto values = e4m3_values();
  for (std::size_t i = 0; i + 1 < values.size(); ++i) {
    const float midpoint = static_cast<float>((values[i].first + values[i + 1].first) / 2);
    for (const float x : {midpoint, std::nextafter(midpoint, 0.0f), std::nextafter(midpoint, inf)}) {
      REQUIRE(clsa::to_float8_e4m3(x).bits == nearest_e4m3(x));
      REQUIRE(clsa::to_float8_e4m3(-x).bits == nearest_e4m3(-x));
    }
  }
  test::Rng rng(test::base_seed());
  for (int i = 0; i < 100000; ++i) {
    const float x = static_cast<float>(rng.normal() * std::pow(2.0, rng.uniform(-12, 10)));
    REQUIRE(clsa::to_float8_e4m3(x).bits == nearest_e4m3(x));
  }
}

TEST_CASE("fp8 row scales: the row's largest value maps to 448, ue8m0 scales are powers of two", "[numeric]") {
  using clsa::ScaleFormat;
  CHECK(clsa::fp8_row_scale(448.0f, ScaleFormat::f32) == 1.0f);
  CHECK(clsa::fp8_row_scale(0.0f, ScaleFormat::f32) == 1e-4f / 448.0f);  // a row of zeros
  CHECK(clsa::fp8_row_scale(896.0f, ScaleFormat::ue8m0) == 2.0f);        // already a power of two
  CHECK(clsa::fp8_row_scale(897.0f, ScaleFormat::ue8m0) == 4.0f);
  test::Rng rng(test::base_seed() + 1);
  for (int row = 0; row < 2000; ++row) {
    const int n = 1 + static_cast<int>(rng.uniform(0, 256));
    const double magnitude = std::pow(10.0, rng.uniform(-3, 3));
    std::vector<clsa::bfloat16> values(static_cast<std::size_t>(n));
    float absmax = 0.0f;
    for (auto& v : values) {
      v = clsa::to_bfloat16(static_cast<float>(rng.normal() * magnitude));
      absmax = std::max(absmax, std::abs(clsa::to_float(v)));
    }
    for (const ScaleFormat format : {ScaleFormat::f32, ScaleFormat::ue8m0}) {
      std::vector<clsa::float8_e4m3> codes(static_cast<std::size_t>(n));
      const float scale = clsa::quantize_row_e4m3(values.data(), n, codes.data(), format);
      REQUIRE(scale == clsa::fp8_row_scale(absmax, format));
      if (format == ScaleFormat::ue8m0) {
        int exponent = 0;
        REQUIRE(std::frexp(scale, &exponent) == 0.5f);
        REQUIRE(scale >= clsa::fp8_row_scale(absmax, ScaleFormat::f32));
        REQUIRE(scale < 2 * clsa::fp8_row_scale(absmax, ScaleFormat::f32));
      }
      for (int i = 0; i < n; ++i) {
        const double x = clsa::to_float(values[static_cast<std::size_t>(i)]);
        const double scaled = static_cast<double>(static_cast<float>(x / scale));  // as quantized, in f32
        REQUIRE(std::abs(scaled) <= 448.0 * (1 + 1e-6));
        REQUIRE(codes[static_cast<std::size_t>(i)].bits == nearest_e4m3(scaled));
        // Within half an e4m3 step of the value (relative 2^-4 for normals, 2^-10 absolute below).
        const double decoded = clsa::to_float(codes[static_cast<std::size_t>(i)]) * static_cast<double>(scale);
        REQUIRE(std::abs(decoded - x) <= std::max(std::abs(x) * 0.0625, std::ldexp(1.0, -10) * scale) * (1 + 1e-6));
      }
      if (format == ScaleFormat::f32 && absmax > 1e-4f) {
        const auto largest = std::max_element(values.begin(), values.end(), [](auto a, auto b) {
          return std::abs(clsa::to_float(a)) < std::abs(clsa::to_float(b));
        });
        REQUIRE(std::abs(clsa::to_float(codes[static_cast<std::size_t>(largest - values.begin())])) == 448.0f);
      }
    }
  }
}
