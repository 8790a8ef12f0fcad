// Fused linear + softmax cross-entropy: the parameters and the per-chunk
// kernels shared by the CPU and CUDA backends.
//
// Design (see csrc/README.md): the vocabulary is processed in chunks of
// `chunk_size` columns. For each chunk the driver (csrc/linear_ce.cpp) forms the
// [N, chunk] logits with one GEMM into a bounded workspace; the kernels declared
// here turn that tile into per-row log-sum-exp state (forward) or into dlogits
// (backward) without ever holding more than one chunk.
#pragma once

#include <cstdint>
#include <limits>

#include "fusedloss/numerics.h"

namespace fusedloss {

// Scalars and sizes of one linear cross-entropy call, plus the chunk being
// processed. Everything a kernel needs except the typed pointers.
struct LinearCEParams {
  int64_t num_rows;        // N: rows of input / targets
  int64_t num_classes;     // V: the softmax's whole vocabulary (all shards when vocabulary-parallel)
  int64_t chunk_start;     // vocabulary index of the current chunk's first column (the shard's
                           // vocab_start included), compared against targets
  int64_t chunk_columns;   // columns in the current chunk (<= chunk_size)
  int64_t logits_stride;   // elements between consecutive rows of the chunk tile
  int64_t dlogits_stride;  // elements between consecutive rows of dlogits (2 * logits_stride when
                           // half-precision dlogits are written over the fp32 tile, chunk_driver.h)
  int64_t ignore_index;    // targets equal to this contribute nothing
  double label_smoothing;  // eps
  double z_loss;           // coefficient of lse^2
  double softcap;          // cap of cap*tanh(x/cap); 0 = off
  // The forward kernel leaves softcap(logit + bias) in the tile (the CPU kernel
  // always does, it needs two passes anyway), and the gradient kernel then
  // reads the tile as already transformed. Used when one tile serves both.
  bool tile_transformed;
  // Also track each row's argmax and entropy term (LinearCERowState's
  // `shifted` / `argmax`); off, the kernels take the plain LSE loops.
  bool with_stats;
};

// Class weights of F.cross_entropy(weight=w): w[num_classes] indexed by
// vocabulary column (the full vocabulary also when vocabulary-parallel) and
// Σ_j w_j as a device scalar (summed on the device: no host sync).
// weight == nullptr: no class weights.
template <typename acc_t>
struct ClassWeights {
  const acc_t* weight;
  const acc_t* total;

  // The weights of the chunk's columns, or nullptr without weights.
  FL_HOST_DEVICE const acc_t* columns(int64_t chunk_start) const { return weight ? weight + chunk_start : nullptr; }
};

// Per-row running statistics of the forward pass, one array each of length N.
template <typename acc_t>
struct LinearCERowState {
  acc_t* max;           // running max of the (softcapped) logits
  acc_t* sum_exp;       // running sum of exp(y - max)
  acc_t* sum_logits;    // running sum of y (label smoothing needs mean_j y_j)
  acc_t* target_logit;  // y at the target column, once its chunk is seen
  // Only when p.with_stats (else nullptr):
  acc_t* shifted;       // running Σ exp(y - max)·(y - max) (SoftmaxStats, numerics.h)
  int64_t* argmax;      // first column holding the running max

