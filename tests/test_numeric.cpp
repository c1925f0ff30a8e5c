// Dtype conversions and the routing order key.
#include <cmath>
#include <limits>

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
