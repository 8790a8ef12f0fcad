// SigLIP's sigmoid loss (Zhai et al. 2023, open_clip's SigLipLoss): the
// parameters and per-tile kernels shared by the CPU and CUDA backends.
//
// R image rows I [R, D] are scored against C text columns T [C, D] with logits
// z = scale * I T^T + bias; the pair (i, j) has label +1 when j is row i's
// positive column (i + positive_offset) and -1 otherwise, and loss
// -log sigmoid(label * z) = softplus(-label * z). There is no softmax: every
// pair's loss and gradient depend on its own logit only, so one pass over the
// column tiles forms the loss and the gradient together (csrc/siglip.cpp).
// A tile holds raw dot products; the kernels apply scale and bias on the fly
// and write d loss / d dot (= scale * d loss / d z) in place for the GEMMs.
#pragma once

#include <cstdint>

#include "fusedloss/numerics.h"

namespace fusedloss {

struct SiglipParams {
  int64_t num_rows;         // R: image rows
  int64_t num_cols;         // C: text columns
  int64_t chunk_start;      // first column of the current tile
  int64_t chunk_columns;    // columns in the current tile
  int64_t logits_stride;    // elements between consecutive rows of the tile
  int64_t positive_offset;  // row i's positive is column i + positive_offset (none if outside [0, C))

  // Column of the tile holding `row`'s positive (outside [0, chunk_columns) if none).
  FL_HOST_DEVICE int64_t positive_chunk_column(int64_t row) const { return row + positive_offset - chunk_start; }
};

// Per-row sums, accumulated over the tiles ([3, R], zero-initialised): the
// row's loss, and with a gradient, sum_j dL/dz_ij (-> d bias) and
// sum_j dL/dz_ij * dot_ij (-> d scale).
template <typename acc_t>
struct SiglipRowState {
  acc_t* loss;
  acc_t* grad_bias;
  acc_t* grad_scale;
};

// One pair's terms, with e = exp(-|z|) computed by the caller (its backend's
// vectorised or device exp). With x = label * z (label +1 at the positive):
// loss = -log sigmoid(x) = softplus(-x) = log1p(e) + max(-x, 0), and
// d loss / d z = -label * sigmoid(-x) = sigmoid(z) - [positive], where
// sigmoid(-x) is e / (1 + e) for x >= 0 and 1 / (1 + e) otherwise: no
// cancellation at any |z| (the typical negative sits at z ≈ bias = -10,
// where 1 - sigmoid(10) would lose every digit). Two functions rather than
// one returning a pair: plain scalars keep the CPU loops vectorisable.
template <typename acc_t>
FL_HOST_DEVICE acc_t siglip_pair_loss(acc_t z, bool positive, acc_t log1p_e) {
  const acc_t x = positive ? z : -z;
  return log1p_e + (x < acc_t(0) ? -x : acc_t(0));
}

template <typename acc_t>
FL_HOST_DEVICE acc_t siglip_pair_grad(acc_t z, bool positive, acc_t e) {
  const acc_t x = positive ? z : -z;
  const acc_t inv = acc_t(1) / (acc_t(1) + e);
  const acc_t sigmoid_neg_x = x >= acc_t(0) ? e * inv : inv;
  return positive ? -sigmoid_neg_x : sigmoid_neg_x;
}

namespace cpu {
// One tile of raw dot products [R, chunk_columns]: adds each row's loss (when
// `with_loss`) to state.loss and, when dlogits is not null, writes
// row_grad[row] * scale * d loss / d z over it (it may alias the tile) and adds
// to state.grad_bias / state.grad_scale.
template <typename acc_t, typename grad_t>
void siglip_chunk(const SiglipParams& p, const acc_t* tile, const acc_t* scale, const acc_t* bias,
                  const acc_t* row_grad, bool with_loss, SiglipRowState<acc_t> state, grad_t* dlogits);
}  // namespace cpu

#ifdef FUSEDLOSS_WITH_CUDA
namespace cuda {
template <typename acc_t, typename grad_t>
void siglip_chunk(const SiglipParams& p, const acc_t* tile, const acc_t* scale, const acc_t* bias,
                  const acc_t* row_grad, bool with_loss, SiglipRowState<acc_t> state, grad_t* dlogits,
                  void* stream);
}  // namespace cuda
#endif

}  // namespace fusedloss
