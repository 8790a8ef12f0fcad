// InfoNCE family (InfoNCE, SimCLR NT-Xent, CLIP): the parameters and the
// per-chunk kernels shared by the CPU and CUDA backends.
//
// Design (see docs/contrastive.md): R query rows Q [R, D] are scored against C key
// columns K [C, D], logits = scale * Q K^T. The driver (csrc/contrastive.cpp)
// walks the columns in chunks, forming one [R, chunk] tile of raw dot products
// with a GEMM; the kernels declared here fold that block into a per-row online
// log-sum-exp and, for the symmetric loss, into the complete column-wise LSE of
// the chunk's columns (the tile holds every row). The tile is only read: the
// kernels apply the scale and the mask on the fly, so the forward moves each
// dot product through memory once per pass. The R x C matrix never exists.
//
// Row i's positive is column positives[i] (any layout: i, i + offset for a
// slice of gathered keys, (i + N) mod 2N for NT-Xent); with mask_self, column
// i + self_offset is excluded from row i's softmax (and from that column's).
//
// False negatives by id (ContrastiveIds): column j is also excluded from row
// i's softmax (and, symmetric, row i from column j's) when it refers to the
// same item as row i's positive in some id channel, except the positive
// itself. Excluded entries take no part in any max, sum or gradient: they are
// selected out, never computed as exp(-inf), so no NaN can arise from them.
#pragma once

#include <cstdint>
#include <limits>
#include <type_traits>

#include "fusedloss/numerics.h"

namespace fusedloss {

// Up to two id channels (e.g. the keys' ids and the queries' ids): in channel
// c, row i carries row[c][i] and the first columns[c] columns carry col[c][j]
// (later columns, e.g. extra negatives without ids, none); columns[c] == 0:
// the channel is unused. Every channel's arrays are readable for every row
// and column ([K, C] col ids; an unused channel points at channel 0's), so
// that ContrastiveRowEntries::match() needs no branch and the CPU loops vectorise.
// With `penalize` the ids mask nothing: an entry off the row's positive
// instead gets logit (scale + penalty) * dot, penalty_match where the column
// shares the row's id and penalty_differ where it does not, with the
// gradient of scale * dot only (sentence-transformers' hardness weighting,
// scale * s + alpha * stop_grad(s)).
struct ContrastiveIds {
  static constexpr int kChannels = 2;
  const int64_t* row[kChannels];
  const int64_t* col[kChannels];
  int64_t columns[kChannels];
  bool penalize;
  double penalty_match;
  double penalty_differ;

  FL_HOST_DEVICE bool any() const { return columns[0] > 0 || columns[1] > 0; }

  // The ids of rows [first, ...): a block of rows indexed from 0.
  ContrastiveIds rows_from(int64_t first) const {
    ContrastiveIds shifted = *this;
    for (int c = 0; c < kChannels; ++c) {
      if (row[c] != nullptr) shifted.row[c] += first;
    }
    return shifted;
  }
};

// The id channels of one row (ContrastiveRowEntries with ids): channel c's
// column ids from the entries' first column, how many of those columns have
// one, and the row's id; the id mask or the penalties.
template <typename acc_t>
struct RowIdChannels {
  const int64_t* col[ContrastiveIds::kChannels];
  int64_t limit[ContrastiveIds::kChannels];
  int64_t id[ContrastiveIds::kChannels];
  bool mask_ids;          // the ids mask (else they penalize)
  acc_t penalty_match;    // penalizing: the penalties; else 0
  acc_t penalty_differ;
};
struct NoRowIds {};

// The entries of one row of a chunk (ContrastiveParams::row_entries), with
// the row's ids, the chunk offset and the scales read once: the CPU column
// loops then hold only locals and vectorise (loads through the params
// struct inside a loop keep it scalar). An entry is out of the row's (and,
// symmetric, the column's) softmax when it is the masked self column or,
// with kIds and the id mask, a column sharing an id with the row other than
// the positive. The one predicate of every CPU and CUDA kernel; the template
// flag keeps the id-free loops as they were.
template <bool kIds, typename acc_t>
struct ContrastiveRowEntries {
  int64_t self_column;
  int64_t positive;
  acc_t scale_plain;  // s
  // Absent without ids: the id-free loops carry nothing they do not use.
  std::conditional_t<kIds, RowIdChannels<acc_t>, NoRowIds> channels;

