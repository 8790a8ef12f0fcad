// CPU kernels of the fused linear cross-entropy: row-parallel passes over one
// [N, chunk] tile of logits at a time (the GEMMs live in csrc/linear_ce.cpp).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>

#include "common.h"
#include "fusedloss/linear_ce.h"
#include "fusedloss/dtypes.h"
#include "vec_math.h"

namespace fusedloss::cpu {

namespace {
// Overwrites one row of raw logits with softcap(logit + bias) and returns its
// max and its sum (Σ_j w_j y_j with class weights w). One loop per set of the
// optional terms (with_flag): tested inside the loop they keep it scalar.
template <typename acc_t>
void transform_row(acc_t* y, const acc_t* bias, const acc_t* column_weight, int64_t columns, acc_t cap,
                   acc_t& row_max, acc_t& row_sum) {
  with_flag(bias != nullptr, [&](auto has_bias) {
    with_flag(cap > acc_t(0), [&](auto has_cap) {
      with_flag(column_weight != nullptr, [&](auto has_weight) {
        // Local copies: the captures are references, which the stores to y
        // could alias, so the loop would reload them.
        const acc_t* const b = bias;
        const acc_t* const w = column_weight;
        const acc_t c = cap;
        acc_t* const out = y;
        acc_t m = neg_infinity<acc_t>(), s = 0;
#pragma omp simd reduction(max : m) reduction(+ : s)
        for (int64_t j = 0; j < columns; ++j) {
          acc_t v = out[j];
          if constexpr (decltype(has_bias)::value) v += b[j];
          if constexpr (decltype(has_cap)::value) v = softcap_vectorizable(v, c);
          out[j] = v;
          m = v > m ? v : m;
          if constexpr (decltype(has_weight)::value) s += w[j] * v;
          else s += v;
        }
        row_max = m;
        row_sum = s;
      });
    });
  });
}

// Σ exp(y - max) of a row and, with kStats, Σ exp(y - max)·(y - max) (the
// entropy term); with kKeep the exps overwrite y.
template <bool kStats, bool kKeep, typename acc_t>
void exp_sums(acc_t* y, int64_t columns, acc_t max, acc_t& sum, acc_t& shifted) {
  acc_t s = 0, t = 0;
#pragma omp simd reduction(+ : s, t)
  for (int64_t j = 0; j < columns; ++j) {
    const acc_t d = y[j] - max;
    const acc_t e = exp_vectorizable(d);
    if constexpr (kKeep) y[j] = e;
    s += e;
    if constexpr (kStats) t += e * d;
  }
  sum = s;
  shifted = t;
}

// exp_sums with the statistics' term only when they are asked for: the
// default loop stays the plain one.
template <bool kKeep, typename acc_t>
void row_exp_sums(const LinearCEParams& p, acc_t* y, acc_t max, acc_t& sum, acc_t& shifted) {
  if (p.with_stats) {
    exp_sums<true, kKeep>(y, p.chunk_columns, max, sum, shifted);
  } else {
    exp_sums<false, kKeep>(y, p.chunk_columns, max, sum, shifted);
  }
}

// The first of a row's columns holding its max (torch.argmax's rule on ties);
// 0 when none does (a NaN row).
template <typename acc_t>
int64_t first_max_column(const acc_t* y, int64_t columns, acc_t max) {
  const int64_t first = std::find(y, y + columns, max) - y;
  return first < columns ? first : 0;
}

// Folds one row of the tile (overwritten with softcap(logit + bias)) into its
// state and returns the chunk's max. With kKeep the tile is left holding
// exp(y - chunk max) (the single pass's uncapped rows reuse them).
template <bool kKeep, typename acc_t>
acc_t fold_row(const LinearCEParams& p, int64_t row, acc_t* y, const acc_t* bias, ClassWeights<acc_t> class_weight,
               const int64_t* target, LinearCERowState<acc_t> state) {
  const int64_t columns = p.chunk_columns;
  acc_t chunk_max, chunk_sum_logits, chunk_sum_exp, chunk_shifted;
  transform_row(y, bias, class_weight.columns(p.chunk_start), columns, static_cast<acc_t>(p.softcap), chunk_max,
                chunk_sum_logits);
  const int64_t t = target[row] - p.chunk_start;
  if (t >= 0 && t < columns) state.target_logit[row] = y[t];
  // Scanned while the tile still holds the logits (kKeep overwrites them).
  const int64_t argmax = p.with_stats ? p.chunk_start + first_max_column(y, columns, chunk_max) : 0;
  row_exp_sums<kKeep>(p, y, chunk_max, chunk_sum_exp, chunk_shifted);
  if (p.with_stats) {
    state.store_stats(row, softmax_stats_merge(state.stats(row), SoftmaxStats<acc_t>{chunk_max, chunk_sum_exp,
                                                                                     chunk_shifted, argmax}));
  } else {
    lse_merge_into(state.max[row], state.sum_exp[row], LseState<acc_t>{chunk_max, chunk_sum_exp});
  }
  state.sum_logits[row] += chunk_sum_logits;
  return chunk_max;
}

// Writes one row's dlogits (see linear_ce_chunk_grad).
template <typename acc_t, typename grad_t>
void grad_row(const LinearCEParams& p, int64_t row, const acc_t* z, const acc_t* bias,
              ClassWeights<acc_t> class_weight, const int64_t* target, LseArray<const acc_t> lse,
              const acc_t* grad_loss, grad_t* dz) {
  const int64_t columns = p.chunk_columns;
  if (target[row] == p.ignore_index) {
    // Skipped, not multiplied by 0: a padding row may hold inf/NaN.
    std::fill_n(dz, columns, grad_t(0));
    return;
  }
  const acc_t cap = static_cast<acc_t>(p.softcap);
  const CrossEntropyTerms<acc_t> terms = linear_ce_terms(p, class_weight, target[row]);
  const acc_t g = linear_ce_target_valid(p, target[row]) ? grad_loss[row] : std::numeric_limits<acc_t>::quiet_NaN();
  const LseParts<acc_t> row_lse = lse[row];
  // Everything except the target column is  g * (c1 * p_j - c0 * w_j) * softcap'.
  const acc_t prob_scale = g * terms.prob_coefficient(row_lse.value());
  const acc_t uniform = g * terms.label_smoothing / terms.num_classes;
  const acc_t* column_weight = linear_ce_smoothing_weights(p, class_weight);
  const acc_t row_max = row_lse.max, log_sum = row_lse.log_sum;
  // Read the target's raw logit first: dz may overwrite z.
  const int64_t t = target[row] - p.chunk_start;
  const bool target_here = t >= 0 && t < columns;
  const acc_t target_z = target_here ? z[t] : acc_t(0);
  const acc_t* column_bias = p.tile_transformed ? nullptr : bias;
  const acc_t tile_cap = p.tile_transformed ? acc_t(0) : cap;
  // The softcap: none, its gradient only (the tile holds softcapped logits),
  // or applied and differentiated; one loop per mode and per optional term.
  const int cap_mode = cap <= acc_t(0) ? 0 : tile_cap > acc_t(0) ? 2 : 1;
  const auto each_column = [&](auto has_bias, auto has_weight, auto cap_tag) {
    constexpr int kCapMode = decltype(cap_tag)::value;
    // Local copies (see transform_row).
    const acc_t* const in = z;
    const acc_t* const b = column_bias;
    const acc_t* const w = column_weight;
    grad_t* const out = dz;
    const acc_t c = cap, scale = prob_scale, u = uniform, shift_max = row_max, shift_log = log_sum;
#pragma omp simd
    for (int64_t j = 0; j < columns; ++j) {
      acc_t y = in[j];
      if constexpr (decltype(has_bias)::value) y += b[j];
      if constexpr (kCapMode == 2) y = softcap_vectorizable(y, c);
      acc_t d = scale * exp_vectorizable((y - shift_max) - shift_log);
      if constexpr (decltype(has_weight)::value) d -= u * w[j];
      else d -= u;
      if constexpr (kCapMode > 0) d *= softcap_grad_from_output(y, c);
      out[j] = static_cast<grad_t>(d);
    }
  };
  with_flag(column_bias != nullptr, [&](auto has_bias) {
    with_flag(column_weight != nullptr, [&](auto has_weight) {
      if (cap_mode == 0) each_column(has_bias, has_weight, std::integral_constant<int, 0>{});
      else if (cap_mode == 1) each_column(has_bias, has_weight, std::integral_constant<int, 1>{});
      else each_column(has_bias, has_weight, std::integral_constant<int, 2>{});
    });
  });
  if (target_here) {
    // The target column also carries the one-hot term.
    const acc_t y = softcap_apply(target_z + (column_bias ? column_bias[t] : acc_t(0)), tile_cap);
    const acc_t d = g * terms.logit_grad(exp_acc(row_lse.log_prob(y)), true, row_lse.value(),
                                         column_weight ? column_weight[t] : acc_t(1)) *
                    softcap_grad_from_output(y, cap);
    dz[t] = static_cast<grad_t>(d);
  }
}
}  // namespace

template <typename acc_t>
void linear_ce_accumulate_chunk(const LinearCEParams& p, acc_t* logits, const acc_t* bias,
                                ClassWeights<acc_t> class_weight, const int64_t* target,
                                LinearCERowState<acc_t> state) {
  at::parallel_for(0, p.num_rows, row_grain(p.chunk_columns), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      fold_row<false>(p, row, logits + row * p.logits_stride, bias, class_weight, target, state);
    }
  });
}

