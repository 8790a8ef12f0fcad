// CPU kernels of the InfoNCE family: passes over one [R, tile] block of dot
// products at a time (the GEMMs live in csrc/contrastive.cpp). Rows are
// processed in parallel; the column-wise LSE walks the block in column strips
// so that each row visit reads a contiguous, vectorisable run.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "fusedloss/contrastive.h"
#include "fusedloss/dtypes.h"
#include "vec_math.h"

namespace fusedloss::cpu {

namespace {
// Columns per strip of the column-wise pass: the strip's running max and sum
// stay in registers / L1 while the rows stream past.
constexpr int64_t kColumnStrip = 32;

// exp(scale * dot - shift) of chunk entry j of a row with ids, exactly 0
// where the entry is excluded (`hit`: entries.match(j)). The exclusion
// selects the exp's argument (a constant with a finite exp, so no inf * 0)
// and weights the result by 0/1: GCC leaves the id loops scalar when the
// result itself is selected (the faster form of the loops without ids).
template <typename acc_t>
acc_t id_entry_exp(const ContrastiveRowEntries<true, acc_t> entries, int64_t j, bool hit, acc_t dot, acc_t shift) {
  const bool out = entries.excluded(j, hit);
  const acc_t arg = out ? acc_t(-100) : entries.scale(j, hit) * dot - shift;
  return (out ? acc_t(0) : acc_t(1)) * exp_vectorizable(arg);
}

// Records the row's positive logit when its column is in this chunk and
// returns the row's max over the chunk's entries that are not excluded
// (-inf when all are). The mask is applied before the max: the
// self-similarity is usually the largest logit and would otherwise be a
// shift that underflows every term.
template <bool kIds, typename acc_t>
acc_t record_positive_and_max(const ContrastiveParams& p, int64_t row, const acc_t* y, acc_t s, int64_t masked,
                              int64_t t, ContrastiveRowState<acc_t> state) {
  const int64_t columns = p.chunk_columns;
  if (t >= 0 && t < columns) state.positive_logit[row] = contrastive_positive_logit(y[t], s, t == masked);
  const auto entries = p.template row_entries<kIds>(row, masked, t, s);
  acc_t m = neg_infinity<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < columns; ++j) {
    const bool hit = entries.match(j);
    const acc_t v = contrastive_logit(y[j], entries.scale(j, hit), entries.excluded(j, hit));
    m = v > m ? v : m;
  }
  return m;
}

// Folds one row of raw dot products into its state (and records its positive
// logit when its column is here); returns the chunk's max of the row. With
// kKeep, exp(logit - that max) of every column (0 where excluded) goes to `kept`.
template <bool kIds, bool kKeep = false, typename acc_t>
acc_t fold_row(const ContrastiveParams& p, int64_t row, const acc_t* y, acc_t s, const int64_t* positives,
               ContrastiveRowState<acc_t> state, acc_t* kept = nullptr) {
  const int64_t columns = p.chunk_columns;
  const int64_t masked = p.masked_chunk_column(row);
  const int64_t t = positives[row] - p.chunk_start;
  const acc_t m = record_positive_and_max<kIds>(p, row, y, s, masked, t, state);
  if (m == neg_infinity<acc_t>()) return m;  // every column of this tile masked
  acc_t sum = 0;
  // One loop each: GCC vectorises neither form inside the other's loop.
  if constexpr (kIds) {
    const auto entries = p.template row_entries<kIds>(row, masked, t, s);
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < columns; ++j) {
      const acc_t e = id_entry_exp(entries, j, entries.match(j), y[j], m);
      sum += e;
      if constexpr (kKeep) kept[j] = e;
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < columns; ++j) {
      const acc_t e = exp_vectorizable(s * y[j] - m);
      const acc_t live = j == masked ? acc_t(0) : e;
      sum += live;
      if constexpr (kKeep) kept[j] = live;
    }
  }
  lse_merge_into(state.max[row], state.sum_exp[row], LseState<acc_t>{m, sum});
  return m;
}

// Column statistics of the symmetric loss for the chunk's columns (absent
// for the one-directional loss).
template <typename acc_t>
struct ColumnTerms {
  const acc_t* max = nullptr;
  const acc_t* log_sum = nullptr;
  const acc_t* grad = nullptr;
};

template <bool kSymmetric, typename acc_t>
ColumnTerms<acc_t> column_terms(const ContrastiveParams& p, LseArray<const acc_t> col_lse, const acc_t* col_grad) {
  if constexpr (!kSymmetric) return {};
  return {col_lse.max + p.chunk_start, col_lse.log_sum + p.chunk_start, col_grad + p.chunk_start};
}

