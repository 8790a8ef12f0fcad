// CPU kernels of sampled softmax / NCE: the row-wise gathered dot and axpy used
// for the true columns and for per-row candidates, and the row-parallel column
// passes over one [N, chunk] tile (the shared-candidate GEMMs live in
// csrc/sampled.cpp).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"
#include "fusedloss/sampled.h"
#include "fusedloss/dtypes.h"
#include "vec_math.h"

namespace fusedloss::cpu {

namespace {
struct ExpVectorizable {
  template <typename acc_t>
  acc_t operator()(acc_t x) const { return exp_vectorizable(x); }
};

// Final logits of one row of a chunk, written to `out` (which may alias `raw`):
// bias added, log Q subtracted, and -inf on masked columns, which every later
// pass skips explicitly (never exp(-inf - max), never -FLT_MAX arithmetic).
// Split into simple passes so the common no-mask path vectorises.
template <typename acc_t>
void final_row_logits(const SampledParams& p, const SampledColumns<acc_t>& cols, int64_t row, const acc_t* raw,
                      acc_t* out) {
  const int64_t columns = p.chunk_columns;
  // One loop per set of terms: a null check inside it would keep it scalar.
  const auto each_column = [&](auto terms_tag) {
    constexpr int kTerms = decltype(terms_tag)::value;
    // Local copies: loads through the references stay in the loop otherwise.
    const SampledParams params = p;
    const SampledColumns<acc_t> c = cols;
#pragma omp simd
    for (int64_t j = 0; j < columns; ++j) out[j] = sampled_column_logit<kTerms>(params, c, row, j, raw[j]);
  };
  const int terms = (cols.bias != nullptr ? kBiasTerm : 0) | (cols.log_q != nullptr ? kLogQTerm : 0);
  if (terms == (kBiasTerm | kLogQTerm)) each_column(std::integral_constant<int, kBiasTerm | kLogQTerm>{});
  else if (terms == kBiasTerm) each_column(std::integral_constant<int, kBiasTerm>{});
  else if (terms == kLogQTerm) each_column(std::integral_constant<int, kLogQTerm>{});
  else each_column(std::integral_constant<int, 0>{});
  if (!p.mask_hits || p.is_true_chunk) return;
  // sampled_column_masked, one true class at a time so that the column loop
  // is a vectorisable compare and select.
  const int64_t* ids = cols.ids + row * cols.id_row_stride;
  const int64_t* truth = cols.true_classes + row * p.num_true;
  const bool* maskable = cols.maskable;
  for (int64_t t = 0; t < p.num_true; ++t) {
    const int64_t true_class = truth[t];
    if (maskable == nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < columns; ++j) out[j] = ids[j] == true_class ? neg_infinity<acc_t>() : out[j];
    } else {
#pragma omp simd
      for (int64_t j = 0; j < columns; ++j) {
        out[j] = ids[j] == true_class && maskable[j] ? neg_infinity<acc_t>() : out[j];
      }
    }
  }
}

// Folds one row of a chunk's final logits (-inf: masked) into the row state
// and returns the chunk's max. With kKeep the row is left holding exp(y -
// chunk max) on live columns and -1 on masked ones (grad_from_exps_row).
template <bool kKeep, typename acc_t>
acc_t fold_final_row(const SampledParams& p, int64_t row, acc_t* y, SampledRowState<acc_t> state) {
  const int64_t columns = p.chunk_columns;
  const acc_t skip = neg_infinity<acc_t>();
  if (p.mode == static_cast<int64_t>(SampledMode::kNCE)) {
    acc_t nce_sum = 0;
    for (int64_t j = 0; j < columns; ++j) nce_sum += y[j] == skip ? acc_t(0) : sampled_nce_term(p, y[j]);
    state.nce_loss[row] += nce_sum;
    return skip;
  }
  acc_t m = skip, s = 0, unmasked = 0;
#pragma omp simd reduction(max : m) reduction(+ : s, unmasked)
  for (int64_t j = 0; j < columns; ++j) {
    const bool live = y[j] != skip;
    m = y[j] > m ? y[j] : m;
    s += live ? y[j] : acc_t(0);
    unmasked += live ? acc_t(1) : acc_t(0);
  }
  acc_t sum_exp = 0;
  if (m != skip) {
#pragma omp simd reduction(+ : sum_exp)
    for (int64_t j = 0; j < columns; ++j) {
      // The mask as a 0/1 factor, not a select around the exp: GCC 12 leaves
      // the select form scalar. A masked column's exp(-inf) is the clamped
      // exp(-87) > 0, times 0.
      const acc_t v = y[j];
      const acc_t live = v != skip ? acc_t(1) : acc_t(0);
      const acc_t e = live * exp_vectorizable(v - m);
      sum_exp += e;
      if constexpr (kKeep) y[j] = e + (live - acc_t(1));  // masked: -1
    }
  } else if constexpr (kKeep) {
    std::fill_n(y, columns, acc_t(-1));
  }
  lse_merge_into(state.max[row], state.sum_exp[row], LseState<acc_t>{m, sum_exp});
  state.sum_logits[row] += s;
  state.columns[row] += unmasked;
  if (p.is_true_chunk) state.true_sum[row] += s;
  return m;
}

// Softmax dlogits of one row part from fold_final_row<true>'s exps:
// g * dLoss/dz with p_j = e_j * exp(part max - lse); masked (-1) columns get
// exactly 0. One multiply per column where recomputing p would be an exp.
template <typename acc_t>
void grad_from_exps_row(const SampledParams& p, acc_t* e, acc_t part_max, LseParts<acc_t> lse, acc_t unmasked,
                        acc_t g) {
  const acc_t to_prob = exp_acc((part_max - lse.max) - lse.log_sum);
  const acc_t offset = sampled_softmax_grad(p, acc_t(0), unmasked);  // the label terms
#pragma omp simd
  for (int64_t j = 0; j < p.chunk_columns; ++j) {
    const acc_t live = e[j] != acc_t(-1) ? acc_t(1) : acc_t(0);  // NaN stays live: a NaN row stays NaN
    e[j] = live * (g * (e[j] * to_prob + offset));
  }
}

// One NCE column of final logit z (-inf: masked) as a LogTerm: u = 1 +
// exp(-|z|) and the rest of its sigmoid cross-entropy, softplus(z) - label *
// z - log(u) = max(z, 0) - label * z + log1p_correction. Also writes g *
// (sigmoid(z) - label) to `dz`; a masked column gets u = 1, rest = 0 and a
// zero gradient. One exp and one division (shared by the sigmoid and the
// correction) per column.
template <typename acc_t>
FUSEDLOSS_VECTOR_INLINE LogTerm<acc_t> nce_column(acc_t z, acc_t label, acc_t g, acc_t& dz) {
  const bool live = z != neg_infinity<acc_t>();
  const acc_t e = exp_vectorizable(-std::fabs(z));
  const acc_t u = acc_t(1) + e;
  const acc_t inverse = acc_t(1) / u;
  const acc_t sigmoid = (z >= acc_t(0) ? acc_t(1) : e) * inverse;
  dz = live ? g * (sigmoid - label) : acc_t(0);
  const acc_t rest = (z > acc_t(0) ? z : acc_t(0)) - label * z + log1p_correction(e, u, inverse);
  return {live ? u : acc_t(1), live ? rest : acc_t(0), acc_t(0), acc_t(0)};
}

// NCE's single pass over one row of a chunk's final logits (-inf: masked):
// returns the row's sigmoid cross-entropy sum and writes the gradient over y.
template <typename acc_t>
acc_t nce_fold_and_grad_row(const SampledParams& p, acc_t* y, acc_t g) {
  const acc_t label = p.is_true_chunk ? acc_t(p.true_label) : acc_t(0);
  return sum_log_terms<acc_t>(p.chunk_columns, [=](int64_t j) { return nce_column(y[j], label, g, y[j]); }).total;
}

// g * dLoss/dz of one row of a chunk's final logits y into dz (which may
// alias y); masked (-inf) columns get exactly 0. The mode and the label terms
// are resolved outside the column loop, which GCC leaves scalar otherwise.
template <typename acc_t, typename grad_t>
void grad_final_row(const SampledParams& p, const acc_t* y, LseParts<acc_t> lse, acc_t unmasked, acc_t g,
                    grad_t* dz) {
  const acc_t skip = neg_infinity<acc_t>();
  const auto each_live_column = [&](auto column_grad) {
#pragma omp simd
    for (int64_t j = 0; j < p.chunk_columns; ++j) {
      // A 0/1 factor, not a select (see fold_final_row): a masked column's
      // gradient formula is finite (clamped exps), times 0.
      const acc_t v = y[j];
      const acc_t live = v != skip ? acc_t(1) : acc_t(0);
      dz[j] = static_cast<grad_t>(live * (g * column_grad(v)));
    }
  };
  if (p.mode == static_cast<int64_t>(SampledMode::kNCE)) {
    each_live_column([&](acc_t z) { return sampled_nce_grad(p, z, ExpVectorizable{}); });
  } else {
    const acc_t label_terms = sampled_softmax_grad(p, acc_t(0), unmasked);
    each_live_column([&](acc_t z) { return exp_vectorizable(lse.log_prob(z)) + label_terms; });
  }
}

// The scatters split the D columns across tasks: every task sees every source
// row, in order, so duplicated destinations never race and sums are reproducible.
constexpr int64_t kScatterColumns = 64;

template <typename F>
void for_each_column_block(int64_t dim, const F& body) {
  const int64_t blocks = (dim + kScatterColumns - 1) / kScatterColumns;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    body(begin * kScatterColumns, std::min(dim, end * kScatterColumns));
  });
}
}  // namespace

