// Scalar helpers shared by the CPU paths, the CUDA kernels and tests: 16-bit float storage types
// with exact conversions, and the order-preserving key that defines routing order.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CLSA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CLSA_HOST_DEVICE inline
#endif

namespace clsa {

CLSA_HOST_DEVICE std::uint32_t float_bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

CLSA_HOST_DEVICE float bits_float(std::uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

/// bfloat16 storage (the upper half of an IEEE binary32).
struct bfloat16 {
  std::uint16_t bits;
};

/// IEEE binary16 storage.
struct float16 {
  std::uint16_t bits;
};

CLSA_HOST_DEVICE float to_float(float x) {
  return x;
}
CLSA_HOST_DEVICE float to_float(bfloat16 x) {
  return bits_float(static_cast<std::uint32_t>(x.bits) << 16);
}

CLSA_HOST_DEVICE float to_float(float16 h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  std::uint32_t exponent = (h.bits >> 10) & 0x1fu;
  std::uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf / nan
  if (exponent == 0) {
    if (mantissa == 0) return bits_float(sign);
    // subnormal: normalise
    exponent = 127 - 15 + 1;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    mantissa &= 0x3ffu;
    return bits_float(sign | (exponent << 23) | (mantissa << 13));
  }
  return bits_float(sign | ((exponent + 127 - 15) << 23) | (mantissa << 13));
}

/// Round to nearest even; NaN stays NaN.
CLSA_HOST_DEVICE bfloat16 to_bfloat16(float x) {
  const std::uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16{static_cast<std::uint16_t>((u >> 16) | 0x40u)};
  const std::uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return bfloat16{static_cast<std::uint16_t>(rounded >> 16)};
}

/// Round to nearest even; overflow to inf; NaN stays NaN.
CLSA_HOST_DEVICE float16 to_float16(float x) {
  const std::uint32_t u = float_bits(x);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return float16{static_cast<std::uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return float16{static_cast<std::uint16_t>(sign | 0x7c00u)};  // >= 65520
  if (abs < 0x38800000u) {                        // below the smallest normal half: subnormal or zero
    if (abs < 0x33000000u) return float16{sign};  // rounds to zero (<= 2^-25)
    const std::uint32_t exponent = abs >> 23;
    const std::uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - exponent;  // 14 + (112 - exponent) ... in [14, 24]
    const std::uint32_t half_mantissa = mantissa >> shift;
    const std::uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1u);
    std::uint32_t result = half_mantissa;
    if (remainder > halfway || (remainder == halfway && (half_mantissa & 1u))) ++result;
    return float16{static_cast<std::uint16_t>(sign | result)};
  }
  const std::uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return float16{static_cast<std::uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

template <class T>
CLSA_HOST_DEVICE T from_float(float x);
template <>
CLSA_HOST_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
CLSA_HOST_DEVICE bfloat16 from_float<bfloat16>(float x) {
  return to_bfloat16(x);
}
template <>
CLSA_HOST_DEVICE float16 from_float<float16>(float x) {
  return to_float16(x);
}

/// Order-preserving map of a score to an unsigned key: a > b (as floats) <=> key(a) > key(b);
/// -0 and +0 share a key; every NaN maps to 0, below -inf.
CLSA_HOST_DEVICE std::uint32_t score_key(float score) {
  if (score != score) return 0u;
  const std::uint32_t u = float_bits(score + 0.0f);  // -0 + 0 == +0
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/// Routing order of a cached token: higher score first, then lower position. Unique per position,
/// so "the top-k" is always one well-defined set.
CLSA_HOST_DEVICE std::uint64_t routing_key(float score, std::int32_t position) {
  return (static_cast<std::uint64_t>(score_key(score)) << 32) |
         static_cast<std::uint64_t>(0xffffffffu - static_cast<std::uint32_t>(position));
}

CLSA_HOST_DEVICE std::int32_t routing_key_position(std::uint64_t key) {
  return static_cast<std::int32_t>(0xffffffffu - static_cast<std::uint32_t>(key & 0xffffffffu));
}

}  // namespace clsa