template <typename acc_t>
void linear_ce_finalize(const LinearCEParams& p, const int64_t* target, ClassWeights<acc_t> class_weight,
                        LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss) {
  for_each_row(p.num_rows,
               [&](int64_t row) { linear_ce_finalize_row(p, row, target, class_weight, state, lse, loss); });
}

template <typename acc_t, typename grad_t>
void linear_ce_chunk_grad(const LinearCEParams& p, const acc_t* logits, const acc_t* bias,
                          ClassWeights<acc_t> class_weight, const int64_t* target, LseArray<const acc_t> lse,
                          const acc_t* grad_loss, grad_t* dlogits) {
  at::parallel_for(0, p.num_rows, row_grain(p.chunk_columns), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      grad_row(p, row, logits + row * p.logits_stride, bias, class_weight, target, lse, grad_loss,
               dlogits + row * p.dlogits_stride);
    }
  });
}

// Without a softcap, the single pass keeps exp(y - row max) in the tile from
// the fold's sum and forms the probabilities from it: one exp per element
// instead of two. The tile holds a whole row, so the row's max is the fold's.
template <typename acc_t, typename grad_t>
void fold_and_grad_uncapped_row(const LinearCEParams& p, int64_t row, acc_t* y, const acc_t* bias,
                                ClassWeights<acc_t> class_weight, const int64_t* target,
                                LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss,
                                const acc_t* grad_loss, grad_t* dz) {
  const int64_t columns = p.chunk_columns;
  const acc_t row_max = fold_row<true>(p, row, y, bias, class_weight, target, state);
  linear_ce_finalize_row(p, row, target, class_weight, state, lse, loss);
  if (target[row] == p.ignore_index) {
    std::fill_n(dz, columns, grad_t(0));  // skipped, not multiplied by 0 (inf/NaN padding)
    return;
  }
  const int64_t t = target[row] - p.chunk_start;
  const CrossEntropyTerms<acc_t> terms = linear_ce_terms(p, class_weight, target[row]);
  const acc_t g = linear_ce_target_valid(p, target[row]) ? grad_loss[row] : std::numeric_limits<acc_t>::quiet_NaN();
  const LseParts<acc_t> row_lse = lse[row];
  // p_j = exp(y_j - row_max) * exp((row_max - lse.max) - lse.log_sum).
  const acc_t to_prob = exp_acc((row_max - row_lse.max) - row_lse.log_sum);
  const acc_t prob_scale = g * terms.prob_coefficient(row_lse.value()) * to_prob;
  const acc_t uniform = g * terms.label_smoothing / terms.num_classes;
  const acc_t* column_weight = linear_ce_smoothing_weights(p, class_weight);
  const acc_t target_e = t >= 0 && t < columns ? y[t] : acc_t(0);  // read before dz may overwrite it
  with_flag(column_weight != nullptr, [&](auto has_weight) {
    // Local copies (see transform_row).
    const acc_t* const e = y;
    const acc_t* const w = column_weight;
    grad_t* const out = dz;
    const acc_t scale = prob_scale, u = uniform;
#pragma omp simd
    for (int64_t j = 0; j < columns; ++j) {
      if constexpr (decltype(has_weight)::value) out[j] = static_cast<grad_t>(scale * e[j] - u * w[j]);
      else out[j] = static_cast<grad_t>(scale * e[j] - u);
    }
  });
  if (t >= 0 && t < columns) {
    dz[t] = static_cast<grad_t>(g * terms.logit_grad(target_e * to_prob, true, row_lse.value(),
                                                     column_weight ? column_weight[t] : acc_t(1)));
  }
}