  FL_HOST_DEVICE SoftmaxStats<acc_t> stats(int64_t row) const {
    return {max[row], sum_exp[row], shifted[row], argmax[row]};
  }
  FL_HOST_DEVICE void store_stats(int64_t row, SoftmaxStats<acc_t> s) const {
    max[row] = s.max;
    sum_exp[row] = s.sum;
    shifted[row] = s.shifted;
    argmax[row] = s.argmax;
  }
};

// Targets are range-checked before the op, except on CUDA under torch.compile
// or graph capture (the check would be a host sync): there a target outside
// [0, num_classes) that is not ignore_index poisons its row's loss and
// gradient with NaN instead of silently losing its one-hot term.
FL_HOST_DEVICE bool linear_ce_target_valid(const LinearCEParams& p, int64_t t) {
  return t >= 0 && t < p.num_classes;
}

// The cross-entropy terms of a row with target t: its class weight (1 without
// weights, or for an ignored / invalid target, whose loss is 0 / NaN anyway).
template <typename acc_t>
FL_HOST_DEVICE CrossEntropyTerms<acc_t> linear_ce_terms(const LinearCEParams& p, ClassWeights<acc_t> w, int64_t t) {
  const acc_t classes = acc_t(p.num_classes);
  const acc_t target_weight = w.weight && linear_ce_target_valid(p, t) ? w.weight[t] : acc_t(1);
  return {acc_t(p.label_smoothing), acc_t(p.z_loss), classes, target_weight, w.weight ? *w.total : classes};
}

// Per-column class weights of the smoothing term of the gradient (nullptr when
// there are none or eps = 0: every column's weight is then 1).
template <typename acc_t>
FL_HOST_DEVICE const acc_t* linear_ce_smoothing_weights(const LinearCEParams& p, ClassWeights<acc_t> w) {
  return p.label_smoothing > 0.0 ? w.columns(p.chunk_start) : nullptr;
}

// The row's lse (as LseParts) from the row state and the row's loss (0 when
// the target is ignored); the one formula behind the CPU and CUDA finalize kernels.
template <typename acc_t>
FL_HOST_DEVICE void linear_ce_finalize_row(const LinearCEParams& p, int64_t row, const int64_t* target,
                                           ClassWeights<acc_t> class_weight, LinearCERowState<acc_t> state,
                                           LseArray<acc_t> lse, acc_t* loss) {
  const int64_t t = target[row];
  const CrossEntropyTerms<acc_t> terms = linear_ce_terms(p, class_weight, t);
  const LseParts<acc_t> parts = LseState<acc_t>{state.max[row], state.sum_exp[row]}.parts();
  lse.store(row, parts);
  loss[row] = t == p.ignore_index                ? acc_t(0)
              : !linear_ce_target_valid(p, t) ? std::numeric_limits<acc_t>::quiet_NaN()
                                                : terms.row_loss(parts.value(), state.target_logit[row],
                                                                 state.sum_logits[row]);
}

namespace cpu {
// Fold one chunk of raw logits [N, chunk_columns] (bias not yet added) into the
// row state (with class weights, sum_logits is Σ_j w_j y_j). The tile may be
// overwritten with softcap(logits + bias) (always on the CPU; on CUDA when
// p.tile_transformed).
template <typename acc_t>
void linear_ce_accumulate_chunk(const LinearCEParams& p, acc_t* logits, const acc_t* bias,
                                ClassWeights<acc_t> class_weight, const int64_t* target,
                                LinearCERowState<acc_t> state);
// Turn the row state into the lse parts [2, N] and the per-row loss[N] (0 on
// ignored rows).
template <typename acc_t>
void linear_ce_finalize(const LinearCEParams& p, const int64_t* target, ClassWeights<acc_t> class_weight,
                        LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss);
// dlogits of one chunk, scaled by the per-row upstream gradient grad_loss[N].
// Ignored rows get exact zeros whatever their logits (NaN/inf padding cannot
// leak into a gradient). `dlogits` may be written over the tile's own storage
// (each element read before the bytes it lands on are written; a
// half-precision row then has stride p.dlogits_stride). The tile holds raw
// logits, or softcap(logits + bias) when p.tile_transformed.
template <typename acc_t, typename grad_t>
void linear_ce_chunk_grad(const LinearCEParams& p, const acc_t* logits, const acc_t* bias,
                          ClassWeights<acc_t> class_weight, const int64_t* target, LseArray<const acc_t> lse,
                          const acc_t* grad_loss, grad_t* dlogits);
// The single pass's row kernel over a whole-vocabulary tile of rows: fold,
// finalize (lse, loss) and dlogits of every row, written over the tile.
template <typename acc_t, typename grad_t>
void linear_ce_single_pass_rows(const LinearCEParams& p, acc_t* logits, const acc_t* bias,
                                ClassWeights<acc_t> class_weight, const int64_t* target,
                                LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss,
                                const acc_t* grad_loss, grad_t* dlogits);
}  // namespace cpu

#ifdef FUSEDLOSS_WITH_CUDA
namespace cuda {
template <typename acc_t>
void linear_ce_accumulate_chunk(const LinearCEParams& p, acc_t* logits, const acc_t* bias,
                                ClassWeights<acc_t> class_weight, const int64_t* target,
                                LinearCERowState<acc_t> state, void* stream);
template <typename acc_t>
void linear_ce_finalize(const LinearCEParams& p, const int64_t* target, ClassWeights<acc_t> class_weight,
                        LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss, void* stream);
template <typename acc_t, typename grad_t>
void linear_ce_chunk_grad(const LinearCEParams& p, const acc_t* logits, const acc_t* bias,
                          ClassWeights<acc_t> class_weight, const int64_t* target, LseArray<const acc_t> lse,
                          const acc_t* grad_loss, grad_t* dlogits, void* stream);
template <typename acc_t, typename grad_t>
void linear_ce_single_pass_rows(const LinearCEParams& p, acc_t* logits, const acc_t* bias,
                                ClassWeights<acc_t> class_weight, const int64_t* target,
                                LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss,
                                const acc_t* grad_loss, grad_t* dlogits, void* stream);
}  // namespace cuda
#endif

}  // namespace fusedloss