template <typename in_t, typename acc_t>
void sampled_row_dot(const SampledParams& p, const in_t* x, const in_t* w, const int64_t* ids,
                     int64_t id_row_stride, int64_t columns, acc_t* out, int64_t out_stride) {
  const int64_t dim = p.dim;
  at::parallel_for(0, p.num_rows, row_grain(columns * dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const in_t* xr = x + row * dim;
      for (int64_t j = 0; j < columns; ++j) {
        const in_t* wr = w + ids[row * id_row_stride + j] * dim;
        acc_t s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < dim; ++d) s += static_cast<acc_t>(xr[d]) * static_cast<acc_t>(wr[d]);
        out[row * out_stride + j] = s;
      }
    }
  });
}

template <typename in_t, typename acc_t>
void sampled_row_axpy(const SampledParams& p, const acc_t* dz, int64_t dz_stride, const in_t* w,
                      const int64_t* ids, int64_t id_row_stride, int64_t columns, acc_t* dx) {
  const int64_t dim = p.dim;
  at::parallel_for(0, p.num_rows, row_grain(columns * dim), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t* dxr = dx + row * dim;
      for (int64_t j = 0; j < columns; ++j) {
        const acc_t g = dz[row * dz_stride + j];
        if (g == acc_t(0)) continue;  // masked columns and zero upstream rows
        const in_t* wr = w + ids[row * id_row_stride + j] * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) dxr[d] += g * static_cast<acc_t>(wr[d]);
      }
    }
  });
}

