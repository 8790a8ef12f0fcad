// Shared numerics of every fused loss, used verbatim by the CPU (C++) and CUDA
// kernels: the online log-sum-exp, the softcap, label-smoothed cross-entropy
// terms. Header-only and free of ATen so that nvcc and the host compiler see
// exactly the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FL_HOST_DEVICE inline
#endif

namespace fusedloss {

FL_HOST_DEVICE float exp_acc(float x) { return expf(x); }
FL_HOST_DEVICE double exp_acc(double x) { return exp(x); }
FL_HOST_DEVICE float log_acc(float x) { return logf(x); }
FL_HOST_DEVICE double log_acc(double x) { return log(x); }
FL_HOST_DEVICE float tanh_acc(float x) { return tanhf(x); }
FL_HOST_DEVICE double tanh_acc(double x) { return tanh(x); }
FL_HOST_DEVICE float log1p_acc(float x) { return log1pf(x); }
FL_HOST_DEVICE double log1p_acc(double x) { return log1p(x); }

template <typename acc_t>
FL_HOST_DEVICE acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

// A finished log-sum-exp kept in two parts, max + log(sum exp(x - max)), which
// is what every backward reads. Probabilities are exp((x - max) - log_sum):
// near the max, x - max is exact and log_sum is small, whereas an absolute lse
// of |x| ~ 1e4 has an fp32 ulp of ~1e-3 that exp(x - lse) would carry into
// every gradient as a relative error.
template <typename acc_t>
struct LseParts {
  acc_t max;
  acc_t log_sum;

  FL_HOST_DEVICE acc_t value() const { return max + log_sum; }
  // log softmax of x.
  FL_HOST_DEVICE acc_t log_prob(acc_t x) const { return (x - max) - log_sum; }
};

// LseParts of many rows (or columns) stored as the two rows of a [2, count]
// tensor; T is acc_t (written by a forward) or const acc_t (read by a backward).
template <typename T>
struct LseArray {
  using acc_t = std::remove_const_t<T>;
  T* max;
  T* log_sum;

  FL_HOST_DEVICE LseParts<acc_t> operator[](int64_t i) const { return {max[i], log_sum[i]}; }
  FL_HOST_DEVICE void store(int64_t i, LseParts<acc_t> v) const {
    max[i] = v.max;
    log_sum[i] = v.log_sum;
  }
  FL_HOST_DEVICE LseArray offset(int64_t i) const { return {max + i, log_sum + i}; }
};

// Running state of a log-sum-exp over a stream of values: the largest value
// seen and the sum of exp(x - max). Merging two states is associative, which
// is what lets a row be reduced across vocabulary chunks, threads and ranks.
template <typename acc_t>
struct LseState {
  acc_t max;
  acc_t sum;

  FL_HOST_DEVICE static LseState empty() { return {neg_infinity<acc_t>(), acc_t(0)}; }

  FL_HOST_DEVICE LseParts<acc_t> parts() const { return {max, log_acc(sum)}; }
  FL_HOST_DEVICE acc_t value() const { return parts().value(); }
};

// Merge two partial log-sum-exps. An empty side (max = -inf) must not produce
// exp(-inf - -inf) = NaN, hence the explicit guards.
template <typename acc_t>
FL_HOST_DEVICE LseState<acc_t> lse_merge(LseState<acc_t> a, LseState<acc_t> b) {
  if (a.max == neg_infinity<acc_t>()) return b;
  if (b.max == neg_infinity<acc_t>()) return a;
  if (a.max >= b.max) return {a.max, a.sum + b.sum * exp_acc(b.max - a.max)};
  return {b.max, b.sum + a.sum * exp_acc(a.max - b.max)};
}

// Merge a chunk's partial log-sum-exp into a row's running state kept as two
// arrays (max, sum): how every row kernel folds one tile into its row.
template <typename acc_t>
FL_HOST_DEVICE void lse_merge_into(acc_t& max, acc_t& sum, LseState<acc_t> part) {
  const LseState<acc_t> merged = lse_merge(LseState<acc_t>{max, sum}, part);
  max = merged.max;
  sum = merged.sum;
}

// Gemma-style logit softcap: y = cap * tanh(x / cap); cap <= 0 disables it.
template <typename acc_t>
FL_HOST_DEVICE acc_t softcap_apply(acc_t x, acc_t cap) {
  return cap > acc_t(0) ? cap * tanh_acc(x / cap) : x;
}

// dy/dx of the softcap written in terms of its output y, so the backward needs
// no second tanh: d/dx cap*tanh(x/cap) = 1 - tanh^2 = 1 - (y/cap)^2.
template <typename acc_t>
FL_HOST_DEVICE acc_t softcap_grad_from_output(acc_t y, acc_t cap) {
  if (cap <= acc_t(0)) return acc_t(1);
  const acc_t t = y / cap;
  return acc_t(1) - t * t;
}

// Options of a softmax cross-entropy row, in the accumulation type.
// With label smoothing eps over C classes the target distribution puts
// (1 - eps) + eps/C on the true class and eps/C on every other class, which is
// PyTorch's F.cross_entropy(label_smoothing=eps). Class weights w (its
// weight=) scale the target's term by w[target] and each class's smoothing
// term by w_j: loss = w_t ((1-eps)(lse - y_t) + z lse^2) + eps/C Σ_j w_j (lse - y_j).
// Without weights, target_weight = 1 and weight_total = C.
template <typename acc_t>
struct CrossEntropyTerms {
  acc_t label_smoothing;  // eps in [0, 1]
  acc_t z_loss;           // coefficient of lse^2 added to each row's loss (scaled by w[target])
  acc_t num_classes;      // C, the number of columns the softmax runs over
  acc_t target_weight = acc_t(1);   // w[target]
  acc_t weight_total = num_classes;  // Σ_j w_j

