// IEEE half precision (fp16) as a 16-bit storage type, for the emulator (cuda/emulator/).
//
// The subset a kernel needs to read and write fp16 tensors while computing in float32, as the official Mamba
// kernel does: the type and its two conversions. No arithmetic operators and no implicit conversions, just as
// torch compiles CUDA extensions (-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__), so a kernel that
// builds here builds there. Host-safe: plain inline functions, no device macros.
//
// fp16: 1 sign bit, 5 exponent bits (bias 15), 10 mantissa bits; largest finite 65504, smallest normal 2^-14,
// smallest subnormal 2^-24.
#pragma once

#include <cstdint>
#include <cstring>

// The bits are private, as in CUDA's own __half: __half_as_ushort and __ushort_as_half reach them.
class alignas(2) __half {
 public:
  __half() = default;  // trivial, so that a __shared__ array of them needs no constructor call, as in CUDA

 private:
  explicit constexpr __half(unsigned short bits) : __x(bits) {}
  unsigned short __x;
  friend constexpr unsigned short __half_as_ushort(__half h);
  friend constexpr __half __ushort_as_half(unsigned short bits);
};
typedef __half half;

constexpr unsigned short __half_as_ushort(__half h) { return h.__x; }
constexpr __half __ushort_as_half(unsigned short bits) { return __half(bits); }

// float -> fp16, rounding to nearest, ties to even (cvt.rn.f16.f32). Overflow gives infinity; a NaN gives the
// canonical NaN 0x7fff, as CUDA's conversion does.
inline __half __float2half_rn(float value) {
  uint32_t x;
  std::memcpy(&x, &value, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u, magnitude = x & 0x7fffffffu;
  const auto bits = [](uint32_t b) { return __ushort_as_half(static_cast<unsigned short>(b)); };
  if (magnitude > 0x7f800000u) return bits(0x7fffu);
  if (magnitude >= 0x477ff000u) return bits(sign | 0x7c00u);  // >= 65520, halfway to 2^16: rounds to infinity
  // Keep `kept` bits of the float's 24-bit significand; round the dropped ones to nearest, ties to even.
  const auto rounded = [](uint32_t significand, int dropped) {
    const uint32_t kept = significand >> dropped, rest = significand & ((1u << dropped) - 1u);
    const uint32_t halfway = 1u << (dropped - 1);
    return kept + (rest > halfway || (rest == halfway && (kept & 1u)));
  };
  if (magnitude >= 0x38800000u) {  // normal in fp16: rebias the exponent (127 -> 15); a carry may bump it
    return bits(sign | rounded(magnitude - (112u << 23), 13));
  }
  if (magnitude <= 0x33000000u) return bits(sign);  // at most 2^-25, half the smallest subnormal: rounds to zero
  // Subnormal in fp16: the value is significand · 2^(exponent - 150), in units of 2^-24.
  const int exponent = static_cast<int>(magnitude >> 23);
  return bits(sign | rounded((magnitude & 0x7fffffu) | 0x800000u, 126 - exponent));
}

inline __half __float2half(float value) { return __float2half_rn(value); }

// fp16 -> float, exact.
inline float __half2float(__half h) {
  const uint32_t bits = __half_as_ushort(h), sign = (bits & 0x8000u) << 16;
  const uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  uint32_t x;
  if (exponent == 0x1fu) {
    x = sign | 0x7f800000u | (mantissa << 13);  // infinity, or NaN with its payload
  } else if (exponent != 0) {
    x = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else {
    const float subnormal = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // · 2^-24, exact
    return sign ? -subnormal : subnormal;
  }
  float value;
  std::memcpy(&value, &x, sizeof value);
  return value;
}