template <typename acc_t>
void sampled_accumulate_chunk(const SampledParams& p, const SampledColumns<acc_t>& cols, acc_t* logits,
                              SampledRowState<acc_t> state) {
  at::parallel_for(0, p.num_rows, row_grain(p.chunk_columns), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t* y = logits + row * p.logits_stride;
      final_row_logits(p, cols, row, y, y);
      fold_final_row<false>(p, row, y, state);
    }
  });
}

template <typename acc_t>
void sampled_finalize(const SampledParams& p, SampledRowState<acc_t> state, acc_t* loss, acc_t* stats) {
  for_each_row(p.num_rows, [&](int64_t row) { sampled_finalize_row(p, row, state, loss, stats); });
}

template <typename acc_t, typename grad_t>
void sampled_chunk_grad(const SampledParams& p, const SampledColumns<acc_t>& cols, const acc_t* logits,
                        const acc_t* stats, const acc_t* grad_loss, grad_t* dlogits) {
  const int64_t columns = p.chunk_columns;
  at::parallel_for(0, p.num_rows, row_grain(columns), [&](int64_t begin, int64_t end) {
    // The final logits of a row need an acc_t row: dlogits itself when it is in
    // the accumulation dtype, else a scratch row.
    std::vector<acc_t> scratch(std::is_same_v<acc_t, grad_t> ? 0 : columns);
    for (int64_t row = begin; row < end; ++row) {
      grad_t* dz = dlogits + row * p.logits_stride;
      const acc_t g = grad_loss[row];
      if (g == acc_t(0)) {
        // Skipped, not multiplied by 0: the row's logits may be inf/NaN.
        std::fill_n(dz, columns, grad_t(0));
        continue;
      }
      acc_t* y;
      if constexpr (std::is_same_v<acc_t, grad_t>) y = dz;
      else y = scratch.data();
      final_row_logits(p, cols, row, logits + row * p.logits_stride, y);
      grad_final_row(p, y, sampled_row_lse(p, stats, row), sampled_row_columns(p, stats, row), g, dz);
    }
  });
}

