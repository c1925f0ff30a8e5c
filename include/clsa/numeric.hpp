// Scalar helpers shared by the CPU paths, the CUDA kernels and tests: 16-bit and 8-bit float
// storage types with exact conversions, the fp8 per-row scales, and the order-preserving key that
// defines routing order.
#pragma once

#include <cstdint>
#include <cstring>

#include "clsa/host_device.hpp"

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

/// OCP FP8 E4M3 storage ("e4m3fn", CUDA's __nv_fp8_e4m3, torch.float8_e4m3fn): 1 sign, 4 exponent
/// (bias 7) and 3 mantissa bits; no infinities; S.1111.111 is NaN; the largest finite value is 448,
/// the smallest subnormal 2^-9.
struct float8_e4m3 {
  std::uint8_t bits;
};

/// The largest finite e4m3 value.
constexpr float kFloat8E4m3Max = 448.0f;

/// Exact (every e4m3 value is a float).
CLSA_HOST_DEVICE float to_float(float8_e4m3 x) {
  const std::uint32_t sign = static_cast<std::uint32_t>(x.bits & 0x80u) << 24;
  const std::uint32_t exponent = (x.bits >> 3) & 0xfu;
  const std::uint32_t mantissa = x.bits & 0x7u;
  if (exponent == 0xfu && mantissa == 0x7u) return bits_float(sign | 0x7fc00000u);
  if (exponent == 0) return bits_float(sign | float_bits(static_cast<float>(mantissa) * (1.0f / 512.0f)));
  return bits_float(sign | ((exponent + 127u - 7u) << 23) | (mantissa << 20));
}

/// Round to nearest even, saturating: finite values beyond +-448 and +-inf give +-448 (CUDA's
/// __NV_SATFINITE conversion); NaN gives NaN (S.1111.111, the input's sign).
CLSA_HOST_DEVICE float8_e4m3 to_float8_e4m3(float x) {
  const std::uint32_t u = float_bits(x);
  const std::uint8_t sign = static_cast<std::uint8_t>((u >> 24) & 0x80u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return float8_e4m3{static_cast<std::uint8_t>(sign | 0x7fu)};
  if (abs >= 0x43e00000u) return float8_e4m3{static_cast<std::uint8_t>(sign | 0x7eu)};  // >= 448 (and inf)
  std::uint32_t code;
  std::uint32_t remainder;
  std::uint32_t halfway;
  if (abs >= 0x3c800000u) {  // >= 2^-6, the smallest normal e4m3: keep 3 of the 23 mantissa bits
    code = ((abs >> 23) - 127u + 7u) << 3 | ((abs >> 20) & 0x7u);
    remainder = abs & 0xfffffu;
    halfway = 0x80000u;
  } else {  // subnormal e4m3: multiples of 2^-9
    const std::uint32_t exponent = abs >> 23;
    if (exponent < 127u - 10u) return float8_e4m3{sign};  // below 2^-10, half the smallest subnormal
    const std::uint32_t significand = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 127u - 9u + 23u - exponent;  // 21 .. 24
    code = significand >> shift;
    remainder = significand & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1u);
  }
  // A carry out of the mantissa moves to the next binade (or from subnormal to normal) correctly.
  if (remainder > halfway || (remainder == halfway && (code & 1u))) ++code;
  return float8_e4m3{static_cast<std::uint8_t>(sign | code)};
}

/// How an fp8 row's scale is stored: any f32, or a power of two (DeepGEMM's "ue8m0" scales, exact
/// in an 8-bit exponent).
enum class ScaleFormat { f32, ue8m0 };

/// The scale of an fp8 row whose largest magnitude is `absmax`: max(absmax, 1e-4) / 448 (so the
/// row's largest value maps to 448; a row of zeros keeps a usable scale), or with ue8m0 the
/// smallest power of two not below it. The vLLM / DeepGEMM indexer-cache convention.
CLSA_HOST_DEVICE float fp8_row_scale(float absmax, ScaleFormat format) {
  const float scale = (absmax > 1e-4f ? absmax : 1e-4f) / kFloat8E4m3Max;
  if (format == ScaleFormat::f32) return scale;
  const std::uint32_t u = float_bits(scale);
  const std::uint32_t power = u & 0x7f800000u;  // scale is a positive normal float
  return bits_float((u & 0x7fffffu) != 0 ? power + 0x800000u : power);
}

/// Quantizes values[0..n) to e4m3 with one scale for the row (fp8_row_scale of their largest
/// magnitude), out[i] = to_float8_e4m3(values[i] / scale); returns the scale. Values must be
/// finite: callers check (a NaN would be stored as NaN and an infinity would set the scale).
template <class T>
CLSA_HOST_DEVICE float quantize_row_e4m3(const T* values, int n, float8_e4m3* out, ScaleFormat format) {
  float absmax = 0.0f;
  for (int i = 0; i < n; ++i) {
    const float magnitude = to_float(values[i]) < 0.0f ? -to_float(values[i]) : to_float(values[i]);
    absmax = magnitude > absmax ? magnitude : absmax;
  }
  const float scale = fp8_row_scale(absmax, format);
  for (int i = 0; i < n; ++i) out[i] = to_float8_e4m3(to_float(values[i]) / scale);
  return scale;
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
template <>
CLSA_HOST_DEVICE float8_e4m3 from_float<float8_e4m3>(float x) {
  return to_float8_e4m3(x);
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
