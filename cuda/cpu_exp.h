// e^x for float32 in plain arithmetic, so that a loop of them vectorizes: the CPU twin's hot loop.
//
// libm's expf is a function call: the compiler cannot vectorize a loop that calls it (not without
// -ffast-math, which would also license it to reorder every sum and drop NaN and infinity handling; we do not
// use it). Measured on the 2-core development machine, a scalar expf costs ~7 ns, and a (batch 2, dim 512,
// N 16, L 2048) scan needs 33.5 million of them. This is the classic Cody–Waite + polynomial exp (Cephes'
// expf), written with IEEE operations only:
//     x = k·ln2 + r,  k = round(x / ln2),  |r| <= ln2/2      (ln2 split in two so k·ln2_hi is exact)
//     e^r ≈ 1 + r + r²·P(r),  P of degree 5                  (relative error ~1e-7)
//     e^x = 2^k · e^r,  2^k built from its exponent bits, in two halves so that subnormal results
//     (x down to -104) round correctly and x >= 88.73 overflows to inf, as expf does.
// tests/test_fused_scan.py measures it against float64 exp over the whole float range: at most 2 ulp.
#pragma once

#include <cstdint>
#include <cstring>

namespace minijamba {

inline float exp_float(float x) {
  const bool is_nan = x != x;
  x = x < -104.0f ? -104.0f : (x > 89.0f ? 89.0f : x);  // beyond: 0 and inf after rounding, as expf gives
  constexpr float kRound = 12582912.0f;                  // 1.5·2^23: adding it rounds to an integer
  const float shifted = x * 1.44269504088896341f + kRound;
  const float k = shifted - kRound;
  int32_t k_bits, round_bits;
  std::memcpy(&k_bits, &shifted, sizeof k_bits);
  std::memcpy(&round_bits, &kRound, sizeof round_bits);
  const int32_t ki = k_bits - round_bits;                 // k as an integer, in [-150, 129]
  const float r = (x - k * 0.693359375f) - k * -2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float e_r = poly * r * r + r + 1.0f;
  const int32_t k1 = ki / 2, k2 = ki - k1;                // both within a normal float's exponent range
  const int32_t bits1 = (k1 + 127) << 23, bits2 = (k2 + 127) << 23;
  float scale1, scale2;
  std::memcpy(&scale1, &bits1, sizeof scale1);
  std::memcpy(&scale2, &bits2, sizeof scale2);
  const float result = e_r * scale1 * scale2;
  return is_nan ? x : result;
}

}  // namespace minijamba

// A copy of the loop compiled for AVX2 (8 floats per instruction), chosen at load time on CPUs that have it;
// the default copy runs anywhere (SSE2). Unlike -march=native, the binary stays portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MJ_VECTORIZE __attribute__((target_clones("avx2", "default")))
#else
#define MJ_VECTORIZE
#endif
