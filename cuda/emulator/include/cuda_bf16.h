// bfloat16 as a 16-bit storage type, for the emulator (cuda/emulator/).
//
// bf16 is the top half of a float32: 1 sign bit, 8 exponent bits, 7 mantissa bits: float32's range with 2-3
// significant digits. The subset a kernel needs to read and write bf16 tensors while computing in float32: the
// type and its two conversions, no operators and no implicit conversions (torch compiles CUDA extensions with
// -D__CUDA_NO_BFLOAT16_CONVERSIONS__). Host-safe: plain inline functions, no device macros.
#pragma once

#include <cstdint>
#include <cstring>

// The bits are private, as in CUDA's own type: __bfloat16_as_ushort and __ushort_as_bfloat16 reach them.
class alignas(2) __nv_bfloat16 {
 public:
  __nv_bfloat16() = default;  // trivial, so that a __shared__ array of them needs no constructor call

 private:
  explicit constexpr __nv_bfloat16(unsigned short bits) : __x(bits) {}
  unsigned short __x;
  friend constexpr unsigned short __bfloat16_as_ushort(__nv_bfloat16 b);
  friend constexpr __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits);
};
typedef __nv_bfloat16 nv_bfloat16;

constexpr unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
constexpr __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return __nv_bfloat16(bits); }

// float -> bf16, rounding to nearest, ties to even: add just under half of the dropped part (plus one if the kept
// part is odd) and truncate; a carry moves into the exponent, up to infinity. A NaN gives the canonical 0x7fff.
inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  uint32_t x;
  std::memcpy(&x, &value, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __ushort_as_bfloat16(0x7fffu);
  const uint32_t odd = (x >> 16) & 1u;
  return __ushort_as_bfloat16(static_cast<unsigned short>((x + 0x7fffu + odd) >> 16));
}

inline __nv_bfloat16 __float2bfloat16(float value) { return __float2bfloat16_rn(value); }

// bf16 -> float, exact.
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t x = static_cast<uint32_t>(__bfloat16_as_ushort(b)) << 16;
  float value;
  std::memcpy(&value, &x, sizeof value);
  return value;
}
