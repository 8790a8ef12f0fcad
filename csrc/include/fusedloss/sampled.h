// Sampled softmax and NCE (TensorFlow semantics, plus per-row and in-batch
// negatives): the parameters and the per-chunk kernels shared by the CPU and
// CUDA backends.
//
// Design (see also docs/sampled.md): every row i scores its num_true true classes and
// a list of candidate classes, either shared by the batch ([K]) or its own
// ([N, K]). The driver (csrc/sampled.cpp) walks the columns in chunks: the true
// columns form one chunk, the candidates the others. A chunk's raw logits
// x_i . W[id] land in a bounded [N, chunk] workspace (one GEMM against the
// gathered [chunk, D] rows for shared candidates, the row-wise dot kernel for
// per-row ids); the column kernels then add the bias, subtract log Q, apply the
// accidental-hit mask and fold the chunk into per-row state (forward) or turn
// it into dlogits (backward). Never an N x (num_true + K) tensor.
#pragma once

#include <cstdint>
#include <limits>

#include "fusedloss/numerics.h"

namespace fusedloss {

enum class SampledMode : int64_t { kSoftmax = 0, kNCE = 1 };

// Which candidate columns an accidental hit (candidate id == one of the row's
// true classes) removes.
enum class HitMask : int64_t {
  kNone = 0,      // keep every column
  kAllCopies = 1, // native: every copy of a true class among the candidates
  kLastCopy = 2,  // TensorFlow: only the last copy of a duplicated candidate id
};

// Scalars and sizes of one sampled-loss call plus the chunk being processed.
struct SampledParams {
  int64_t num_rows;        // N
  int64_t num_classes;     // C: rows of the weight, the range of every id
  int64_t num_true;        // T
  int64_t dim;             // D
  int64_t mode;            // SampledMode
  bool mask_hits;          // HitMask != kNone
  double label_smoothing;  // softmax only: eps spread over the row's unmasked columns
  double true_label;       // NCE only: label of each true column (1, or TF's 1/T)
  // Current chunk.
  bool is_true_chunk;      // the chunk holds the true columns (never masked, carry the labels)
  int64_t chunk_columns;   // columns in the chunk
  int64_t logits_stride;   // elements between rows of the [N, chunk] tile
};

// Where the columns of the current chunk come from. Row-indexed arrays use a
// row stride of 0 when the chunk's candidates are shared by the whole batch.
template <typename acc_t>
struct SampledColumns {
  const int64_t* ids;          // class id of column j of row i: ids[i * id_row_stride + j]
  int64_t id_row_stride;
  const acc_t* log_q;          // subtracted from the logit (nullptr: none)
  int64_t log_q_row_stride;
  const bool* maskable;        // [chunk] columns a hit may remove (nullptr: all), shared only
  const acc_t* bias;           // [C] in the accumulation dtype, or nullptr
  const int64_t* true_classes; // [N, T], for the accidental-hit test
};

// Per-row running statistics of the forward pass, one array each of length N.
template <typename acc_t>
struct SampledRowState {
  acc_t* max;         // softmax: running max over unmasked columns
  acc_t* sum_exp;     // softmax: running sum of exp(z - max)
  acc_t* sum_logits;  // softmax: sum of unmasked z (label smoothing)
  acc_t* true_sum;    // softmax: sum of the true columns' z
  acc_t* columns;     // softmax: number of unmasked columns
  acc_t* nce_loss;    // NCE: running sum of the per-column sigmoid CE
};

namespace cpu {
// out[i, j] = x_i . w[ids[i * id_row_stride + j]] for j < columns; in_t is the
// input dtype, the dot accumulates in acc_t.
template <typename in_t, typename acc_t>
void sampled_row_dot(const SampledParams& p, const in_t* x, const in_t* w, const int64_t* ids,
                     int64_t id_row_stride, int64_t columns, acc_t* out, int64_t out_stride);
// dx[i] += sum_j dz[i, j] * w[ids[i * id_row_stride + j]] (dx is an acc_t [N, D] accumulator).
template <typename in_t, typename acc_t>
void sampled_row_axpy(const SampledParams& p, const acc_t* dz, int64_t dz_stride, const in_t* w,
                      const int64_t* ids, int64_t id_row_stride, int64_t columns, acc_t* dx);
// Fold one chunk of raw logits into the row state (the tile is used as scratch).
template <typename acc_t>
void sampled_accumulate_chunk(const SampledParams& p, const SampledColumns<acc_t>& cols, acc_t* logits,
                              SampledRowState<acc_t> state);
// Per-row loss[N] and the statistics [3, N] the backward needs (see
// sampled_finalize_row).
template <typename acc_t>
void sampled_finalize(const SampledParams& p, SampledRowState<acc_t> state, acc_t* loss, acc_t* stats);
// dlogits of one chunk scaled by grad_loss[N]; masked columns get exactly 0.
// `dlogits` may alias `logits`.
template <typename acc_t, typename grad_t>
void sampled_chunk_grad(const SampledParams& p, const SampledColumns<acc_t>& cols, const acc_t* logits,
                        const acc_t* stats, const acc_t* grad_loss, grad_t* dlogits);
// The single pass over a block of rows whose tile holds the raw logits of the
// true columns (columns [0, T)) and of the shared candidates (K columns from
// candidate_offset on): folds and finalizes each row (loss, stats) and writes
// its dlogits, scaled by grad_loss, in place over the tile (accumulation
// dtype). `p` describes the candidates (chunk_columns = K, logits_stride = the
// tile's row stride); `state` must be empty.
template <typename acc_t>
void sampled_single_pass_rows(const SampledParams& p, const SampledColumns<acc_t>& true_cols,
                              const SampledColumns<acc_t>& candidate_cols, int64_t candidate_offset, acc_t* tile,
                              SampledRowState<acc_t> state,
                              acc_t* loss, acc_t* stats, const acc_t* grad_loss);
// dst[index[r]] += src[r] for r < rows (rows of `dim` values). Duplicated
// indices are summed in row order: deterministic, no atomics.
template <typename acc_t>
void sampled_scatter_add_rows(const acc_t* src, const int64_t* index, int64_t rows, int64_t dim, acc_t* dst);
// dst[index[i * columns + j]] += dz[i, j] * x[i]: the weight gradient of
// row-wise columns without forming the [N, columns, D] outer products.
template <typename acc_t>
void sampled_scatter_outer(const acc_t* dz, const acc_t* x, const int64_t* index, int64_t rows, int64_t columns,
                           int64_t dim, acc_t* dst);
}  // namespace cpu

#ifdef FUSEDLOSS_WITH_CUDA
namespace cuda {
template <typename in_t, typename acc_t>
void sampled_row_dot(const SampledParams& p, const in_t* x, const in_t* w, const int64_t* ids,
                     int64_t id_row_stride, int64_t columns, acc_t* out, int64_t out_stride, void* stream);
template <typename in_t, typename acc_t>
void sampled_row_axpy(const SampledParams& p, const acc_t* dz, int64_t dz_stride, const in_t* w,
                      const int64_t* ids, int64_t id_row_stride, int64_t columns, acc_t* dx, void* stream);
template <typename acc_t>
void sampled_accumulate_chunk(const SampledParams& p, const SampledColumns<acc_t>& cols, acc_t* logits,
                              SampledRowState<acc_t> state, void* stream);
template <typename acc_t>
void sampled_finalize(const SampledParams& p, SampledRowState<acc_t> state, acc_t* loss, acc_t* stats,
                      void* stream);
template <typename acc_t, typename grad_t>
void sampled_chunk_grad(const SampledParams& p, const SampledColumns<acc_t>& cols, const acc_t* logits,
                        const acc_t* stats, const acc_t* grad_loss, grad_t* dlogits, void* stream);
template <typename acc_t>
void sampled_single_pass_rows(const SampledParams& p, const SampledColumns<acc_t>& true_cols,
                              const SampledColumns<acc_t>& candidate_cols, int64_t candidate_offset, acc_t* tile,
                              SampledRowState<acc_t> state,
                              acc_t* loss, acc_t* stats, const acc_t* grad_loss, void* stream);
// dst[index[i * columns + j]] += dz[i, j] * x[i] with atomic adds (one block
// per row, threads over D): the per-row candidates' weight gradient without
// an [N, columns, D] outer-product block. Not bitwise reproducible; the
// binding uses index_add_ instead under torch.use_deterministic_algorithms.
template <typename acc_t>
void sampled_scatter_outer(const acc_t* dz, const acc_t* x, const int64_t* index, int64_t rows, int64_t columns,
                           int64_t dim, acc_t* dst, void* stream);
}  // namespace cuda
#endif

// ---------------------------------------------------------------------------
// Column arithmetic shared verbatim by the CPU and CUDA kernels.

// The two parts of a single-pass tile row (sampled_single_pass_rows): the
// true columns, then the candidates that `p` describes.
FL_HOST_DEVICE SampledParams sampled_true_part(SampledParams p) {
  p.is_true_chunk = true;
  p.chunk_columns = p.num_true;
  return p;
}
FL_HOST_DEVICE SampledParams sampled_candidate_part(SampledParams p) {
  p.is_true_chunk = false;
  return p;
}

// Whether column j of `row` is an accidental hit that the mask mode removes.
template <typename acc_t>
FL_HOST_DEVICE bool sampled_column_masked(const SampledParams& p, const SampledColumns<acc_t>& c, int64_t row,
                                          int64_t j) {
  if (!p.mask_hits || p.is_true_chunk || (c.maskable != nullptr && !c.maskable[j])) return false;
  const int64_t id = c.ids[row * c.id_row_stride + j];
  const int64_t* truth = c.true_classes + row * p.num_true;
  bool hit = false;
  for (int64_t t = 0; t < p.num_true; ++t) hit = hit || truth[t] == id;
  return hit;
}

// Whether an id can be read. Ids are range-checked before the op, except on
// CUDA under torch.compile or graph capture (the check would be a host sync):
// there an out-of-range id poisons its logit with NaN instead of reading out
// of bounds.
FL_HOST_DEVICE bool sampled_id_valid(const SampledParams& p, int64_t id) { return id >= 0 && id < p.num_classes; }

// Which terms sampled_column_logit adds: kTermsAsSet, those whose pointers
// are set (the CUDA kernels: a uniform branch), or a set the caller
// guarantees, kBiasTerm | kLogQTerm bits (the CPU loops: no branch in them).
constexpr int kTermsAsSet = -1, kBiasTerm = 1, kLogQTerm = 2;

// Final logit of column j of `row` from its raw dot product: + bias - log Q.
template <int kTerms = kTermsAsSet, typename acc_t>
FL_HOST_DEVICE acc_t sampled_column_logit(const SampledParams& p, const SampledColumns<acc_t>& c, int64_t row,
                                          int64_t j, acc_t raw) {
  const bool add_bias = kTerms == kTermsAsSet ? c.bias != nullptr : (kTerms & kBiasTerm) != 0;
  const bool sub_log_q = kTerms == kTermsAsSet ? c.log_q != nullptr : (kTerms & kLogQTerm) != 0;
  acc_t z = raw;
  const int64_t id = c.ids[row * c.id_row_stride + j];
  // Selects, not branches: the CPU loops over columns stay vectorisable.
  const bool valid = sampled_id_valid(p, id);
  if (add_bias) z += c.bias[valid ? id : 0];
  if (sub_log_q) z -= c.log_q[row * c.log_q_row_stride + j];
  return valid ? z : std::numeric_limits<acc_t>::quiet_NaN();
}

// exp in the accumulation type; the CPU kernels pass their vectorisable exp instead.
struct ExpAcc {
  template <typename acc_t>
  FL_HOST_DEVICE acc_t operator()(acc_t x) const { return exp_acc(x); }
};

// Softmax d loss / d z of one unmasked column with probability `prob` among
// `columns` unmasked ones: prob - (1-eps)/T [true column] - eps/M.
template <typename acc_t>
FL_HOST_DEVICE acc_t sampled_softmax_grad(const SampledParams& p, acc_t prob, acc_t columns) {
  acc_t g = prob - acc_t(p.label_smoothing) / columns;
  if (p.is_true_chunk) g -= (acc_t(1) - acc_t(p.label_smoothing)) / acc_t(p.num_true);
  return g;
}

// NCE d loss / d z of one column: sigmoid(z) - label (1/(1+e^-z) is exact at
// both ends in IEEE arithmetic).
template <typename acc_t, typename Exp>
FL_HOST_DEVICE acc_t sampled_nce_grad(const SampledParams& p, acc_t z, Exp exp_fn) {
  return acc_t(1) / (acc_t(1) + exp_fn(-z)) - (p.is_true_chunk ? acc_t(p.true_label) : acc_t(0));
}

// d loss / d z of one unmasked column, before the upstream per-row gradient:
// sampled_nce_grad or sampled_softmax_grad.
template <typename acc_t, typename Exp>
FL_HOST_DEVICE acc_t sampled_column_grad(const SampledParams& p, acc_t z, LseParts<acc_t> lse, acc_t columns,
                                         Exp exp_fn) {
  if (p.mode == static_cast<int64_t>(SampledMode::kNCE)) return sampled_nce_grad(p, z, exp_fn);
  return sampled_softmax_grad(p, exp_fn(lse.log_prob(z)), columns);
}

// Sigmoid cross-entropy of one NCE column: softplus(z) - label * z.
template <typename acc_t>
FL_HOST_DEVICE acc_t sampled_nce_term(const SampledParams& p, acc_t z) {
  const acc_t label = p.is_true_chunk ? acc_t(p.true_label) : acc_t(0);
  return -log_sigmoid(-z) - label * z;
}

// Softmax row loss from the finished state:
// lse - (1-eps)/T sum_t z_t - eps/M sum_{unmasked j} z_j.
template <typename acc_t>
FL_HOST_DEVICE acc_t sampled_softmax_row_loss(const SampledParams& p, acc_t lse, acc_t true_sum,
                                              acc_t sum_logits, acc_t columns) {
  const acc_t eps = acc_t(p.label_smoothing);
  acc_t loss = lse - (acc_t(1) - eps) * true_sum / acc_t(p.num_true);
  if (eps > acc_t(0)) loss -= eps * sum_logits / columns;
  return loss;
}

// Row `row`'s loss and backward statistics, a [3, N] array: the row's lse as
// LseParts (stats[row] = max, stats[N + row] = log-sum) and the number of
// unmasked columns (stats[2N + row]); zeros for NCE, whose backward needs none
// of them. The one formula behind the CPU and CUDA finalize kernels.
template <typename acc_t>
FL_HOST_DEVICE void sampled_finalize_row(const SampledParams& p, int64_t row, SampledRowState<acc_t> state,
                                         acc_t* loss, acc_t* stats) {
  const int64_t n = p.num_rows;
  if (p.mode == static_cast<int64_t>(SampledMode::kNCE)) {
    loss[row] = state.nce_loss[row];
    stats[row] = stats[n + row] = stats[2 * n + row] = 0;
    return;
  }
  const LseParts<acc_t> lse = LseState<acc_t>{state.max[row], state.sum_exp[row]}.parts();
  loss[row] =
      sampled_softmax_row_loss(p, lse.value(), state.true_sum[row], state.sum_logits[row], state.columns[row]);
  stats[row] = lse.max;
  stats[n + row] = lse.log_sum;
  stats[2 * n + row] = state.columns[row];
}

// The row's lse and unmasked-column count from the finalize statistics.
template <typename acc_t>
FL_HOST_DEVICE LseParts<acc_t> sampled_row_lse(const SampledParams& p, const acc_t* stats, int64_t row) {
  return {stats[row], stats[p.num_rows + row]};
}
template <typename acc_t>
FL_HOST_DEVICE acc_t sampled_row_columns(const SampledParams& p, const acc_t* stats, int64_t row) {
  return stats[2 * p.num_rows + row];
}

// Rows per block of the sampled single pass with shared candidates
// (sampled_sum_and_grad; 0: the recompute pair runs), for `rows` inputs of
// `dim` features, T = num_true true columns and K = num_sampled candidates;
// half_operands: bf16/fp16 GEMM operands (CUDA). Defined in csrc/sampled.cpp.
int64_t sampled_single_pass_block_rows(int64_t rows, int64_t num_true, int64_t num_sampled, int64_t dim,
                                       bool half_operands, bool cuda, int64_t row_block, int64_t memory_budget);

}  // namespace fusedloss
