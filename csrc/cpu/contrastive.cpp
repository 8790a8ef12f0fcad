// CPU kernels of the InfoNCE family: passes over one [R, tile] block of dot
// products at a time (the GEMMs live in csrc/contrastive.cpp). Rows are
// processed in parallel; the column-wise LSE walks the block in column strips
// so that each row visit reads a contiguous, vectorisable run.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "common.h"
#include "fusedloss/contrastive.h"
#include "fusedloss/dtypes.h"
#include "vec_math.h"

namespace fusedloss::cpu {

namespace {
// Columns per strip of the column-wise pass: the strip's running max and sum
// stay in registers / L1 while the rows stream past.
constexpr int64_t kColumnStrip = 32;
}  // namespace

template <typename acc_t>
void contrastive_accumulate_chunk(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                           const int64_t* positives, ContrastiveRowState<acc_t> state) {
  const int64_t columns = p.chunk_columns;
  const acc_t s = *scale;
  at::parallel_for(0, p.num_rows, row_grain(columns), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const acc_t* y = tile + row * p.logits_stride;
      // The mask is applied before the max: the self-similarity is usually the
      // largest logit and would otherwise be a shift that underflows every term.
      const int64_t masked = p.masked_chunk_column(row);
      acc_t m = neg_infinity<acc_t>();
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < columns; ++j) {
        const acc_t v = contrastive_logit(y[j], s, j == masked);
        m = v > m ? v : m;
      }
      if (m == neg_infinity<acc_t>()) continue;  // every column of this tile masked
      acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < columns; ++j) {
        const acc_t e = exp_vectorizable(s * y[j] - m);
        sum += j == masked ? acc_t(0) : e;
      }
      lse_merge_into(state.max[row], state.sum_exp[row], LseState<acc_t>{m, sum});
      const int64_t t = positives[row] - p.chunk_start;
      if (t >= 0 && t < columns) state.positive_logit[row] = contrastive_positive_logit(y[t], s, t == masked);
    }
  });
}

template <typename acc_t>
void contrastive_chunk_column_lse(const ContrastiveParams& p, const acc_t* tile, const acc_t* scale,
                              LseArray<acc_t> col_lse, acc_t* /*scratch*/) {
  const acc_t s = *scale;
  const int64_t strips = (p.chunk_columns + kColumnStrip - 1) / kColumnStrip;
  at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
    for (int64_t strip = begin; strip < end; ++strip) {
      const int64_t c0 = strip * kColumnStrip;
      const int64_t width = std::min(kColumnStrip, p.chunk_columns - c0);
      acc_t m[kColumnStrip], sum[kColumnStrip];
      std::fill_n(m, kColumnStrip, neg_infinity<acc_t>());
      std::fill_n(sum, kColumnStrip, acc_t(0));
      // Two sweeps (max, then sum of exp) keep the inner loops branch-free.
      for (int64_t row = 0; row < p.num_rows; ++row) {
        const acc_t* y = tile + row * p.logits_stride + c0;
        const int64_t masked = p.masked_chunk_column(row) - c0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          const acc_t v = contrastive_logit(y[j], s, j == masked);
          m[j] = v > m[j] ? v : m[j];
        }
      }
      for (int64_t row = 0; row < p.num_rows; ++row) {
        const acc_t* y = tile + row * p.logits_stride + c0;
        const int64_t masked = p.masked_chunk_column(row) - c0;
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) {
          // exp computed unconditionally and then selected: a select vectorises, a branch not.
          const acc_t e = exp_vectorizable(s * y[j] - m[j]);
          sum[j] += j == masked ? acc_t(0) : e;
        }
      }
      for (int64_t j = 0; j < width; ++j) {
        col_lse.store(p.chunk_start + c0 + j, LseState<acc_t>{m[j], sum[j]}.parts());
      }
    }
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
                           grad_t* dlogits) {
  const int64_t columns = p.chunk_columns;
  const acc_t s = *scale;
  // One loop per variant, so that neither carries a conditional load.
  const auto run = [&](auto symmetric_tag) {
    constexpr bool kSymmetric = decltype(symmetric_tag)::value;
    const acc_t* tile_col_max = kSymmetric ? col_lse.max + p.chunk_start : nullptr;
    const acc_t* tile_col_log_sum = kSymmetric ? col_lse.log_sum + p.chunk_start : nullptr;
    const acc_t* tile_col_grad = kSymmetric ? col_grad + p.chunk_start : nullptr;
    at::parallel_for(0, p.num_rows, row_grain(columns), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const acc_t* z = tile + row * p.logits_stride;
        grad_t* dz = dlogits + row * p.logits_stride;
        const LseParts<acc_t> lse = row_lse[row];
        const acc_t g = row_grad[row];
        const int64_t t = positives[row] - p.chunk_start;
        const int64_t masked = p.masked_chunk_column(row);
#pragma omp simd
        for (int64_t j = 0; j < columns; ++j) {
          const acc_t x = s * z[j];
          acc_t col_prob = 0, col_g = 0;
          if constexpr (kSymmetric) {
            col_prob = exp_vectorizable((x - tile_col_max[j]) - tile_col_log_sum[j]);
            col_g = tile_col_grad[j];
          }
          const acc_t d =
              contrastive_logit_grad(exp_vectorizable(lse.log_prob(x)), g, col_prob, col_g, j == t, kSymmetric);
          // d logits / d dot = scale: the GEMMs consume raw operands.
          dz[j] = static_cast<grad_t>(j == masked ? acc_t(0) : s * d);
        }
      }
    });
  };
  if (p.symmetric) run(std::true_type{});
  else run(std::false_type{});
}

#define FUSEDLOSS_INSTANTIATE_CONTRASTIVE_CPU(acc_t)                                                    \
  template void contrastive_accumulate_chunk<acc_t>(const ContrastiveParams&, const acc_t*, const acc_t*,       \
                                             const int64_t*, ContrastiveRowState<acc_t>);                \
  template void contrastive_chunk_column_lse<acc_t>(const ContrastiveParams&, const acc_t*, const acc_t*,    \
                                                LseArray<acc_t>, acc_t*);                                \
  template void contrastive_finalize<acc_t>(const ContrastiveParams&, const int64_t*,                    \
                                            ContrastiveRowState<acc_t>, LseArray<const acc_t>,           \
                                            LseArray<acc_t>, acc_t*);
#define FUSEDLOSS_INSTANTIATE_CONTRASTIVE_GRAD_CPU(acc_t, grad_t)                                       \
  template void contrastive_chunk_grad<acc_t, grad_t>(const ContrastiveParams&, const acc_t*,             \
                                                     const acc_t*, const int64_t*, LseArray<const acc_t>, \
                                                     LseArray<const acc_t>, const acc_t*, const acc_t*,   \
                                                     grad_t*);

FUSEDLOSS_FOR_ACC_TYPES(FUSEDLOSS_INSTANTIATE_CONTRASTIVE_CPU)
FUSEDLOSS_FOR_DLOGITS_TYPES(FUSEDLOSS_INSTANTIATE_CONTRASTIVE_GRAD_CPU)
#undef FUSEDLOSS_INSTANTIATE_CONTRASTIVE_CPU
#undef FUSEDLOSS_INSTANTIATE_CONTRASTIVE_GRAD_CPU

}  // namespace fusedloss::cpu