// The row and column softmax probabilities of entry j with logit x, from the
// finished row and column LSEs: two exps.
template <bool kSymmetric, typename acc_t>
struct ExactProbs {
  LseParts<acc_t> row_lse;
  ColumnTerms<acc_t> cols;
  acc_t row(int64_t /*j*/, acc_t x) const { return exp_vectorizable(row_lse.log_prob(x)); }
  acc_t col(int64_t j, acc_t x) const {
    if constexpr (kSymmetric) return exp_vectorizable((x - cols.max[j]) - cols.log_sum[j]);
    return 0;
  }
};

// The same from the row's kept exps e_j = exp(x_j - m) (fold_row<kKeep>):
// row p_j = e_j * exp(m - row lse); column p_j = e_j * exp(m - L) * c_j with
// c_j = exp(L - column lse_j) (see contrastive_single_pass_rows): products,
// no exp. Valid where m - L is small enough for both factors (row_factorizes).
template <typename acc_t>
struct KeptProbs {
  const acc_t* kept;
  acc_t to_row, to_col;
  const acc_t* col_factor;
  acc_t row(int64_t j, acc_t /*x*/) const { return kept[j] * to_row; }
  acc_t col(int64_t j, acc_t /*x*/) const { return kept[j] * to_col * col_factor[j]; }
};

// scale * dLoss/dlogits of one row of raw dot products `z` into `dz` (which
// may alias z: each element is read before it is written), with the
// probabilities from `probs` (ExactProbs or KeptProbs).
// Returns the row's term of d loss / d scale, sum_j dLoss/dlogit_j * dot_j,
// in the accumulation dtype (before dz is rounded).
template <bool kSymmetric, bool kIds, typename acc_t, typename grad_t, typename Probs>
acc_t grad_row(const ContrastiveParams& p, int64_t row, const acc_t* z, acc_t s, const int64_t* positives,
               const Probs probs, ColumnTerms<acc_t> cols, const acc_t* row_grad, grad_t* dz) {
  const acc_t g = row_grad[row];
  const int64_t t = positives[row] - p.chunk_start;
  const auto entries = p.template row_entries<kIds>(row, p.masked_chunk_column(row), t, s);
  acc_t scale_grad = 0;
#pragma omp simd reduction(+ : scale_grad)
  for (int64_t j = 0; j < p.chunk_columns; ++j) {
    const acc_t dot = z[j];
    const bool hit = entries.match(j);
    const bool out = entries.excluded(j, hit);
    // With ids, an excluded entry's probabilities are taken at the lowest
    // finite logit (they vanish against any finite row or column lse) and its
    // gradient weighted by 0: id_entry_exp's form, which vectorises there;
    // without ids the select of d does.
    const acc_t x = kIds && out ? std::numeric_limits<acc_t>::lowest() : entries.scale(j, hit) * dot;
    acc_t col_prob = 0, col_g = 0;
    if constexpr (kSymmetric) {
      col_prob = probs.col(j, x);
      col_g = cols.grad[j];
    }
    const acc_t d = contrastive_logit_grad(probs.row(j, x), g, col_prob, col_g, j == t, kSymmetric);
    const acc_t kept = kIds ? (out ? acc_t(0) : acc_t(1)) * d : (out ? acc_t(0) : d);
    scale_grad += kept * (out ? acc_t(0) : dot);
    // d logits / d dot = scale: the GEMMs consume raw operands.
    dz[j] = static_cast<grad_t>(s * kept);
  }
  return scale_grad;
}

