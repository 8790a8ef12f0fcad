// Vectorisable transcendental functions for the CPU kernels. std::exp cannot be
// vectorised without -ffast-math (which would also break our -inf handling), so
// the float path uses a branch-free Cephes-style polynomial that GCC/Clang turn
// into SIMD code inside `#pragma omp simd` loops. Max relative error ~2 ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fusedloss::cpu {

inline float exp_vectorizable(float x) {
  // Clamp so that 2^n stays a normal float; exp(-87) ~ 1.6e-38 is 0 for every
  // sum it enters (each softmax sum contains a term of at least 1).
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;
  // n = round(x / ln2) by adding 1.5 * 2^23: the sum's low mantissa bits hold
  // n (|n| <= 127), so no compare, select or conversion is needed.
  constexpr float kShift = 12582912.0f;
  const float shifted = x * 1.44269504088896341f + kShift;
  const float nf = shifted - kShift;
  int32_t n;
  std::memcpy(&n, &shifted, sizeof(n));
  n -= 0x4B400000;  // the bits of kShift
  // r = x - n*ln2, with ln2 split in two for an exact first product.
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_vectorizable(double x) { return std::exp(x); }

// Natural log of a positive, finite, normal float (Cephes logf: the mantissa
// reduced to [sqrt(1/2), sqrt(2)), a degree-9 polynomial; ~1 ulp), branch-free
// so that it vectorises like exp_vectorizable.
inline float log_vectorizable(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t exponent = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool below = m < 0.707106781186547524f;
  exponent = below ? exponent - 1 : exponent;
  m = below ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float e = static_cast<float>(exponent);
  y += -2.12194440e-4f * e - 0.5f * z;
  return (m + y) + 0.693359375f * e;
}

inline double log_vectorizable(double x) { return std::log(x); }

// log(1 + x) for x >= 0, accurate for tiny x: with u = 1 + x rounded,
// log(u) plus the first-order correction of that rounding, (x - (u - 1)) / u
// (below 2^-24, u = 1 and the result is x), where log(1 + x) alone would keep
// only the digits of x above 1's ulp. The division is 1 / (1 + x), which a
// sigmoid of the same loop (1 / (1 + exp(-|z|))) shares once inlined.
inline float log1p_vectorizable(float x) {
  const float u = 1.0f + x;
  return log_vectorizable(u) + (x - (u - 1.0f)) * (1.0f / u);
}

inline double log1p_vectorizable(double x) { return std::log1p(x); }

// tanh, branch-free (Cephes tanhf: an odd polynomial below |x| = 0.625,
// 1 - 2 / (exp(2|x|) + 1) above; both computed, one selected; ~2 ulp).
inline float tanh_vectorizable(float x) {
  const float a = x < 0.0f ? -x : x;
  const float s = x * x;
  float p = -5.70498872745e-3f;
  p = p * s + 2.06390887954e-2f;
  p = p * s - 5.37397155531e-2f;
  p = p * s + 1.33314422036e-1f;
  p = p * s - 3.33332819422e-1f;
  const float small = p * s * x + x;
  const float large = 1.0f - 2.0f / (exp_vectorizable(a + a) + 1.0f);  // exp clamps: 1 for |x| > 44
  const float signed_large = x < 0.0f ? -large : large;
  return a < 0.625f ? small : signed_large;
}

inline double tanh_vectorizable(double x) { return std::tanh(x); }

// softcap_apply (numerics.h) with cap > 0, vectorisable.
template <typename acc_t>
acc_t softcap_vectorizable(acc_t x, acc_t cap) {
  return cap * tanh_vectorizable(x / cap);
}

}  // namespace fusedloss::cpu