  // Whether chunk column j has the row's id in some channel (branch-free:
  // every channel's ids are readable for every column); false without ids.
  // The loops pass it to excluded() and scale() instead of those calling it
  // twice: GCC leaves such a loop unvectorised.
  FL_HOST_DEVICE bool match(int64_t j) const {
    if constexpr (kIds) {
      const RowIdChannels<acc_t>& c = channels;
      return ((j < c.limit[0]) & (c.col[0][j] == c.id[0])) | ((j < c.limit[1]) & (c.col[1][j] == c.id[1]));
    } else {
      return false;
    }
  }
  // Whether entry j is out of the softmax; `hit` is match(j).
  FL_HOST_DEVICE bool excluded(int64_t j, bool hit) const {
    if constexpr (kIds) {
      return (j == self_column) | (channels.mask_ids & (j != positive) & hit);
    } else {
      return j == self_column;
    }
  }
  // The multiplier of entry j's dot product in its logit: s, plus the id
  // penalty off the positive (ContrastiveIds::penalize; gradients keep the
  // factor s, the penalty is not differentiated). Selects of values only: a
  // nested conditional stays control flow and keeps the loop scalar.
  FL_HOST_DEVICE acc_t scale(int64_t j, bool hit) const {
    if constexpr (kIds) {
      const acc_t penalty = hit ? channels.penalty_match : channels.penalty_differ;
      return scale_plain + (j != positive ? penalty : acc_t(0));
    } else {
      return scale_plain;
    }
  }
};

struct ContrastiveParams {
  int64_t num_rows;     // R: query rows
  int64_t num_cols;     // C: key columns (keys, then any extra negatives)
  int64_t chunk_start;    // first column of the current chunk
  int64_t chunk_columns;  // columns in the current chunk
  int64_t logits_stride;  // elements between consecutive rows of the tile
  int64_t dlogits_stride; // elements between consecutive rows of the dlogits (twice logits_stride for
                          // half-precision dlogits written over the fp32 tile)
  int64_t self_offset;  // row i masks column i + self_offset (when mask_self)
  bool mask_self;
  bool symmetric;       // add the column-wise (key -> query) term
  ContrastiveIds ids;   // the false-negative mask (ids.any() false: none)

  // Column of the chunk masked for `row`, or -1.
  FL_HOST_DEVICE int64_t masked_chunk_column(int64_t row) const {
    const int64_t c = row + self_offset - chunk_start;
    return mask_self && c >= 0 && c < chunk_columns ? c : -1;
  }

  // The entries of one row of the chunk (ContrastiveRowEntries) from chunk
  // column `first` on (a strip of the chunk): whether each is out of the
  // softmax, and its logit's multiplier of the dot product. `self_column` is
  // the row's masked self column (masked_chunk_column), `positive` the chunk
  // column of its positive (any value outside the chunk when it is
  // elsewhere), both counted from `first`.
  template <bool kIds, typename acc_t>
  FL_HOST_DEVICE ContrastiveRowEntries<kIds, acc_t> row_entries(int64_t row, int64_t self_column, int64_t positive,
                                                                acc_t s, int64_t first = 0) const {
    ContrastiveRowEntries<kIds, acc_t> e;
    e.self_column = self_column;
    e.positive = positive;
    e.scale_plain = s;
    if constexpr (kIds) {
      RowIdChannels<acc_t>& c = e.channels;
      for (int k = 0; k < ContrastiveIds::kChannels; ++k) {
        c.col[k] = ids.col[k] + chunk_start + first;
        c.limit[k] = ids.columns[k] - chunk_start - first;
        c.id[k] = ids.row[k][row];
      }
      c.mask_ids = !ids.penalize;
      c.penalty_match = ids.penalize ? static_cast<acc_t>(ids.penalty_match) : acc_t(0);
      c.penalty_differ = ids.penalize ? static_cast<acc_t>(ids.penalty_differ) : acc_t(0);
    }
    return e;
  }

  // Entry (row, chunk column j) one at a time (the CUDA kernels).
  template <bool kIds>
  FL_HOST_DEVICE bool excluded(int64_t row, int64_t j, int64_t self_column, int64_t positive) const {
    const auto entries = row_entries<kIds, float>(row, self_column, positive, 0.0f);
    return entries.excluded(j, entries.match(j));
  }
  template <bool kIds, typename acc_t>
  FL_HOST_DEVICE acc_t entry_scale(int64_t row, int64_t j, int64_t positive, acc_t s) const {
    const auto entries = row_entries<kIds, acc_t>(row, -1, positive, s);
    return entries.scale(j, entries.match(j));
  }