// Each row is folded, finalized and turned into dlogits while it is still in
// the core's cache: one trip of the tile through memory instead of three.
template <typename acc_t, typename grad_t>
void linear_ce_single_pass_rows(const LinearCEParams& p, acc_t* logits, const acc_t* bias,
                                ClassWeights<acc_t> class_weight, const int64_t* target,
                                LinearCERowState<acc_t> state, LseArray<acc_t> lse, acc_t* loss,
                                const acc_t* grad_loss, grad_t* dlogits) {
  LinearCEParams transformed = p;
  transformed.tile_transformed = true;
  const LseArray<const acc_t> row_lse{lse.max, lse.log_sum};
  at::parallel_for(0, p.num_rows, row_grain(p.chunk_columns), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      acc_t* y = logits + row * p.logits_stride;
      grad_t* dz = dlogits + row * p.dlogits_stride;
      if (p.softcap <= 0.0) {
        fold_and_grad_uncapped_row(p, row, y, bias, class_weight, target, state, lse, loss, grad_loss, dz);
        continue;
      }
      fold_row<false>(p, row, y, bias, class_weight, target, state);
      linear_ce_finalize_row(p, row, target, class_weight, state, lse, loss);
      grad_row(transformed, row, y, bias, class_weight, target, row_lse, grad_loss, dz);
    }
  });
}