template <typename acc_t>
void sampled_single_pass_rows(const SampledParams& p, const SampledColumns<acc_t>& true_cols,
                              const SampledColumns<acc_t>& candidate_cols, int64_t candidate_offset, acc_t* tile,
                              SampledRowState<acc_t> state,
                              acc_t* loss, acc_t* stats, const acc_t* grad_loss) {
  const SampledParams true_part = sampled_true_part(p), candidate_part = sampled_candidate_part(p);
  const int64_t t = p.num_true, k = p.chunk_columns;
  at::parallel_for(0, p.num_rows, row_grain(t + k), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t* y = tile + row * p.logits_stride;
      acc_t* candidates = y + candidate_offset;
      final_row_logits(true_part, true_cols, row, y, y);
      final_row_logits(candidate_part, candidate_cols, row, candidates, candidates);
      const acc_t g = grad_loss[row];
      const auto skip_row = [&] {  // skipped, not multiplied by 0 (inf/NaN logits)
        std::fill_n(y, t, acc_t(0));
        std::fill_n(candidates, k, acc_t(0));
      };
      if (p.mode == static_cast<int64_t>(SampledMode::kNCE)) {
        // No row statistics: the loss and the gradient in the same sweep.
        state.nce_loss[row] +=
            nce_fold_and_grad_row(true_part, y, g) + nce_fold_and_grad_row(candidate_part, candidates, g);
        sampled_finalize_row(p, row, state, loss, stats);
        if (g == acc_t(0)) skip_row();
        continue;
      }
      const acc_t true_max = fold_final_row<true>(true_part, row, y, state);
      const acc_t candidate_max = fold_final_row<true>(candidate_part, row, candidates, state);
      sampled_finalize_row(p, row, state, loss, stats);
      if (g == acc_t(0)) {
        skip_row();
        continue;
      }
      const LseParts<acc_t> lse = sampled_row_lse(p, stats, row);
      const acc_t unmasked = sampled_row_columns(p, stats, row);
      grad_from_exps_row(true_part, y, true_max, lse, unmasked, g);
      grad_from_exps_row(candidate_part, candidates, candidate_max, lse, unmasked, g);
    }
  });
}

template <typename acc_t>
void sampled_scatter_add_rows(const acc_t* src, const int64_t* index, int64_t rows, int64_t dim, acc_t* dst) {
  for_each_column_block(dim, [&](int64_t c0, int64_t c1) {
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t* s = src + r * dim;
      acc_t* d = dst + index[r] * dim;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) d[c] += s[c];
    }
  });
}

template <typename acc_t>
void sampled_scatter_outer(const acc_t* dz, const acc_t* x, const int64_t* index, int64_t rows, int64_t columns,
                           int64_t dim, acc_t* dst) {
  for_each_column_block(dim, [&](int64_t c0, int64_t c1) {
    for (int64_t i = 0; i < rows; ++i) {
      const acc_t* xr = x + i * dim;
      for (int64_t j = 0; j < columns; ++j) {
        const acc_t g = dz[i * columns + j];
        if (g == acc_t(0)) continue;  // masked columns and zero upstream rows
        acc_t* d = dst + index[i * columns + j] * dim;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) d[c] += g * xr[c];
      }
    }
  });
}

#define FUSEDLOSS_INSTANTIATE_SAMPLED_ROW(in_t, acc_t)                                                      \
  template void sampled_row_dot<in_t, acc_t>(const SampledParams&, const in_t*, const in_t*, const int64_t*, \
                                             int64_t, int64_t, acc_t*, int64_t);                             \
  template void sampled_row_axpy<in_t, acc_t>(const SampledParams&, const acc_t*, int64_t, const in_t*,      \
                                              const int64_t*, int64_t, int64_t, acc_t*);
#define FUSEDLOSS_INSTANTIATE_SAMPLED_COLUMNS(acc_t)                                                          \
  template void sampled_accumulate_chunk<acc_t>(const SampledParams&, const SampledColumns<acc_t>&, acc_t*,   \
                                                SampledRowState<acc_t>);                                      \
  template void sampled_finalize<acc_t>(const SampledParams&, SampledRowState<acc_t>, acc_t*, acc_t*);        \
  template void sampled_single_pass_rows<acc_t>(const SampledParams&, const SampledColumns<acc_t>&,           \
                                                const SampledColumns<acc_t>&, int64_t, acc_t*,                \
                                                SampledRowState<acc_t>,                                       \
                                                acc_t*, acc_t*, const acc_t*);                                \
  template void sampled_scatter_add_rows<acc_t>(const acc_t*, const int64_t*, int64_t, int64_t, acc_t*);      \
  template void sampled_scatter_outer<acc_t>(const acc_t*, const acc_t*, const int64_t*, int64_t, int64_t,    \
                                             int64_t, acc_t*);
#define FUSEDLOSS_INSTANTIATE_SAMPLED_GRAD(acc_t, grad_t)                                                     \
  template void sampled_chunk_grad<acc_t, grad_t>(const SampledParams&, const SampledColumns<acc_t>&,         \
                                                  const acc_t*, const acc_t*, const acc_t*, grad_t*);

FUSEDLOSS_FOR_INPUT_TYPES(FUSEDLOSS_INSTANTIATE_SAMPLED_ROW)
FUSEDLOSS_FOR_ACC_TYPES(FUSEDLOSS_INSTANTIATE_SAMPLED_COLUMNS)
FUSEDLOSS_FOR_DLOGITS_TYPES(FUSEDLOSS_INSTANTIATE_SAMPLED_GRAD)
#undef FUSEDLOSS_INSTANTIATE_SAMPLED_ROW
#undef FUSEDLOSS_INSTANTIATE_SAMPLED_COLUMNS
#undef FUSEDLOSS_INSTANTIATE_SAMPLED_GRAD

}  // namespace fusedloss::cpu
