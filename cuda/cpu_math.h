// e^x and log(1 + x) for float32 in plain arithmetic, so that loops of them vectorize: the CPU twin's hot loops.
//
// libm's expf and log1pf are function calls: the compiler cannot vectorize a loop that calls it (not without
// -ffast-math, which would also license it to reorder every sum and drop NaN and infinity handling; we do not
// use it). Measured on the 2-core development machine, a scalar expf costs ~7 ns and a log1pf ~16 ns; a (batch 2,
// dim 512, N 16, L 2048) scan needs 33.5 million exps, and every step's softplus and silu gate need more.
// exp_float is the classic Cody–Waite + polynomial exp (Cephes' expf), written with IEEE operations only:
//     x = k·ln2 + r,  k = round(x / ln2),  |r| <= ln2/2      (ln2 split in two so k·ln2_hi is exact)
//     e^r ≈ 1 + r + r²·P(r),  P of degree 5                  (relative error ~1e-7)
//     e^x = 2^k · e^r,  2^k built from its exponent bits, in two halves so that subnormal results
//     (x down to -104) round correctly and x >= 88.73 overflows to inf, as expf does.
// log1p_float is Cephes' logf polynomial behind an exact range reduction (further down).
// tests/test_fused_scan.py measures both against float64 over their whole ranges.
#pragma once

#include <cmath>
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

// log(1 + y) for y >= -1 (what softplus needs: y = e^-|s| in [0, 1]). With u = 1 + y rounded to float,
//     u = 2^e · m,  m in [√½, √2)        (from u's exponent bits: exact)
//     log m = f - f²/2 + f³·P(f),  f = m - 1 (exact, Sterbenz),  P of degree 8 (Cephes' logf, ~1e-7)
//     log(1 + y) = e·ln2 + log m + (y - (u - 1)) / u   (the last term undoes the rounding of 1 + y: it is what
//                                                       keeps tiny y accurate, where log u alone would be 0)
// y = -1 gives -inf, y = inf gives inf, y < -1 or NaN gives NaN, as log1pf does.
inline float log1p_float(float y) {
  const float u = 1.0f + y;
  int32_t bits;
  std::memcpy(&bits, &u, sizeof bits);
  int32_t e = ((bits >> 23) & 0xff) - 127;
  const int32_t m_bits = (bits & 0x007fffff) | 0x3f800000;  // u's mantissa with exponent 0: m in [1, 2)
  float m;
  std::memcpy(&m, &m_bits, sizeof m);
  const bool halve = m > 1.41421356f;
  m = halve ? 0.5f * m : m;
  e = halve ? e + 1 : e;
  const float f = m - 1.0f, f2 = f * f, fe = static_cast<float>(e);
  float poly = 7.0376836292e-2f;
  poly = poly * f - 1.1514610310e-1f;
  poly = poly * f + 1.1676998740e-1f;
  poly = poly * f - 1.2420140846e-1f;
  poly = poly * f + 1.4249322787e-1f;
  poly = poly * f - 1.6668057665e-1f;
  poly = poly * f + 2.0000714765e-1f;
  poly = poly * f - 2.4999993993e-1f;
  poly = poly * f + 3.3333331174e-1f;
  const float correction = (y - (u - 1.0f)) / u;
  const float log_u = ((f2 * f * poly + fe * -2.12194440e-4f + correction) - 0.5f * f2 + f) + fe * 0.693359375f;
  const float special = y == -1.0f ? -INFINITY : (y > -1.0f ? y : NAN);  // y = -1, inf, below -1 or NaN
  return (y > -1.0f && y < INFINITY) ? log_u : special;
}

}  // namespace minijamba

// A function marked MJ_VECTORIZE is compiled twice, for x86-64-v3 (AVX2 with FMA: 8 floats per instruction, and a
// multiply-add in one rounding) and for any x86-64 (SSE2), and the copy the CPU has is chosen at load time; `flatten`
// inlines everything it calls into each copy, so its inner loops vectorize at that width. Unlike -march=native, the
// binary stays portable. The two copies round differently (the FMA copy rounds a·b + c once, the other twice): on
// one machine a run repeats bit for bit, across machines the twin agrees to float32 rounding, as the tests ask.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MJ_VECTORIZE __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define MJ_VECTORIZE
#endif
