// Unit tests of the header-only numerics shared by the CPU and CUDA kernels.
// Built by CMakeLists.txt (ctest) and by tests/test_cpp_numerics.py.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu/vec_math.h"
#include "fusedloss/contrastive.h"
#include "fusedloss/linear_ce.h"
#include "fusedloss/numerics.h"
#include "fusedloss/sampled.h"

using namespace fusedloss;

static int failures = 0;
#define EXPECT_TRUE(cond)                                              \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::printf("%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)
#define EXPECT_NEAR(a, b, tol)                                                                   \
  do {                                                                                           \
    const double _a = (a), _b = (b);                                                             \
    if (!(std::fabs(_a - _b) <= (tol) * (1.0 + std::fabs(_b)))) {                                \
      std::printf("%s:%d: %s = %.17g, expected %.17g\n", __FILE__, __LINE__, #a, _a, _b);      \
      ++failures;                                                                                \
    }                                                                                            \
  } while (0)

static double direct_lse(const std::vector<double>& xs) {
  double m = -INFINITY, s = 0;
  for (double x : xs) m = std::fmax(m, x);
  for (double x : xs) s += std::exp(x - m);
  return m + std::log(s);
}

int main() {
  // Merging partial states in any grouping equals the direct log-sum-exp, even at +-1e4.
  const std::vector<double> xs = {1e4, -1e4, 3.0, 9999.5, -2.0, 0.0, 1e4};
  LseState<double> left = LseState<double>::empty(), right = LseState<double>::empty();
  for (size_t i = 0; i < xs.size(); ++i) {
    auto& side = i % 2 ? right : left;
    side = lse_merge(side, LseState<double>{xs[i], 1.0});
  }
  EXPECT_NEAR(lse_merge(left, right).value(), direct_lse(xs), 1e-15);
  EXPECT_NEAR(lse_merge(right, left).value(), direct_lse(xs), 1e-15);
  // The empty state is the identity and never produces NaN.
  const auto empty = LseState<float>::empty();
  const auto one = LseState<float>{2.0f, 1.0f};
  EXPECT_NEAR(lse_merge(empty, one).value(), 2.0, 0);
  EXPECT_NEAR(lse_merge(one, empty).value(), 2.0, 0);
  if (!std::isinf(lse_merge(empty, empty).max)) ++failures;

  // Softcap and its derivative (checked against a central difference).
  const double cap = 3.0;
  for (double x : {-50.0, -2.0, 0.0, 0.7, 5.0}) {
    const double y = softcap_apply(x, cap);
    EXPECT_NEAR(y, cap * std::tanh(x / cap), 1e-15);
    const double h = 1e-6;
    const double numeric = (softcap_apply(x + h, cap) - softcap_apply(x - h, cap)) / (2 * h);
    EXPECT_NEAR(softcap_grad_from_output(y, cap), numeric, 1e-8);
  }
  EXPECT_NEAR(softcap_apply(7.0, 0.0), 7.0, 0);

  // Label-smoothed CE row loss equals the explicit -sum_j q_j log p_j.
  const std::vector<double> logits = {0.5, -1.0, 2.0, 0.0};
  const double lse = direct_lse(logits), eps = 0.2, classes = 4;
  const CrossEntropyTerms<double> terms{eps, 0.0, classes};
  double explicit_loss = 0, sum = 0;
  for (size_t j = 0; j < logits.size(); ++j) {
    const double q = (j == 2 ? 1 - eps : 0) + eps / classes;
    explicit_loss -= q * (logits[j] - lse);
    sum += logits[j];
  }
  EXPECT_NEAR(terms.row_loss(lse, logits[2], sum), explicit_loss, 1e-14);

  // With class weights w (F.cross_entropy(weight=w)): the row loss is
  // -sum_j q_j log p_j with q_j = (1 - eps) w_t [j == t] + eps w_j / C, and
  // logit_grad is its derivative (central differences).
  {
    const std::vector<double> w = {0.5, 2.0, 1.5, 0.25};
    double weighted_sum = 0, total = 0, weighted_loss = 0;
    for (size_t j = 0; j < logits.size(); ++j) {
      weighted_sum += w[j] * logits[j];
      total += w[j];
      weighted_loss -= ((j == 2 ? (1 - eps) * w[2] : 0) + eps * w[j] / classes) * (logits[j] - lse);
    }
    const double z = 0.01;
    const CrossEntropyTerms<double> weighted{eps, z, classes, w[2], total};
    EXPECT_NEAR(weighted.row_loss(lse, logits[2], weighted_sum), weighted_loss + z * w[2] * lse * lse, 1e-14);
    const auto loss_at = [&](std::vector<double> y) {
      double s = 0;
      for (size_t j = 0; j < y.size(); ++j) s += w[j] * y[j];
      return weighted.row_loss(direct_lse(y), y[2], s);
    };
    for (size_t k = 0; k < logits.size(); ++k) {
      std::vector<double> up = logits, down = logits;
      up[k] += 1e-6;
      down[k] -= 1e-6;
      const double numeric = (loss_at(up) - loss_at(down)) / 2e-6;
      EXPECT_NEAR(weighted.logit_grad(std::exp(logits[k] - lse), k == 2, lse, w[k]), numeric, 1e-7);
    }
    // Without weights the defaults are w_t = 1 and Σ w = C.
    EXPECT_NEAR(terms.target_weight, 1.0, 0);
    EXPECT_NEAR(terms.weight_total, classes, 0);
  }

  // SoftmaxStats merged over any split equal the direct entropy and the first
  // argmax; the merge is the same in either order.
  {
    const std::vector<double> y = {0.5, 2.0, -1.0, 2.0, 1.75, -3.0};  // a tie at 1 and 3
    const double lse_y = direct_lse(y);
    double entropy = 0;
    for (double v : y) entropy -= std::exp(v - lse_y) * (v - lse_y);
    for (size_t split = 0; split <= y.size(); ++split) {
      SoftmaxStats<double> left{neg_infinity<double>(), 0, 0, 0}, right = left;
      for (size_t j = 0; j < y.size(); ++j) {
        SoftmaxStats<double>& side = j < split ? left : right;
        side = softmax_stats_merge(side, SoftmaxStats<double>{y[j], 1.0, 0.0, int64_t(j)});
      }
      for (const SoftmaxStats<double>& merged : {softmax_stats_merge(left, right), softmax_stats_merge(right, left)}) {
        EXPECT_NEAR(merged.entropy(), entropy, 1e-14);
        EXPECT_NEAR(merged.max + std::log(merged.sum), lse_y, 1e-14);
        EXPECT_TRUE(merged.argmax == 1);
      }
    }
  }

  // The vectorisable exp stays within a few ulp of std::exp over its range.
  for (float x = -87.0f; x <= 88.0f; x += 0.37f) {
    EXPECT_NEAR(cpu::exp_vectorizable(x), std::exp(x), 4e-7);
  }
  // The vectorisable tanh (the CPU softcap) stays within a few ulp of
  // std::tanh, relative, on both sides of its polynomial/exp split at 0.625
  // and out to where it saturates; odd, and exactly 0 at 0.
  for (float x = -30.0f; x <= 30.0f; x += 0.0137f) {
    const double exact = std::tanh(double(x));
    EXPECT_NEAR(cpu::tanh_vectorizable(x), exact, 4e-7 * std::fabs(exact) + 1e-30);
    EXPECT_NEAR(cpu::tanh_vectorizable(-x), -cpu::tanh_vectorizable(x), 0);
  }
  for (float x : {1e-30f, 1e-6f, 0.6249f, 0.6251f, 9.0f, 100.0f}) {
    EXPECT_NEAR(cpu::tanh_vectorizable(x), std::tanh(double(x)), 4e-7 * std::tanh(double(x)));
  }
  EXPECT_NEAR(cpu::tanh_vectorizable(0.0f), 0.0, 0);
  // sum_log_terms (four log1p(exp(-|z|)) terms share one log) matches the
  // exact sum to 4e-6 relative, also where every u = 1 + e sits just above 1
  // (z ~ -9: e ~ 1e-4), which needs log_of_product's rounding correction
  // (4e-5 without it); 4097 columns leave a tail of one.
  {
    std::mt19937 rng(0);
    for (double center : {-30.0, -12.0, -9.0, -5.0, 0.0, 3.0}) {
      std::normal_distribution<float> normal(float(center), 1.0f);
      std::vector<float> z(4097);
      for (int trial = 0; trial < 20; ++trial) {
        double exact = 0;
        for (float& v : z) {
          v = normal(rng);
          exact += std::log1p(std::exp(-std::fabs(double(v))));
        }
        const auto sums = cpu::sum_log_terms<float>(int64_t(z.size()), [&](int64_t j) {
          const float e = cpu::exp_vectorizable(-std::fabs(z[j]));
          const float u = 1.0f + e;
          return cpu::LogTerm<float>{u, cpu::log1p_correction(e, u, 1.0f / u), 1.0f, z[j]};
        });
        EXPECT_TRUE(std::fabs(sums.total - exact) <= 4e-6 * exact);
        EXPECT_NEAR(sums.sum1, double(z.size()), 0);
      }
    }
  }
  EXPECT_NEAR(log_sigmoid(-800.0), -800.0, 1e-15);
  EXPECT_NEAR(log_sigmoid(800.0), 0.0, 1e-15);

  // Probabilities from LseParts stay accurate at |logit| ~ 1e4 in fp32, where
  // exp(x - lse) with an absolute fp32 lse is off by ~1e-3 relative.
  {
    const std::vector<double> big = {1e4 + 0.25, 1e4 - 1.5, 1e4 + 0.75, 1e4};
    LseState<float> state = LseState<float>::empty();
    for (double x : big) state = lse_merge(state, LseState<float>{float(x), 1.0f});
    const double exact_lse = direct_lse(big);
    for (double x : big) {
      EXPECT_NEAR(std::exp(state.parts().log_prob(float(x))), std::exp(x - exact_lse), 1e-6);
    }
  }

  // A -inf column without label smoothing leaves the row loss finite (no 0 * -inf).
  {
    const CrossEntropyTerms<float> plain{0.0f, 0.0f, 3.0f};
    EXPECT_TRUE(std::isfinite(plain.row_loss(1.0f, 0.5f, -INFINITY)));
    const CrossEntropyTerms<float> smoothed{0.1f, 0.0f, 3.0f};
    EXPECT_TRUE(std::isinf(smoothed.row_loss(1.0f, 0.5f, -INFINITY)));
  }

  // A target or id outside the classes (possible only where the range check
  // is skipped: CUDA under torch.compile / graph capture) poisons its row.
  {
    LinearCEParams p{3, 5, 0, 5, 5, 5, -100, 0.0, 0.0, 0.0, false, false};
    float max[3] = {1, 1, 1}, sum_exp[3] = {2, 2, 2}, sum_logits[3] = {0, 0, 0}, target_logit[3] = {0.5f, 0.5f, 0.5f};
    float lse_max[3], lse_log_sum[3], loss[3];
    const int64_t target[3] = {2, 7, -100};
    for (int64_t row = 0; row < 3; ++row) {
      linear_ce_finalize_row(p, row, target, ClassWeights<float>{nullptr, nullptr},
                             LinearCERowState<float>{max, sum_exp, sum_logits, target_logit, nullptr, nullptr},
                             LseArray<float>{lse_max, lse_log_sum}, loss);
    }
    EXPECT_NEAR(loss[0], 1 + std::log(2.0) - 0.5, 1e-6);
    EXPECT_TRUE(std::isnan(loss[1]));
    EXPECT_TRUE(loss[2] == 0.0f);

    SampledParams sp{1, 4, 1, 2, 0, false, 0.0, 1.0, false, 2, 2};
    const int64_t ids[2] = {3, 4};
    const float bias[4] = {0, 0, 0, 1};
    const SampledColumns<float> cols{ids, 0, nullptr, 0, nullptr, bias, ids};
    EXPECT_NEAR(sampled_column_logit(sp, cols, 0, 0, 2.0f), 3.0, 0);
    EXPECT_TRUE(std::isnan(sampled_column_logit(sp, cols, 0, 1, 2.0f)));

    EXPECT_TRUE(std::isnan(contrastive_positive_logit(1.0f, 2.0f, true)));
    EXPECT_NEAR(contrastive_positive_logit(1.0f, 2.0f, false), 2.0, 0);
  }

  if (failures) std::printf("%d failure(s)\n", failures);
  else std::printf("all numerics tests passed\n");
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