  // sum_logits is Σ_j w_j y_j (Σ_j y_j without weights). The smoothing term is
  // skipped (not multiplied by 0) when eps = 0: a column masked to -inf makes
  // sum_logits -inf, and 0 * -inf would be NaN. With eps > 0 such a column
  // makes the loss +inf, as in F.cross_entropy.
  FL_HOST_DEVICE acc_t row_loss(acc_t lse, acc_t target_logit, acc_t sum_logits) const {
    acc_t loss = target_weight * ((acc_t(1) - label_smoothing) * (lse - target_logit) + z_loss * lse * lse);
    if (label_smoothing > acc_t(0)) loss += label_smoothing / num_classes * (weight_total * lse - sum_logits);
    return loss;
  }

  // The coefficient of p_j in d loss / d y_j: w_t (1 - eps + 2 z lse) + eps W / C.
  FL_HOST_DEVICE acc_t prob_coefficient(acc_t lse) const {
    return target_weight * (acc_t(1) - label_smoothing + acc_t(2) * z_loss * lse) +
           label_smoothing * weight_total / num_classes;
  }

  // d loss / d y_j for one column of class weight w_j, before the softcap
  // chain rule: prob_coefficient * p_j - (1-eps) w_t [j == target] - eps w_j / C
  FL_HOST_DEVICE acc_t logit_grad(acc_t prob, bool is_target, acc_t lse, acc_t column_weight = acc_t(1)) const {
    acc_t g = prob_coefficient(lse) * prob - label_smoothing * column_weight / num_classes;
    if (is_target) g -= (acc_t(1) - label_smoothing) * target_weight;
    return g;
  }
};

// An LseState plus what a row's softmax statistics need: the running
// Σ exp(x - max)·(x - max), from which the entropy is log(sum) - shifted / sum
// (relative to the max: no cancellation against an absolute lse of ~1e4), and
// the first column holding the max (torch.argmax's rule on ties).
template <typename acc_t>
struct SoftmaxStats {
  acc_t max;
  acc_t sum;
  acc_t shifted;
  int64_t argmax;

  FL_HOST_DEVICE acc_t entropy() const { return log_acc(sum) - shifted / sum; }
};

// Associative merge: the side with the larger max (the lower column on a tie)
// leads, the other's sums are rescaled to its max.
template <typename acc_t>
FL_HOST_DEVICE SoftmaxStats<acc_t> softmax_stats_merge(SoftmaxStats<acc_t> a, SoftmaxStats<acc_t> b) {
  if (a.max == neg_infinity<acc_t>()) return b;
  if (b.max == neg_infinity<acc_t>()) return a;
  const bool a_leads = a.max > b.max || (a.max == b.max && a.argmax < b.argmax);
  const SoftmaxStats<acc_t>& hi = a_leads ? a : b;
  const SoftmaxStats<acc_t>& lo = a_leads ? b : a;
  const acc_t shift = lo.max - hi.max, scale = exp_acc(shift);
  return {hi.max, hi.sum + scale * lo.sum, hi.shifted + scale * (lo.shifted + shift * lo.sum), hi.argmax};
}

// Numerically stable log(sigmoid(x)) = -softplus(-x), used by the NCE terms.
template <typename acc_t>
FL_HOST_DEVICE acc_t log_sigmoid(acc_t x) {
  return x >= acc_t(0) ? -log1p_acc(exp_acc(-x)) : x - log1p_acc(exp_acc(x));
}


}  // namespace fusedloss