// The one-directional single pass of one row that holds every column: the
// fold keeps exp(logit - max) in the tile and the gradient reuses it, one exp
// per element.
template <bool kIds, typename acc_t, typename grad_t>
acc_t fold_and_grad_row(const ContrastiveParams& p, int64_t row, acc_t* y, acc_t s, const int64_t* positives,
                        ContrastiveRowState<acc_t> state, LseArray<acc_t> row_lse, acc_t* loss, acc_t g,
                        grad_t* dz) {
  const int64_t columns = p.chunk_columns;
  const int64_t masked = p.masked_chunk_column(row);
  const int64_t t = positives[row] - p.chunk_start;
  const bool positive_here = t >= 0 && t < columns;
  const acc_t m = record_positive_and_max<kIds>(p, row, y, s, masked, t, state);
  const acc_t positive_dot = positive_here ? y[t] : acc_t(0);
  acc_t sum = 0, weighted_dots = 0;  // sum of e_j and of e_j * dot_j (for d loss / d scale)
  // One loop each, as in fold_row.
  if constexpr (kIds) {
    const auto entries = p.template row_entries<kIds>(row, masked, t, s);
#pragma omp simd reduction(+ : sum, weighted_dots)
    for (int64_t j = 0; j < columns; ++j) {
      const acc_t dot = y[j];
      const acc_t e = id_entry_exp(entries, j, entries.match(j), dot, m);
      y[j] = e;
      sum += e;
      weighted_dots += e * dot;
    }
  } else {
#pragma omp simd reduction(+ : sum, weighted_dots)
    for (int64_t j = 0; j < columns; ++j) {
      // exp computed unconditionally and then selected: a select vectorises, a branch not.
      const acc_t dot = y[j];
      const acc_t exp_logit = exp_vectorizable(s * dot - m);
      const acc_t e = j == masked ? acc_t(0) : exp_logit;
      y[j] = e;
      sum += e;
      weighted_dots += e * dot;
    }
  }
  if (m != neg_infinity<acc_t>()) lse_merge_into(state.max[row], state.sum_exp[row], LseState<acc_t>{m, sum});
  contrastive_finalize_row(p, row, positives, state, LseArray<const acc_t>{nullptr, nullptr}, row_lse, loss);
  if (m == neg_infinity<acc_t>()) {  // no column to differentiate
    std::fill_n(dz, columns, grad_t(0));
    return 0;
  }
  // p_j = exp(logit_j - m) * exp((m - lse.max) - lse.log_sum).
  const LseParts<acc_t> lse = row_lse[row];
  const acc_t to_prob = exp_acc((m - lse.max) - lse.log_sum);
  const acc_t to_grad = s * g * to_prob;
  const bool one_hot = positive_here && t != masked;
  const acc_t positive_e = positive_here ? y[t] : acc_t(0);  // read before dz may overwrite it
#pragma omp simd
  for (int64_t j = 0; j < columns; ++j) dz[j] = static_cast<grad_t>(to_grad * y[j]);
  if (one_hot) dz[t] = static_cast<grad_t>(to_grad * positive_e - s * g);
  // d loss / d scale = g * (sum_j p_j dot_j - dot_positive).
  return g * (weighted_dots * to_prob - (one_hot ? positive_dot : acc_t(0)));
}
}  // namespace

template <typename acc_t>
void contrastive_accumulate_chunk(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                           const int64_t* positives, ContrastiveRowState<acc_t> state) {
  const acc_t s = *scale;
  with_flag(p.ids.any(), [&](auto ids_tag) {
    constexpr bool kIds = decltype(ids_tag)::value;
    at::parallel_for(0, p.num_rows, row_grain(p.chunk_columns), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        fold_row<kIds>(p, row, tile + row * p.logits_stride, s, positives, state);
      }
    });
  });
}

template <typename acc_t>
void contrastive_chunk_column_lse(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                              const int64_t* positives, LseArray<acc_t> col_lse, acc_t* /*scratch*/) {
  const acc_t s = *scale;
  const int64_t strips = (p.chunk_columns + kColumnStrip - 1) / kColumnStrip;
  with_flag(p.ids.any(), [&](auto ids_tag) {
    constexpr bool kIds = decltype(ids_tag)::value;
    at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
      for (int64_t strip = begin; strip < end; ++strip) {
        const int64_t c0 = strip * kColumnStrip;
        const int64_t width = std::min(kColumnStrip, p.chunk_columns - c0);
        acc_t m[kColumnStrip], sum[kColumnStrip];
        std::fill_n(m, kColumnStrip, neg_infinity<acc_t>());
        std::fill_n(sum, kColumnStrip, acc_t(0));
        // Row `row`'s entries, indexed from the strip's first column.
        const auto strip_entries = [&](int64_t row) {
          const int64_t masked = p.masked_chunk_column(row);
          return p.template row_entries<true>(row, masked < 0 ? -1 : masked - c0,
                                              positives[row] - p.chunk_start - c0, s, c0);
        };
        // Two sweeps (max, then sum of exp) keep the inner loops branch-free;
        // each with and without ids (GCC vectorises neither form inside the
        // other's loop).
        for (int64_t row = 0; row < p.num_rows; ++row) {
          const acc_t* y = tile + row * p.logits_stride + c0;
          if constexpr (kIds) {
            const auto entries = strip_entries(row);
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) {
              const bool hit = entries.match(j);
              const acc_t v = contrastive_logit(y[j], entries.scale(j, hit), entries.excluded(j, hit));
              m[j] = v > m[j] ? v : m[j];
            }
          } else {
            const int64_t masked = p.masked_chunk_column(row);
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) {
              const acc_t v = contrastive_logit(y[j], s, c0 + j == masked);
              m[j] = v > m[j] ? v : m[j];
            }
          }
        }
        for (int64_t row = 0; row < p.num_rows; ++row) {
          const acc_t* y = tile + row * p.logits_stride + c0;
          if constexpr (kIds) {
            const auto entries = strip_entries(row);
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) sum[j] += id_entry_exp(entries, j, entries.match(j), y[j], m[j]);
          } else {
            const int64_t masked = p.masked_chunk_column(row);
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) {
              // exp computed unconditionally and then selected: a select vectorises, a branch not.
              const acc_t e = exp_vectorizable(s * y[j] - m[j]);
              sum[j] += c0 + j == masked ? acc_t(0) : e;
            }
          }
        }
        for (int64_t j = 0; j < width; ++j) {
          col_lse.store(p.chunk_start + c0 + j, LseState<acc_t>{m[j], sum[j]}.parts());
        }
      }
    });
  });
}

