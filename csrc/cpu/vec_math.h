// Vectorisable transcendental functions for the CPU kernels. std::exp cannot be
// vectorised without -ffast-math (which would also break our -inf handling), so
// the float path uses a branch-free Cephes-style polynomial that GCC/Clang turn
// into SIMD code inside `#pragma omp simd` loops. Max relative error ~2 ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

// Inlined even into large loop bodies: a call left inside a `#pragma omp
// simd` loop makes GCC keep the whole loop scalar.
#if defined(__GNUC__)
#define FUSEDLOSS_VECTOR_INLINE inline __attribute__((always_inline))
#else
#define FUSEDLOSS_VECTOR_INLINE inline
#endif

namespace fusedloss::cpu {

FUSEDLOSS_VECTOR_INLINE float exp_vectorizable(float x) {
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
FUSEDLOSS_VECTOR_INLINE float log_vectorizable(float x) {
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

// log1p(x) for x >= 0 is log(u) + log1p_correction(x, u, 1 / u) with u = 1 + x
// rounded: the first-order correction of that rounding, (x - (u - 1)) / u,
// keeps the digits of x below 1's ulp (below 2^-24, u = 1 and log1p is x),
// where log(u) alone would drop them. The caller passes 1 / u, which a
// sigmoid of the same loop (1 / (1 + exp(-|z|))) shares.
template <typename acc_t>
FUSEDLOSS_VECTOR_INLINE acc_t log1p_correction(acc_t x, acc_t u, acc_t inverse_u) {
  return (x - (u - acc_t(1))) * inverse_u;
}

// One term of a row sum of softplus-type losses, log(u) + rest with u = 1 +
// exp(-|z|) in [1, 2] (rest: the linear part and log1p_correction),, plus two plain sums a kernel may carry alongside (0 if unused).
template <typename acc_t>
struct LogTerm {
  acc_t u, rest, sum1, sum2;
};

template <typename acc_t>
struct LogTermSums {
  acc_t total, sum1, sum2;  // total: sum of log(u) + rest
};

// log(a * b * c * d) for a, b, c, d in [1, 2], as accurate as the four logs
// summed: the log of the rounded product plus the products' rounding errors
// (exact by FMA), relative, to first order. Without that correction the sum
// of many u's just above 1 (e ~ 1e-4) was off by 4e-5 relative, 10x the
// four-log sum's error.
template <typename acc_t>
FUSEDLOSS_VECTOR_INLINE acc_t log_of_product(acc_t a, acc_t b, acc_t c, acc_t d) {
  const acc_t ab = a * b, cd = c * d, p = ab * cd;
  const acc_t ab_error = std::fma(a, b, -ab), cd_error = std::fma(c, d, -cd), p_error = std::fma(ab, cd, -p);
  return log_vectorizable(p) + (p_error + (ab * cd_error + cd * ab_error)) / p;
}

// The sums of term(j) over j in [0, columns); term may write column j's
// outputs. The log is the costliest step of a term, so the four columns j,
// j + q, j + 2q, j + 3q (q = columns / 4) share one (log_of_product). `term`
// is taken by value and should capture by value (loads through references
// keep GCC from vectorising).
template <typename acc_t, typename Term>
LogTermSums<acc_t> sum_log_terms(int64_t columns, const Term term) {
  const int64_t q = columns / 4;
  acc_t total = 0, sum1 = 0, sum2 = 0;
#pragma omp simd reduction(+ : total, sum1, sum2)
  for (int64_t j = 0; j < q; ++j) {
    const LogTerm<acc_t> a = term(j), b = term(j + q), c = term(j + 2 * q), d = term(j + 3 * q);
    total += log_of_product(a.u, b.u, c.u, d.u) + ((a.rest + b.rest) + (c.rest + d.rest));
    sum1 += (a.sum1 + b.sum1) + (c.sum1 + d.sum1);
    sum2 += (a.sum2 + b.sum2) + (c.sum2 + d.sum2);
  }
  for (int64_t j = 4 * q; j < columns; ++j) {
    const LogTerm<acc_t> a = term(j);
    total += log_vectorizable(a.u) + a.rest;
    sum1 += a.sum1;
    sum2 += a.sum2;
  }
  return {total, sum1, sum2};
}

// tanh, branch-free (Cephes tanhf: an odd polynomial below |x| = 0.625,
// 1 - 2 / (exp(2|x|) + 1) above; both computed, one selected; ~2 ulp).
FUSEDLOSS_VECTOR_INLINE float tanh_vectorizable(float x) {
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
FUSEDLOSS_VECTOR_INLINE acc_t softcap_vectorizable(acc_t x, acc_t cap) {
  return cap * tanh_vectorizable(x / cap);
}

}  // namespace fusedloss::cpu