  // excluded() and entry_scale() with the flag read at run time (the CUDA
  // kernels: a uniform branch).
  FL_HOST_DEVICE bool is_excluded(int64_t row, int64_t j, int64_t self_column, int64_t positive) const {
    return ids.any() ? excluded<true>(row, j, self_column, positive) : excluded<false>(row, j, self_column, positive);
  }
  template <typename acc_t>
  FL_HOST_DEVICE acc_t scale_of(int64_t row, int64_t j, int64_t positive, acc_t s) const {
    return ids.any() ? entry_scale<true>(row, j, positive, s) : s;
  }
};

// Per-row running statistics of the forward pass, one array each of length R.
template <typename acc_t>
struct ContrastiveRowState {
  acc_t* max;             // running max of the row's logits
  acc_t* sum_exp;         // running sum of exp(logit - max)
  acc_t* positive_logit;  // logit at the positive column once its chunk is seen (NaN before)
};

// Logit of one tile entry: scale * dot, or -inf where the self mask applies.
template <typename acc_t>
FL_HOST_DEVICE acc_t contrastive_logit(acc_t dot, acc_t scale, bool masked) {
  return masked ? neg_infinity<acc_t>() : scale * dot;
}

// Logit at a row's positive. The positive being the row's masked self column
// is rejected before the op on the CPU; on CUDA (positives are built by the
// Python layer, unchecked there) it poisons the row with NaN rather than an
// infinite loss.
template <typename acc_t>
FL_HOST_DEVICE acc_t contrastive_positive_logit(acc_t dot, acc_t scale, bool masked) {
  return masked ? std::numeric_limits<acc_t>::quiet_NaN() : scale * dot;
}

// Column LSE at a row's positive. The CUDA path does not validate positives
// (the Python layer builds them), so an invalid one yields NaN, never an
// out-of-bounds read.
template <typename acc_t>
FL_HOST_DEVICE acc_t positive_column_lse(LseArray<const acc_t> col_lse, int64_t positive, int64_t num_cols) {
  return positive >= 0 && positive < num_cols ? col_lse[positive].value() : std::numeric_limits<acc_t>::quiet_NaN();
}

// Loss of pair i: lse_row - positive logit, or (symmetric) the mean of that and
// the column term lse_col[positive] - positive logit.
template <typename acc_t>
FL_HOST_DEVICE acc_t contrastive_pair_loss(acc_t row_lse, acc_t col_lse, acc_t positive_logit,
                                           bool symmetric) {
  const acc_t row_term = row_lse - positive_logit;
  return symmetric ? acc_t(0.5) * (row_term + col_lse - positive_logit) : row_term;
}

// Row `row`'s lse parts and pair loss from the finished state; the one formula
// behind the CPU and CUDA finalize kernels.
template <typename acc_t>
FL_HOST_DEVICE void contrastive_finalize_row(const ContrastiveParams& p, int64_t row, const int64_t* positives,
                                             ContrastiveRowState<acc_t> state, LseArray<const acc_t> col_lse,
                                             LseArray<acc_t> row_lse, acc_t* loss) {
  const LseParts<acc_t> lse = LseState<acc_t>{state.max[row], state.sum_exp[row]}.parts();
  row_lse.store(row, lse);
  const acc_t column = p.symmetric ? positive_column_lse(col_lse, positives[row], p.num_cols) : acc_t(0);
  loss[row] = contrastive_pair_loss(lse.value(), column, state.positive_logit[row], p.symmetric);
}

// d loss / d logit for one entry, given its row and column softmax
// probabilities. With symmetric, row_grad is half the pair's upstream gradient
// and the positive carries the one-hot of both terms (2 * row_grad).
template <typename acc_t>
FL_HOST_DEVICE acc_t contrastive_logit_grad(acc_t row_prob, acc_t row_grad, acc_t col_prob,
                                            acc_t col_grad, bool is_positive, bool symmetric) {
  // Branch-free so that the CPU loop vectorises.
  const acc_t one_hot = is_positive ? (symmetric ? acc_t(2) * row_grad : row_grad) : acc_t(0);
  return row_grad * row_prob + col_grad * col_prob - one_hot;
}

namespace cpu {
// Merge a tile of raw dot products [R, chunk_columns] into the row
// state (and record each row's positive logit when its column is here).
template <typename acc_t>
void contrastive_accumulate_chunk(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                           const int64_t* positives, ContrastiveRowState<acc_t> state);
// Column-wise LSE of the chunk over all R rows: writes col_lse[chunk_start + j].
// `scratch` is the CUDA kernels' (contrastive_column_scratch_elems); the CPU
// needs none. The rows' positives only matter to the id mask.
template <typename acc_t>
void contrastive_chunk_column_lse(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                              const int64_t* positives, LseArray<acc_t> col_lse, acc_t* scratch);
// row_lse[R] and the per-row loss[R]: lse - positive, or the mean of the row
// and the column term of the pair when symmetric.
template <typename acc_t>
void contrastive_finalize(const ContrastiveParams& p, const int64_t* positives,
                          ContrastiveRowState<acc_t> state, LseArray<const acc_t> col_lse,
                          LseArray<acc_t> row_lse, acc_t* loss);
// scale * dLoss/dlogits of one tile of raw dot products, given the per-row
// upstream gradient of the row term (row_grad[R]) and, when symmetric, the
// summed upstream gradient of the column terms per column (col_grad[C]).
// `dlogits` may alias `tile`. Unless null, scale_grad_rows[row] is increased
// by the tile's term of d loss / d scale, sum_j dLoss/dlogit_j * dot_j, taken
// from the gradient before it is rounded to the dlogits dtype.
template <typename acc_t, typename grad_t>
void contrastive_chunk_grad(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                           const int64_t* positives, LseArray<const acc_t> row_lse,
                           LseArray<const acc_t> col_lse, const acc_t* row_grad, const acc_t* col_grad,
                           grad_t* dlogits, acc_t* scale_grad_rows);
// The single pass over a block of rows whose tile holds every column: folds
// and finalizes each row (row_lse, loss) and writes its dlogits (scaled by
// scale and row_grad, plus the column term when symmetric: col_lse and
// col_grad must then be complete) over the tile, one row at a time while it
// is in cache. `state` must be the empty row state; scale_grad_rows as in
// contrastive_chunk_grad.
template <typename acc_t, typename grad_t>
void contrastive_single_pass_rows(const ContrastiveParams& p, acc_t* tile, const acc_t* scale,
                                  const int64_t* positives, ContrastiveRowState<acc_t> state,
                                  LseArray<const acc_t> col_lse, LseArray<acc_t> row_lse, acc_t* loss,
                                  const acc_t* row_grad, const acc_t* col_grad, grad_t* dlogits,
                                  acc_t* scale_grad_rows);
}  // namespace cpu

#ifdef FUSEDLOSS_WITH_CUDA
namespace cuda {
template <typename acc_t>
void contrastive_accumulate_chunk(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                           const int64_t* positives, ContrastiveRowState<acc_t> state, void* stream);
// Elements of acc_t scratch contrastive_chunk_column_lse needs (partial LSE states
// of row slices, reduced deterministically by a second kernel).
int64_t contrastive_column_scratch_elems(int64_t num_rows, int64_t chunk_columns);
template <typename acc_t>
void contrastive_chunk_column_lse(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                              const int64_t* positives, LseArray<acc_t> col_lse, acc_t* scratch, void* stream);
template <typename acc_t>
void contrastive_finalize(const ContrastiveParams& p, const int64_t* positives,
                          ContrastiveRowState<acc_t> state, LseArray<const acc_t> col_lse,
                          LseArray<acc_t> row_lse, acc_t* loss, void* stream);
template <typename acc_t, typename grad_t>
void contrastive_chunk_grad(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                           const int64_t* positives, LseArray<const acc_t> row_lse,
                           LseArray<const acc_t> col_lse, const acc_t* row_grad, const acc_t* col_grad,
                           grad_t* dlogits, acc_t* scale_grad_rows, void* stream);
template <typename acc_t, typename grad_t>
void contrastive_single_pass_rows(const ContrastiveParams& p, acc_t* tile, const acc_t* scale,
                                  const int64_t* positives, ContrastiveRowState<acc_t> state,
                                  LseArray<const acc_t> col_lse, LseArray<acc_t> row_lse, acc_t* loss,
                                  const acc_t* row_grad, const acc_t* col_grad, grad_t* dlogits,
                                  acc_t* scale_grad_rows, void* stream);
}  // namespace cuda
#endif

}  // namespace fusedloss