template <typename acc_t>
void contrastive_finalize(const ContrastiveParams& p, const int64_t* positives,
                          ContrastiveRowState<acc_t> state, LseArray<const acc_t> col_lse,
                          LseArray<acc_t> row_lse, acc_t* loss) {
  for_each_row(p.num_rows,
               [&](int64_t row) { contrastive_finalize_row(p, row, positives, state, col_lse, row_lse, loss); });
}

template <typename acc_t, typename grad_t>
void contrastive_chunk_grad(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                           const int64_t* positives, LseArray<const acc_t> row_lse,
                           LseArray<const acc_t> col_lse, const acc_t* row_grad, const acc_t* col_grad,
                           grad_t* dlogits, acc_t* scale_grad_rows) {
  const acc_t s = *scale;
  // One loop per variant, so that none carries a conditional load.
  const auto run = [&](auto symmetric_tag, auto ids_tag) {
    constexpr bool kSymmetric = decltype(symmetric_tag)::value;
    constexpr bool kIds = decltype(ids_tag)::value;
    const ColumnTerms<acc_t> cols = column_terms<kSymmetric>(p, col_lse, col_grad);
    at::parallel_for(0, p.num_rows, row_grain(p.chunk_columns), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const ExactProbs<kSymmetric, acc_t> probs{row_lse[row], cols};
        const acc_t scale_grad = grad_row<kSymmetric, kIds>(p, row, tile + row * p.logits_stride, s, positives,
                                                            probs, cols, row_grad, dlogits + row * p.dlogits_stride);
        if (scale_grad_rows != nullptr) scale_grad_rows[row] += scale_grad;
      }
    });
  };
  with_flag(p.ids.any(), [&](auto ids_tag) {
    if (p.symmetric) run(std::true_type{}, ids_tag);
    else run(std::false_type{}, ids_tag);
  });
}