#define FUSEDLOSS_INSTANTIATE_LINEAR_CE_CPU(acc_t)                                             \
  template void linear_ce_accumulate_chunk<acc_t>(const LinearCEParams&, acc_t*, const acc_t*, \
                                                  ClassWeights<acc_t>, const int64_t*,         \
                                                  LinearCERowState<acc_t>);                    \
  template void linear_ce_finalize<acc_t>(const LinearCEParams&, const int64_t*, ClassWeights<acc_t>, \
                                          LinearCERowState<acc_t>, LseArray<acc_t>, acc_t*);
#define FUSEDLOSS_INSTANTIATE_LINEAR_CE_GRAD_CPU(acc_t, grad_t)                                  \
  template void linear_ce_chunk_grad<acc_t, grad_t>(const LinearCEParams&, const acc_t*,         \
                                                    const acc_t*, ClassWeights<acc_t>,           \
                                                    const int64_t*, LseArray<const acc_t>,       \
                                                    const acc_t*, grad_t*);                      \
  template void linear_ce_single_pass_rows<acc_t, grad_t>(                                       \
      const LinearCEParams&, acc_t*, const acc_t*, ClassWeights<acc_t>, const int64_t*,          \
      LinearCERowState<acc_t>, LseArray<acc_t>, acc_t*, const acc_t*, grad_t*);

FUSEDLOSS_FOR_ACC_TYPES(FUSEDLOSS_INSTANTIATE_LINEAR_CE_CPU)
FUSEDLOSS_FOR_DLOGITS_TYPES(FUSEDLOSS_INSTANTIATE_LINEAR_CE_GRAD_CPU)
#undef FUSEDLOSS_INSTANTIATE_LINEAR_CE_CPU
#undef FUSEDLOSS_INSTANTIATE_LINEAR_CE_GRAD_CPU

}  // namespace fusedloss::cpu
