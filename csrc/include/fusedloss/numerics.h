// Shared numerics of every fused loss, used verbatim by the CPU (C++) and CUDA
// kernels: the online log-sum-exp, the softcap, label-smoothed cross-entropy
// terms. Header-only and free of ATen so that nvcc and the host compiler see
// exactly the same arithmetic.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

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

// Running state of a log-sum-exp over a stream of values: the largest value
// seen and the sum of exp(x - max). Merging two states is associative, which
// is what lets a row be reduced across vocabulary chunks, threads and ranks.
template <typename acc_t>
struct LseState {
  acc_t max;
  acc_t sum;

  FL_HOST_DEVICE static LseState empty() { return {neg_infinity<acc_t>(), acc_t(0)}; }

  FL_HOST_DEVICE acc_t value() const { return max + log_acc(sum); }
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
// PyTorch's F.cross_entropy(label_smoothing=eps).
template <typename acc_t>
struct CrossEntropyTerms {
  acc_t label_smoothing;  // eps in [0, 1]
  acc_t z_loss;           // coefficient of lse^2 added to each row's loss
  acc_t num_classes;      // C, the number of columns the softmax runs over

  // loss = lse - (1-eps) * y_target - eps * mean_j(y_j) + z * lse^2
  FL_HOST_DEVICE acc_t row_loss(acc_t lse, acc_t target_logit, acc_t sum_logits) const {
    return lse - (acc_t(1) - label_smoothing) * target_logit -
           label_smoothing * sum_logits / num_classes + z_loss * lse * lse;
  }

  // d loss / d y_j for one column, before the softcap chain rule:
  // (1 + 2 z lse) * p_j - (1-eps) * [j == target] - eps / C
  FL_HOST_DEVICE acc_t logit_grad(acc_t prob, bool is_target, acc_t lse) const {
    acc_t g = (acc_t(1) + acc_t(2) * z_loss * lse) * prob - label_smoothing / num_classes;
    if (is_target) g -= acc_t(1) - label_smoothing;
    return g;
  }
};

// Numerically stable log(sigmoid(x)) = -softplus(-x), used by the NCE terms.
template <typename acc_t>
FL_HOST_DEVICE acc_t log_sigmoid(acc_t x) {
  return x >= acc_t(0) ? -log1p_acc(exp_acc(-x)) : x - log1p_acc(exp_acc(x));
}

template <typename acc_t>
FL_HOST_DEVICE acc_t sigmoid(acc_t x) {
  if (x >= acc_t(0)) return acc_t(1) / (acc_t(1) + exp_acc(-x));
  const acc_t e = exp_acc(x);
  return e / (acc_t(1) + e);
}

}  // namespace fusedloss