template <typename acc_t, typename grad_t>
void contrastive_single_pass_rows(const ContrastiveParams& p, acc_t* tile, const acc_t* scale,
                                  const int64_t* positives, ContrastiveRowState<acc_t> state,
                                  LseArray<const acc_t> col_lse, LseArray<acc_t> row_lse, acc_t* loss,
                                  const acc_t* row_grad, const acc_t* col_grad, grad_t* dlogits,
                                  acc_t* scale_grad_rows) {
  const acc_t s = *scale;
  const LseArray<const acc_t> finished_row_lse{row_lse.max, row_lse.log_sum};
  const ColumnTerms<acc_t> cols = p.symmetric ? column_terms<true>(p, col_lse, col_grad) : ColumnTerms<acc_t>{};
  // The symmetric gradient needs each entry's row and column probability.
  // Both are the row's kept exp e = exp(x - m) times a factor: exp(m - row
  // lse) and exp(m - column lse_j) = exp(m - L) * c_j, with L the least column
  // lse and c_j = exp(L - column lse_j) <= 1 — products instead of two exps
  // per entry. A row takes them when m - L <= kFactorRange: exp(m - L) stays
  // finite, and an exp that fold_row clamped (x - m < -87) belongs to a
  // column probability below exp(kFactorRange - 87) ≈ 1e-20, negligible;
  // other rows (and any column lse that is not finite) take the exact exps.
  constexpr acc_t kFactorRange = 40;
  std::vector<acc_t> col_factor;
  acc_t least_col_lse = std::numeric_limits<acc_t>::infinity();
  if (p.symmetric) {
    bool finite = true;
    for (int64_t j = 0; j < p.chunk_columns; ++j) {
      const acc_t lse = cols.max[j] + cols.log_sum[j];
      finite = finite && std::isfinite(lse);
      least_col_lse = std::min(least_col_lse, lse);
    }
    if (finite) {
      col_factor.resize(p.chunk_columns);
      for (int64_t j = 0; j < p.chunk_columns; ++j) {
        col_factor[j] = exp_acc(least_col_lse - (cols.max[j] + cols.log_sum[j]));
      }
    }
  }
  with_flag(p.ids.any(), [&](auto ids_tag) {
    constexpr bool kIds = decltype(ids_tag)::value;
    at::parallel_for(0, p.num_rows, row_grain(p.chunk_columns), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> kept(p.symmetric && !col_factor.empty() ? p.chunk_columns : 0);
      for (int64_t row = begin; row < end; ++row) {
        acc_t* y = tile + row * p.logits_stride;
        grad_t* dz = dlogits + row * p.dlogits_stride;
        acc_t scale_grad;
        if (!p.symmetric) {
          scale_grad = fold_and_grad_row<kIds>(p, row, y, s, positives, state, row_lse, loss, row_grad[row], dz);
        } else if (kept.empty()) {
          // The column term needs the raw logits: the tile is only read until
          // the gradient pass of the row.
          fold_row<kIds>(p, row, y, s, positives, state);
          contrastive_finalize_row(p, row, positives, state, col_lse, row_lse, loss);
          const ExactProbs<true, acc_t> probs{finished_row_lse[row], cols};
          scale_grad = grad_row<true, kIds>(p, row, y, s, positives, probs, cols, row_grad, dz);
        } else {
          const acc_t m = fold_row<kIds, true>(p, row, y, s, positives, state, kept.data());
          contrastive_finalize_row(p, row, positives, state, col_lse, row_lse, loss);
          const LseParts<acc_t> lse = finished_row_lse[row];
          if (std::isfinite(m) && m - least_col_lse <= kFactorRange) {
            const KeptProbs<acc_t> probs{kept.data(), exp_acc((m - lse.max) - lse.log_sum),
                                         exp_acc(m - least_col_lse), col_factor.data()};
            scale_grad = grad_row<true, kIds>(p, row, y, s, positives, probs, cols, row_grad, dz);
          } else {
            const ExactProbs<true, acc_t> probs{lse, cols};
            scale_grad = grad_row<true, kIds>(p, row, y, s, positives, probs, cols, row_grad, dz);
          }
        }
        if (scale_grad_rows != nullptr) scale_grad_rows[row] += scale_grad;
      }
    });
  });
}

#define FUSEDLOSS_INSTANTIATE_CONTRASTIVE_CPU(acc_t)                                                    \
  template void contrastive_accumulate_chunk<acc_t>(const ContrastiveParams&, const acc_t*, const acc_t*,       \
                                             const int64_t*, ContrastiveRowState<acc_t>);                \
  template void contrastive_chunk_column_lse<acc_t>(const ContrastiveParams&, const acc_t*, const acc_t*,    \
                                                const int64_t*, LseArray<acc_t>, acc_t*);                \
  template void contrastive_finalize<acc_t>(const ContrastiveParams&, const int64_t*,                    \
                                            ContrastiveRowState<acc_t>, LseArray<const acc_t>,           \
                                            LseArray<acc_t>, acc_t*);
#define FUSEDLOSS_INSTANTIATE_CONTRASTIVE_GRAD_CPU(acc_t, grad_t)                                       \
  template void contrastive_chunk_grad<acc_t, grad_t>(const ContrastiveParams&, const acc_t*,             \
                                                     const acc_t*, const int64_t*, LseArray<const acc_t>, \
                                                     LseArray<const acc_t>, const acc_t*, const acc_t*,   \
                                                     grad_t*, acc_t*);                                            \
  template void contrastive_single_pass_rows<acc_t, grad_t>(                                              \
      const ContrastiveParams&, acc_t*, const acc_t*, const int64_t*, ContrastiveRowState<acc_t>,         \
      LseArray<const acc_t>, LseArray<acc_t>, acc_t*, const acc_t*, const acc_t*, grad_t*, acc_t*);

FUSEDLOSS_FOR_ACC_TYPES(FUSEDLOSS_INSTANTIATE_CONTRASTIVE_CPU)
FUSEDLOSS_FOR_DLOGITS_TYPES(FUSEDLOSS_INSTANTIATE_CONTRASTIVE_GRAD_CPU)
#undef FUSEDLOSS_INSTANTIATE_CONTRASTIVE_CPU
#undef FUSEDLOSS_INSTANTIATE_CONTRASTIVE_GRAD_CPU

}  // namespace fusedloss::cpu
