// CPU kernel of the SigLIP loss: one pass over a [R, tile] block of dot
// products, rows in parallel, each row a branch-free (vectorised) loop that
// forms the pair terms, their row sums and the row's dlogits
// (vec_math.h's sum_log_terms: four pairs share one log).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "common.h"
#include "fusedloss/dtypes.h"
#include "fusedloss/siglip.h"
#include "vec_math.h"

namespace fusedloss::cpu {

template <typename acc_t, typename grad_t>
void siglip_chunk(const SiglipParams& p, const acc_t* tile, const acc_t* scale, const acc_t* bias,
                  const acc_t* row_grad, bool with_loss, SiglipRowState<acc_t> state, grad_t* dlogits) {
  const int64_t columns = p.chunk_columns;
  const acc_t s = *scale, b = *bias;
  // One loop per variant: the log is skipped when only the gradient is asked
  // for (the backward of reduction="none"), the stores when only the loss is.
  const auto run = [&](auto loss_tag, auto grad_tag) {
    constexpr bool kLoss = decltype(loss_tag)::value;
    constexpr bool kGrad = decltype(grad_tag)::value;
    at::parallel_for(0, p.num_rows, row_grain(columns), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const acc_t* y = tile + row * p.logits_stride;
        grad_t* dz = kGrad ? dlogits + row * p.logits_stride : nullptr;
        const int64_t t = p.positive_chunk_column(row);
        const acc_t g = kGrad ? row_grad[row] : acc_t(0);
        // Each pair as a LogTerm (its log shared with three others, vec_math.h):
        // u = 1 + e, rest = max(-x, 0) + log1p_correction, and the
        // sums of d and d * dot for the bias and scale gradients.
        const LogTermSums<acc_t> sums = sum_log_terms<acc_t>(columns, [=](int64_t j) {
          const acc_t dot = y[j];
          const acc_t z = s * dot + b;
          const acc_t e = exp_vectorizable(-std::fabs(z));
          const acc_t u = acc_t(1) + e;
          LogTerm<acc_t> term{acc_t(1), acc_t(0), acc_t(0), acc_t(0)};
          if constexpr (kLoss) {
            term.u = u;
            term.rest = siglip_pair_loss(z, j == t, log1p_correction(e, u, acc_t(1) / u));
          }
          if constexpr (kGrad) {
            const acc_t d = g * siglip_pair_grad(z, j == t, e);
            term.sum1 = d;
            term.sum2 = d * dot;
            // d z / d dot = scale: the GEMMs consume raw operands.
            dz[j] = static_cast<grad_t>(s * d);
          }
          return term;
        });
        const acc_t loss = sums.total, grad_bias = sums.sum1, grad_scale = sums.sum2;
        if constexpr (kLoss) state.loss[row] += loss;
        if constexpr (kGrad) {
          state.grad_bias[row] += grad_bias;
          state.grad_scale[row] += grad_scale;
        }
      }
    });
  };
  const bool with_grad = dlogits != nullptr;
  if (with_loss && with_grad) run(std::true_type{}, std::true_type{});
  else if (with_grad) run(std::false_type{}, std::true_type{});
  else if (with_loss) run(std::true_type{}, std::false_type{});
}

#define FUSEDLOSS_INSTANTIATE_SIGLIP_CPU(acc_t, grad_t)                                                         \
  template void siglip_chunk<acc_t, grad_t>(const SiglipParams&, const acc_t*, const acc_t*, const acc_t*,     \
                                            const acc_t*, bool, SiglipRowState<acc_t>, grad_t*);
FUSEDLOSS_FOR_DLOGITS_TYPES(FUSEDLOSS_INSTANTIATE_SIGLIP_CPU)
#undef FUSEDLOSS_INSTANTIATE_SIGLIP_CPU

}  // namespace fusedloss::cpu
